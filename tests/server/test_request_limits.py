"""Requests bounded (issue 9, "Requests"): queue limits, the same field limits on REST and
Twirp, agent names, forgotten pools, deep JSON. Each attack runs next to a bystander
worker in its own pool, which must keep being served."""

from __future__ import annotations

import json
from typing import Any

import pytest
from livekit import api
from livekit.protocol import agent_dispatch
from server.conftest import MakeServer
from server.helpers import Srv
from server.limits import bystander, served
from support import KEY, SECRET

TWIRP = "/twirp/livekit.AgentDispatchService/CreateDispatch"


async def _twirp(
    srv: Srv, req: agent_dispatch.CreateAgentDispatchRequest
) -> tuple[int, dict[str, Any] | None]:
    headers = {**srv.auth, "Content-Type": "application/protobuf"}
    async with srv.session.post(
        srv.url + TWIRP, data=req.SerializeToString(), headers=headers
    ) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body


# ---------------------------------------------------------------- queue_full


async def test_a_full_pool_queue_refuses_with_429_queue_full(make_server: MakeServer) -> None:
    """Past the pool's `max_queued` a dispatch gets 429 `queue_full` naming the limit (20,000
    dispatches with max_wait_s 600 used to all queue); the refused job is on record."""
    srv = await make_server({"pools": {"q": {"max_queued": 3}}})
    good = await bystander(srv)
    for _ in range(3):
        assert (await srv.dispatch("q", max_wait_s=600))["state"] == "queued"
    status, body = await srv.call(
        "POST", "/v1/dispatches", json={"agent_name": "q", "max_wait_s": 600}
    )
    assert status == 429
    assert body["code"] == "queue_full"
    assert "pool 'q' has 3 jobs queued" in body["message"]
    assert "max_queued = 3" in body["message"]
    refused = await srv.job(body["job_id"])
    assert refused["state"] == "no_capacity"
    assert srv.dispatcher.pool("q").queued == 3
    await served(srv, good)


async def test_the_server_queue_limit_spans_pools(make_server: MakeServer) -> None:
    """`[server] max_queued` caps the queued jobs of every pool together."""
    srv = await make_server({"server": {"max_queued": 2}})
    good = await bystander(srv)
    await srv.dispatch("a", max_wait_s=600)
    await srv.dispatch("b", max_wait_s=600)
    status, body = await srv.call("POST", "/v1/dispatches", json={"agent_name": "c"})
    assert status == 429
    assert "[server] max_queued = 2" in body["message"]
    await served(srv, good)  # placed at once: a free slot needs no queue


async def test_twirp_refuses_a_full_queue_with_resource_exhausted(
    make_server: MakeServer,
) -> None:
    """Twirp CreateDispatch answers a full queue with `resource_exhausted` (HTTP 429)."""
    srv = await make_server({"pools": {"q": {"max_queued": 1}}})
    req = agent_dispatch.CreateAgentDispatchRequest(agent_name="q", room="r1")
    assert (await _twirp(srv, req))[0] == 200
    status, body = await _twirp(srv, req)
    assert status == 429
    assert body is not None
    assert body["code"] == "resource_exhausted"
    assert "max_queued = 1" in body["msg"]


# ------------------------------------------------------------- field limits


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"metadata": "m" * 1_000_000}, "metadata exceeds 65536 bytes", id="metadata"),
        pytest.param(
            {"attributes": {f"k{i}": "v" for i in range(50_000)}},
            "50000 attributes; at most 64",
            id="attribute-count",
        ),
        pytest.param(
            {"attributes": {"k": "v" * 70_000}}, "attributes total 70001 bytes", id="attr-size"
        ),
        pytest.param({"agent_name": "x" * 1000}, "1000 characters long", id="name-length"),
        pytest.param({"agent_name": "a b"}, "characters outside", id="name-chars"),
        pytest.param({"room": "r" * 300}, "room name exceeds 256 bytes", id="room"),
    ],
)
async def test_twirp_has_the_same_limits_as_rest(
    srv: Srv, fields: dict[str, Any], message: str
) -> None:
    """Twirp CreateDispatch (1 MB metadata and 50,000 attributes used to pass) and REST
    refuse the same oversized fields with `invalid_argument` and the same message."""
    good = await bystander(srv)
    req = agent_dispatch.CreateAgentDispatchRequest(agent_name="t", room="r1")
    for key, value in fields.items():
        if key == "attributes":
            req.attributes.update(value)
        else:
            setattr(req, key, value)
    status, body = await _twirp(srv, req)
    assert (status, body and body["code"]) == (400, "invalid_argument")
    assert body is not None
    assert message in body["msg"]
    rest = {"agent_name": "t", "room": "r1", **fields}
    status, rbody = await srv.call("POST", "/v1/dispatches", json=rest)
    assert (status, rbody["code"]) == (400, "invalid_argument")
    assert message in rbody["message"]
    assert srv.dispatcher.live_job_count() == 0
    await served(srv, good)


async def test_rest_dispatch_attributes_reach_the_worker(srv: Srv) -> None:
    """REST takes `attributes` (string values) like Twirp does; the offer carries them."""
    w = await srv.connect("at", max_jobs=1)
    await srv.dispatch("at", attributes={"caller": "+15550100"})
    offer = await w.next_offer()
    assert dict(offer.attributes) == {"caller": "+15550100"}
    status, body = await srv.call(
        "POST", "/v1/dispatches", json={"agent_name": "at", "attributes": {"n": 1}}
    )
    assert status == 400
    assert "'attributes' must be an object of strings" in body["message"]


async def test_livekit_api_client_still_works_within_the_limits(srv: Srv) -> None:
    """livekit-api's own client, with metadata and attributes inside the limits, is served."""
    w = await srv.connect("lk", max_jobs=1)
    client = api.LiveKitAPI(srv.url, KEY, SECRET)
    try:
        created = await client.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="lk", room="room-1", metadata="m" * 60_000)
        )
    finally:
        await client.aclose()
    assert (await w.next_offer()).dispatch_id == created.id


# ------------------------------------------------------------ forgotten pools


async def test_pools_of_made_up_agent_names_are_forgotten(srv: Srv) -> None:
    """1,000 dispatches to made-up agent names leave no pools behind, and /metrics keeps
    the series of at most the last 100 such names (it used to grow with every name)."""
    good = await bystander(srv)
    for i in range(1000):
        await srv.dispatch(f"made-up-{i:04d}-" + "x" * 100, max_wait_s=0)
    assert {p.name for p in srv.dispatcher.pools()} == {"bystander"}
    text = await srv.metrics_text()
    names = {
        line.split('pool="')[1].split('"')[0] for line in text.splitlines() if 'pool="' in line
    }
    assert len(names) <= 100 + 2  # the kept names, "(unconfigured)", the bystander's pool
    assert "(unconfigured)" in names
    assert "made-up-0000-" + "x" * 100 not in names
    assert len(text) < 80_000, len(text)  # about 54 kB; 1,000 names of 1 kB made 16 MB
    assert 'trunkline_jobs_requested_total{pool="(unconfigured)"} 900.0' in text
    _, body = await srv.call("GET", "/v1/pools")
    assert [p["agent_name"] for p in body["pools"]] == ["bystander"]
    await served(srv, good)


# ------------------------------------------------------------------ deep JSON


async def test_deeply_nested_json_is_a_400_not_a_500(srv: Srv) -> None:
    """A body nested 100,000 deep is `malformed` (400) on REST and on Twirp JSON, not a
    500 with a traceback; metadata given as deep JSON likewise."""
    good = await bystander(srv)
    deep = "[" * 100_000 + "]" * 100_000
    status, body = await srv.call(
        "POST",
        "/v1/dispatches",
        data=deep,
        headers={**srv.auth, "Content-Type": "application/json"},
    )
    assert (status, body["code"]) == (400, "malformed")
    assert "nested too deeply" in body["message"]
    deep_obj = '{"agent_name": "x", "metadata": ' + deep + "}"
    status, body = await srv.call(
        "POST",
        "/v1/dispatches",
        data=deep_obj,
        headers={**srv.auth, "Content-Type": "application/json"},
    )
    assert status == 400
    assert body["code"] == "malformed"
    twirp_body = json.dumps({"agent_name": "x", "room": "r"})[:-1] + ', "metadata": ' + deep + "}"
    async with srv.session.post(
        srv.url + TWIRP,
        data=twirp_body,
        headers={**srv.auth, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400
        assert (await r.json())["code"] == "malformed"
    await served(srv, good)
