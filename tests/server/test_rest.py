"""REST `/v1`: validation, waiting, traces, listing, termination, drain, auth."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from livekit import api
from server.conftest import MakeServer
from server.helpers import Srv
from support import KEY, SECRET

from trunkline.auth import admin_token, agent_token


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        pytest.param(b"{not json", "malformed", "not valid JSON", id="bad-json"),
        pytest.param(b"[1, 2]", "malformed", "JSON object", id="not-object"),
        pytest.param({"agent_name": 5}, "invalid_argument", "'agent_name'", id="agent-int"),
        pytest.param({"room": ["r"]}, "invalid_argument", "'room'", id="room-list"),
        pytest.param({"max_wait_s": "5"}, "invalid_argument", "'max_wait_s'", id="wait-str"),
        pytest.param({"max_wait_s": -1}, "invalid_argument", "'max_wait_s'", id="wait-neg"),
        pytest.param({"max_wait_s": 3601}, "invalid_argument", "[0, 3600]", id="wait-big"),
        pytest.param({"max_wait_s": True}, "invalid_argument", "'max_wait_s'", id="wait-bool"),
        pytest.param({"wait": "yes"}, "invalid_argument", "'wait'", id="wait-flag"),
        pytest.param({"metadata": "x" * 70_000}, "invalid_argument", "metadata", id="meta-big"),
    ],
)
async def test_dispatch_validation_errors(
    srv: Srv, body: bytes | dict[str, Any], code: str, mentions: str
) -> None:
    """Invalid `POST /v1/dispatches` bodies get 400 with a stable code naming the field."""
    if isinstance(body, bytes):
        headers = {**srv.auth, "Content-Type": "application/json"}
        status, err = await srv.call("POST", "/v1/dispatches", data=body, headers=headers)
    else:
        status, err = await srv.call("POST", "/v1/dispatches", json=body)
    assert status == 400
    assert err["code"] == code
    assert mentions in err["message"]
    assert srv.dispatcher.live_job_count() == 0


async def test_dispatch_nan_max_wait_is_refused(srv: Srv) -> None:
    """A non-finite `max_wait_s` (NaN, which Python's JSON accepts) gets 400."""
    headers = {**srv.auth, "Content-Type": "application/json"}
    status, err = await srv.call(
        "POST", "/v1/dispatches", data=b'{"max_wait_s": NaN}', headers=headers
    )
    assert (status, err["code"]) == (400, "invalid_argument")


async def test_dispatch_wait_returns_when_running(srv: Srv) -> None:
    """`wait: true` answers once the job is running, with its worker."""
    w = await srv.connect("a", max_jobs=1)
    req = asyncio.create_task(
        srv.call("POST", "/v1/dispatches", json={"agent_name": "a", "wait": True, "room": "r1"})
    )
    job = await w.next_offer()
    await w.accept(job.id)
    await w.next_assignment()
    assert not req.done()
    await w.running(job.id)
    status, body = await req
    assert status == 201
    assert body["state"] == "running"
    assert body["worker_id"] == w.worker_id
    assert body["room"] == "r1"
    assert body["running_at"] >= body["placed_at"] >= body["created_at"]


async def test_dispatch_wait_returns_when_ended(srv: Srv) -> None:
    """`wait: true` also answers when the job ends before running (rejected)."""
    w = await srv.connect("a", max_jobs=1, auto="reject")
    status, body = await srv.call("POST", "/v1/dispatches", json={"agent_name": "a", "wait": True})
    assert status == 201
    assert body["state"] == "rejected"
    assert body["ended"] is True
    assert w.worker_id in body["reason"]


async def test_no_worker_zero_wait_is_no_capacity(srv: Srv) -> None:
    """`max_wait_s: 0` with no worker → 201, state `no_capacity`, reason names the pool."""
    status, body = await srv.call(
        "POST", "/v1/dispatches", json={"agent_name": "support", "max_wait_s": 0}
    )
    assert status == 201
    assert body["state"] == "no_capacity"
    assert body["ended"] is True
    assert "pool 'support'" in body["reason"]
    assert "no worker registered" in body["reason"]


async def test_no_capacity_after_max_wait_with_wait(srv: Srv) -> None:
    """A queued job whose `max_wait_s` passes ends `no_capacity`; `wait` reports it."""
    w = await srv.connect("busy", max_jobs=1, auto="accept", auto_run=True)
    await srv.dispatch("busy", wait=True)
    status, body = await srv.call(
        "POST", "/v1/dispatches", json={"agent_name": "busy", "max_wait_s": 0.1, "wait": True}
    )
    assert status == 201
    assert body["state"] == "no_capacity"
    assert "no worker with a free slot (1 workers)" in body["reason"]
    assert "max wait 0.1 s" in body["reason"]
    assert body["queue_wait_s"] >= 0.1
    assert w.pending("availability") == 1  # only the first job was ever offered


async def test_job_trace_names_workers(srv: Srv) -> None:
    """GET /v1/jobs/{id}: the trace lists each placement step with its worker id."""
    w = await srv.connect("t", max_jobs=1)
    job_id = (await srv.dispatch("t", metadata={"caller": "+1555"}))["job_id"]
    await w.take_job()
    await srv.wait_state(job_id, "running")
    await w.succeed(job_id)
    job = await srv.wait_state(job_id, "succeeded")
    events = [(e["event"], e["worker_id"]) for e in job["trace"]]
    assert events == [
        ("requested", None),
        ("offered", w.worker_id),
        ("accepted", w.worker_id),
        ("running", w.worker_id),
        ("succeeded", w.worker_id),
    ]
    times = [e["t_ms"] for e in job["trace"]]
    assert times == sorted(times)
    assert job["metadata"] == '{"caller": "+1555"}'
    assert job["reason"] == "job finished"
    assert job["ended_at"] >= job["running_at"]


async def test_list_jobs_filters(srv: Srv) -> None:
    """GET /v1/jobs filters by state and agent name and honours `limit`."""
    w = await srv.connect("a", max_jobs=1, auto="accept", auto_run=True)
    running = (await srv.dispatch("a", wait=True))["job_id"]
    queued = (await srv.dispatch("a"))["job_id"]
    refused = [(await srv.dispatch("b", max_wait_s=0))["job_id"] for _ in range(2)]

    async def ids(query: str) -> list[str]:
        status, body = await srv.call("GET", "/v1/jobs" + query)
        assert status == 200, body
        return [j["job_id"] for j in body["jobs"]]

    assert await ids("?state=running") == [running]
    assert await ids("?state=queued") == [queued]
    assert sorted(await ids("?state=no_capacity")) == sorted(refused)
    assert sorted(await ids("?agent_name=a")) == sorted([running, queued])
    assert len(await ids("?agent_name=b&limit=1")) == 1
    assert len(await ids("")) == 4
    status, err = await srv.call("GET", "/v1/jobs?state=bogus")
    assert (status, err["code"]) == (400, "invalid_argument")
    assert "allowed:" in err["message"]
    status, err = await srv.call("GET", "/v1/jobs?limit=x")
    assert (status, err["code"]) == (400, "invalid_argument")
    assert w.worker_id


async def test_delete_running_job_terminates_it(srv: Srv) -> None:
    """DELETE of a running job sends JobTermination; it ends `cancelled` when the worker stops."""
    w = await srv.connect("d", max_jobs=1)
    job_id = (await srv.dispatch("d"))["job_id"]
    await w.take_job()
    await srv.wait_state(job_id, "running")
    status, body = await srv.call("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200
    assert body["state"] == "terminating"
    assert await w.next_termination() == job_id
    assert srv.dispatcher.worker(w.worker_id).used == 1
    await w.succeed(job_id)
    job = await srv.wait_state(job_id, "cancelled")
    assert job["reason"] == "terminated by API request"
    assert srv.dispatcher.worker(w.worker_id).used == 0


async def test_delete_queued_job_cancels_at_once(srv: Srv) -> None:
    """DELETE of a queued job ends it `cancelled` immediately."""
    job_id = (await srv.dispatch("nobody"))["job_id"]
    status, body = await srv.call("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200
    assert body["state"] == "cancelled"
    assert (await srv.job(job_id))["state"] == "cancelled"


async def test_delete_ended_job_conflicts_and_unknown_is_404(srv: Srv) -> None:
    """DELETE of an ended job → 409 failed_precondition; of an unknown id → 404."""
    job_id = (await srv.dispatch("x", max_wait_s=0))["job_id"]
    status, err = await srv.call("DELETE", f"/v1/jobs/{job_id}")
    assert (status, err["code"]) == (409, "failed_precondition")
    assert "no_capacity" in err["message"]
    status, err = await srv.call("DELETE", "/v1/jobs/AJ_unknown")
    assert (status, err["code"]) == (404, "not_found")
    status, err = await srv.call("GET", "/v1/jobs/AJ_unknown")
    assert (status, err["code"]) == (404, "not_found")


async def test_workers_and_pools_fields(make_server: MakeServer) -> None:
    """GET /v1/workers and /v1/pools report capacity, usage, status and config."""
    pool = {"max_jobs_per_worker": 3, "max_concurrent_jobs": 5, "placement": "spread"}
    srv = await make_server({"pools": {"p": pool}})
    w = await srv.connect("p")
    job_id = (await srv.dispatch("p"))["job_id"]
    await w.take_job()
    await srv.wait_state(job_id, "running")
    await srv.dispatch("p")
    await w.next_offer()  # second job: offered, unanswered
    await w.status(load=0.25, job_count=1)
    await w.barrier()
    status, body = await srv.call("GET", "/v1/workers")
    assert status == 200
    (info,) = body["workers"]
    expect = {
        "worker_id": w.worker_id,
        "agent_name": "p",
        "capacity": 3,
        "used": 2,
        "running": 1,
        "reserved": 1,
        "offers": 1,
        "status": "available",
        "load": 0.25,
        "draining": False,
    }
    assert {k: info[k] for k in expect} == expect
    assert job_id in info["jobs"]
    status, body = await srv.call("GET", "/v1/pools")
    assert status == 200
    (info,) = [p for p in body["pools"] if p["agent_name"] == "p"]
    assert info["workers"] == 1
    assert info["slots_used"] == 2
    assert info["slots_free"] == 1
    assert info["queued"] == 0
    assert info["active_jobs"] == 2
    assert info["config"]["max_jobs_per_worker"] == 3
    assert info["config"]["max_concurrent_jobs"] == 5
    assert info["config"]["placement"] == "spread"


async def test_drain_stops_offers(srv: Srv) -> None:
    """POST /v1/workers/{id}/drain: no more offers to it; running jobs continue."""
    a = await srv.connect("dr", max_jobs=2)
    job_id = (await srv.dispatch("dr"))["job_id"]
    await a.take_job()
    status, body = await srv.call("POST", f"/v1/workers/{a.worker_id}/drain")
    assert status == 200
    assert body["draining"] is True
    queued = (await srv.dispatch("dr"))["job_id"]
    await a.barrier()
    assert a.pending("availability") == 0
    assert (await srv.job(queued))["state"] == "queued"
    b = await srv.connect("dr", max_jobs=2)
    assert (await b.next_offer()).id == queued
    await a.succeed(job_id)
    await srv.wait_state(job_id, "succeeded")
    status, err = await srv.call("POST", "/v1/workers/AW_nope/drain")
    assert (status, err["code"]) == (404, "not_found")


def _room_scoped_admin(room: str) -> str:
    return (
        api.AccessToken(KEY, SECRET)
        .with_grants(api.VideoGrants(room_admin=True, room=room))
        .to_jwt()
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs"), ("GET", "/v1/workers"), ("GET", "/v1/pools"), ("GET", "/v1/jobs/x")],
)
async def test_rest_auth_errors(srv: Srv, method: str, path: str) -> None:
    """REST needs a roomAdmin token: none/bad → 401 unauthenticated, agent-only → 403."""
    status, err = await srv.call(method, path, headers={})
    assert (status, err["code"]) == (401, "unauthenticated")
    bad = {"Authorization": f"Bearer {admin_token(KEY, 'wrong')}"}
    status, err = await srv.call(method, path, headers=bad)
    assert (status, err["code"]) == (401, "unauthenticated")
    agent_only = {"Authorization": f"Bearer {agent_token(KEY, SECRET)}"}
    status, err = await srv.call(method, path, headers=agent_only)
    assert (status, err["code"]) == (403, "permission_denied")


async def test_dispatch_auth_errors(srv: Srv) -> None:
    """POST /v1/dispatches: 401 without a token, 403 for a token scoped to another room."""
    status, err = await srv.call("POST", "/v1/dispatches", json={"room": "r"}, headers={})
    assert (status, err["code"]) == (401, "unauthenticated")
    scoped = {"Authorization": f"Bearer {_room_scoped_admin('other')}"}
    status, err = await srv.call("POST", "/v1/dispatches", json={"room": "r"}, headers=scoped)
    assert (status, err["code"]) == (403, "permission_denied")
    assert srv.dispatcher.live_job_count() == 0
    status, _ = await srv.call(
        "POST", "/v1/dispatches", json={"room": "other", "max_wait_s": 0}, headers=scoped
    )
    assert status == 201


async def test_healthz(srv: Srv) -> None:
    """GET /healthz answers ok with worker and live-job counts."""
    await srv.connect("h")
    async with srv.session.get(srv.url + "/healthz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ok"
    assert body["workers"] == 1


async def test_auth_is_checked_before_the_body(srv: Srv) -> None:
    """An unauthenticated POST /v1/dispatches gets 401, not a validation error."""
    headers = {"Content-Type": "application/json"}
    status, err = await srv.call("POST", "/v1/dispatches", data=b"{bad", headers=headers)
    assert (status, err["code"]) == (401, "unauthenticated")
    agent_only = {**headers, "Authorization": f"Bearer {agent_token(KEY, SECRET)}"}
    status, err = await srv.call("POST", "/v1/dispatches", data=b"{bad", headers=agent_only)
    assert (status, err["code"]) == (403, "permission_denied")


@pytest.mark.parametrize("limit", ["0", "-2"])
async def test_list_jobs_limit_below_one_is_refused(srv: Srv, limit: str) -> None:
    """GET /v1/jobs?limit=0 (or negative) is a 400, not a silent one-job answer."""
    await srv.dispatch("x", max_wait_s=0)
    status, err = await srv.call("GET", f"/v1/jobs?limit={limit}")
    assert (status, err["code"]) == (400, "invalid_argument")
    assert ">= 1" in err["message"]


async def test_oversized_body_is_a_json_error(srv: Srv) -> None:
    """A request body over the 1 MiB limit gets 413 with a JSON error, no job."""
    headers = {**srv.auth, "Content-Type": "application/json"}
    body = io.BytesIO(b" " * ((1 << 20) + 1))
    status, err = await srv.call("POST", "/v1/dispatches", data=body, headers=headers)
    assert status == 413
    assert err["code"] == "payload_too_large"
    assert "1048576 bytes" in err["message"]
    assert srv.dispatcher.live_job_count() == 0
