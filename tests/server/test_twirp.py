"""Twirp `AgentDispatchService`: livekit-api's own client, and raw JSON bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from livekit import api
from livekit.protocol import agent
from server.helpers import Srv
from support import KEY, SECRET

PATH = "/twirp/livekit.AgentDispatchService/"


@pytest.fixture
async def lkapi(srv: Srv) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(srv.url, KEY, SECRET)
    yield client
    await client.aclose()


async def test_create_list_delete_with_livekit_api(srv: Srv, lkapi: api.LiveKitAPI) -> None:
    """livekit-api's agent_dispatch create/list/get/delete work against trunkline."""
    w = await srv.connect("lk", max_jobs=2)
    created = await lkapi.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name="lk", room="room-1", metadata='{"k": "v"}')
    )
    assert created.id.startswith("AD_")
    assert (created.agent_name, created.room, created.metadata) == ("lk", "room-1", '{"k": "v"}')
    (job_pb,) = created.state.jobs
    offer = await w.next_offer()
    assert offer.id == job_pb.id
    assert offer.dispatch_id == created.id
    assert offer.room.name == "room-1"
    assert offer.metadata == '{"k": "v"}'
    assert offer.agent_name == "lk"
    await w.accept(offer.id)
    await w.next_assignment()
    await w.running(offer.id)
    await srv.wait_state(offer.id, "running")

    listed = await lkapi.agent_dispatch.list_dispatch("room-1")
    assert [d.id for d in listed] == [created.id]
    assert listed[0].state.jobs[0].state.status == agent.JobStatus.JS_RUNNING
    assert listed[0].state.jobs[0].state.worker_id == w.worker_id
    assert await lkapi.agent_dispatch.list_dispatch("other-room") == []
    got = await lkapi.agent_dispatch.get_dispatch(created.id, "room-1")
    assert got is not None
    assert got.id == created.id

    deleted = await lkapi.agent_dispatch.delete_dispatch(created.id, "room-1")
    assert deleted.id == created.id
    assert await w.next_termination() == offer.id
    await w.succeed(offer.id)
    job = await srv.wait_state(offer.id, "cancelled")
    assert job["reason"] == "dispatch deleted"
    assert await lkapi.agent_dispatch.list_dispatch("room-1") == []


async def test_dispatch_attributes_reach_the_job_and_the_reply(
    srv: Srv, lkapi: api.LiveKitAPI
) -> None:
    """CreateDispatch attributes are on the job the worker is offered and on the job in
    the Twirp reply (one builder for both)."""
    w = await srv.connect("attr")
    created = await lkapi.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(
            agent_name="attr", room="r-attr", attributes={"tier": "gold", "lang": "fr"}
        )
    )
    assert dict(created.state.jobs[0].attributes) == {"tier": "gold", "lang": "fr"}
    offered = await w.next_offer()
    assert dict(offered.attributes) == {"tier": "gold", "lang": "fr"}


async def test_livekit_api_errors(srv: Srv, lkapi: api.LiveKitAPI) -> None:
    """Twirp errors reach livekit-api as ServerError with Twirp codes."""
    with pytest.raises(api.TwirpError) as err:
        await lkapi.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="x"))
    assert (err.value.code, err.value.status) == ("invalid_argument", 400)
    with pytest.raises(api.TwirpError) as err:
        await lkapi.agent_dispatch.delete_dispatch("AD_nope", "room-1")
    assert (err.value.code, err.value.status) == ("not_found", 404)
    bad = api.LiveKitAPI(srv.url, KEY, "wrong-secret")
    try:
        with pytest.raises(api.TwirpError) as err:
            await bad.agent_dispatch.list_dispatch("room-1")
        assert (err.value.code, err.value.status) == ("unauthenticated", 401)
    finally:
        await bad.aclose()


async def test_create_dispatch_json_body(srv: Srv) -> None:
    """A JSON-body CreateDispatch (application/json) is answered in JSON."""
    w = await srv.connect("js", max_jobs=1)
    headers = {**srv.auth, "Content-Type": "application/json"}
    body = {"agentName": "js", "room": "room-j", "metadata": "hello"}
    status, reply = await srv.call(
        "POST", PATH + "CreateDispatch", data=json.dumps(body), headers=headers
    )
    assert status == 200, reply
    assert reply["agentName"] == "js"
    assert reply["room"] == "room-j"
    assert reply["metadata"] == "hello"
    assert reply["id"].startswith("AD_")
    job_id = reply["state"]["jobs"][0]["id"]
    offer = await w.next_offer()
    assert offer.id == job_id
    assert offer.metadata == "hello"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        pytest.param(b"{not json", "application/json", id="json-syntax"),
        pytest.param(b'{"noSuchField": 1}', "application/json", id="json-unknown-field"),
        pytest.param(b'{"room": 5}', "application/json", id="json-wrong-type"),
        pytest.param(b"\xff\xff\xff", "application/protobuf", id="protobuf-garbage"),
    ],
)
async def test_bad_body_is_twirp_malformed(srv: Srv, body: bytes, ctype: str) -> None:
    """A body that does not decode → 400 Twirp error JSON with code `malformed`."""
    headers = {**srv.auth, "Content-Type": ctype}
    status, err = await srv.call("POST", PATH + "CreateDispatch", data=body, headers=headers)
    assert status == 400
    assert err["code"] == "malformed"
    assert err["msg"]
    assert srv.dispatcher.live_job_count() == 0


async def test_unknown_method_and_content_type(srv: Srv) -> None:
    """An unknown method or Content-Type is a Twirp `bad_route` (404)."""
    headers = {**srv.auth, "Content-Type": "application/json"}
    status, err = await srv.call("POST", PATH + "Nope", data=b"{}", headers=headers)
    assert (status, err["code"]) == (404, "bad_route")
    headers = {**srv.auth, "Content-Type": "text/plain"}
    status, err = await srv.call("POST", PATH + "CreateDispatch", data=b"{}", headers=headers)
    assert (status, err["code"]) == (404, "bad_route")


async def test_twirp_auth_errors(srv: Srv) -> None:
    """Twirp without a token → 401 `unauthenticated`, in Twirp's error shape."""
    headers = {"Content-Type": "application/json"}
    body = b'{"agentName": "a", "room": "r"}'
    status, err = await srv.call("POST", PATH + "CreateDispatch", data=body, headers=headers)
    assert (status, err["code"]) == (401, "unauthenticated")
    assert "msg" in err


async def test_twirp_auth_is_checked_before_the_body(srv: Srv) -> None:
    """An unauthenticated Twirp call with an undecodable body gets 401, not `malformed`."""
    headers = {"Content-Type": "application/protobuf"}
    status, err = await srv.call("POST", PATH + "CreateDispatch", data=b"\xff\xff", headers=headers)
    assert (status, err["code"]) == (401, "unauthenticated")


async def test_twirp_room_scoped_token(srv: Srv) -> None:
    """A token scoped to one room may create dispatches there and nowhere else."""
    token = (
        api.AccessToken(KEY, SECRET)
        .with_grants(api.VideoGrants(room_admin=True, room="mine"))
        .to_jwt()
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = b'{"agentName": "a", "room": "theirs"}'
    status, err = await srv.call("POST", PATH + "CreateDispatch", data=body, headers=headers)
    assert (status, err["code"]) == (403, "permission_denied")
    body = b'{"agentName": "a", "room": "mine"}'
    status, reply = await srv.call("POST", PATH + "CreateDispatch", data=body, headers=headers)
    assert status == 200
    assert reply["room"] == "mine"
