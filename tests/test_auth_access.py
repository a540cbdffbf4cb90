"""Auth hygiene on a running server (real sockets): the read-only viewer token,
one 401 message for every bad token, and a refusal log a flood cannot flood.
A bystander worker keeps getting jobs through each attack."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from livekit import api
from protoworker import ProtoWorker
from server.helpers import Srv
from support import KEY, SECRET

from trunkline.auth import RefusalLog
from trunkline.config import parse_config
from trunkline.server.app import build_app
from trunkline.server.keys import AUTH

MakeSrv = Callable[..., Awaitable[Srv]]
POOL = {"pools": {"support": {"max_jobs_per_worker": 4}}}


@pytest.fixture
async def make_srv() -> AsyncIterator[MakeSrv]:
    """`await make_srv({toml-as-dict})`: an in-process server with the test key."""
    started: list[Srv] = []

    async def make(config: dict[str, Any] | None = None) -> Srv:
        ts = TestServer(build_app(parse_config({"keys": {KEY: SECRET}, **(config or {})})))
        await ts.start_server()
        srv = Srv(ts)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.close()


def viewer(room: str = "") -> dict[str, str]:
    """A roomList-only token made with livekit-api, as any LiveKit tool would."""
    tok = (
        api.AccessToken(KEY, SECRET)
        .with_grants(api.VideoGrants(room_list=True, room=room))
        .to_jwt()
    )
    return {"Authorization": f"Bearer {tok}"}


async def running_job(srv: Srv, worker: ProtoWorker) -> str:
    """Dispatch to `worker`'s pool and wait until the job runs there."""
    job = await srv.dispatch("support", wait=True)
    assert job["state"] == "running", job
    assert job["job_id"] in worker.active
    job_id: str = job["job_id"]
    return job_id


# -------------------------------------------------------------- viewer token


async def test_a_viewer_token_reads_but_cannot_change_anything(make_srv: MakeSrv) -> None:
    """A roomList-only token gets 200 on every REST read and the dashboard, and
    403 on cancel, drain and dispatch (REST and Twirp); the job it tried to
    cancel keeps running on the bystander worker."""
    srv = await make_srv(POOL)
    w = await srv.connect("support", auto="accept", auto_run=True)
    job_id = await running_job(srv, w)
    hdrs = viewer()
    for path in ("/v1/pools", "/v1/workers", "/v1/jobs", f"/v1/jobs/{job_id}"):
        status, body = await srv.call("GET", path, headers=hdrs)
        assert status == 200, (path, body)
    status, body = await srv.call("GET", "/v1/workers", headers=hdrs)
    assert [x["worker_id"] for x in body["workers"]] == [w.worker_id]
    status, _ = await srv.call("GET", f"/dashboard/jobs/{job_id}", headers=hdrs)
    assert status == 200
    async with srv.session.get(srv.url + "/dashboard/stream", headers=hdrs) as r:
        assert r.status == 200
        assert (await r.content.readuntil(b"\n\n")).startswith(b"retry:")

    writes = [
        ("DELETE", f"/v1/jobs/{job_id}", None),
        ("POST", f"/v1/workers/{w.worker_id}/drain", None),
        ("POST", "/v1/dispatches", {"agent_name": "support"}),
        ("POST", "/twirp/livekit.AgentDispatchService/CreateDispatch", {"room": "r"}),
        ("POST", "/twirp/livekit.AgentDispatchService/DeleteDispatch", {"dispatch_id": "x"}),
    ]
    for method, path, body_in in writes:
        status, body = await srv.call(method, path, json=body_in, headers=hdrs)
        assert status == 403, (path, status, body)
        assert "roomAdmin" in (body.get("message") or body.get("msg")), body

    job = await srv.job(job_id)
    assert job["state"] == "running"
    assert not srv.dispatcher.worker(w.worker_id).draining  # type: ignore[union-attr]
    assert len(srv.dispatcher.live_jobs()) == 1
    assert (await srv.dispatch("support", wait=True))["state"] == "running"  # admin still can


async def test_a_room_scoped_viewer_reads_its_room_only(make_srv: MakeSrv) -> None:
    """A viewer token scoped to a room lists that room's jobs and is refused the
    views that span every room (workers, pools, dashboard)."""
    srv = await make_srv(POOL)
    await srv.connect("support", auto="accept", auto_run=True)
    mine = await srv.dispatch("support", room="room-a", wait=True)
    other = await srv.dispatch("support", room="room-b", wait=True)
    hdrs = viewer("room-a")
    status, body = await srv.call("GET", "/v1/jobs", headers=hdrs)
    assert status == 200
    assert [j["job_id"] for j in body["jobs"]] == [mine["job_id"]]
    status, _ = await srv.call("GET", f"/v1/jobs/{other['job_id']}", headers=hdrs)
    assert status == 404
    for path in ("/v1/workers", "/v1/pools", "/dashboard/stream"):
        status, body = await srv.call("GET", path, headers=hdrs)
        assert status == 403, path
        assert "scoped to room 'room-a'" in body["message"]


async def test_dashboard_url_mints_a_viewer_token(make_srv: MakeSrv) -> None:
    """`trunkline status --dashboard-url` prints a link whose token has roomList and
    no roomAdmin: it opens the dashboard, and cancelling a job with it is 403
    while the job keeps running."""
    srv = await make_srv(POOL)
    w = await srv.connect("support", auto="accept", auto_run=True)
    job_id = await running_job(srv, w)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "TRUNKLINE_"))}
    env.update(TRUNKLINE_URL=srv.url, LIVEKIT_API_KEY=KEY, LIVEKIT_API_SECRET=SECRET)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trunkline",
        "status",
        "--dashboard-url",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    link = out.decode().strip()
    assert link.startswith(srv.url + "/?token=")
    token = link.split("token=", 1)[1]
    grants = jwt.decode(token, options={"verify_signature": False})["video"]
    assert grants.get("roomList") is True
    assert not grants.get("roomAdmin")

    async with srv.session.get(link, allow_redirects=False) as r:
        assert r.status == 303
    hdrs = {"Authorization": f"Bearer {token}"}
    status, body = await srv.call("DELETE", f"/v1/jobs/{job_id}", headers=hdrs)
    assert status == 403, body
    assert (await srv.job(job_id))["state"] == "running"


# ------------------------------------------------------------ uniform 401


def bad_tokens() -> dict[str, str]:
    """Every way a token can fail verification, by what an attacker would learn."""

    def signed(key: str, secret: str, ttl_s: int = 600) -> str:
        return (
            api.AccessToken(key, secret)
            .with_grants(api.VideoGrants(room_admin=True, agent=True, room_list=True))
            .with_ttl(datetime.timedelta(seconds=ttl_s))
            .to_jwt()
        )

    return {
        "unknown key": signed("no-such-key", SECRET),
        "wrong secret": signed(KEY, "x" * 40),
        "not a JWT": "not-a-jwt",
        "expired": signed(KEY, SECRET, ttl_s=-120),
    }


async def test_every_bad_token_gets_the_same_401_on_every_surface(make_srv: MakeSrv) -> None:
    """Unknown key, wrong secret, garbage and expired tokens get one and the same
    401 message on REST, Twirp, /agent and the dashboard: nobody can tell a real
    key name from a made-up one."""
    srv = await make_srv(POOL)
    surfaces = [
        ("GET", "/v1/pools", None),
        ("POST", "/twirp/livekit.AgentDispatchService/ListDispatch", {"room": "r"}),
        ("GET", "/agent", None),
        ("GET", "/dashboard/stream", None),
    ]
    for method, path, body_in in surfaces:
        seen: dict[str, tuple[int, str]] = {}
        for what, tok in bad_tokens().items():
            hdrs = {"Authorization": f"Bearer {tok}"}
            status, body = await srv.call(method, path, json=body_in, headers=hdrs)
            seen[what] = (status, body.get("message") or body.get("msg"))
        assert len(set(seen.values())) == 1, (path, seen)
        status, message = next(iter(seen.values()))
        assert status == 401
        assert message.startswith("invalid token"), message
        assert "no-such-key" not in message


# ------------------------------------------------------------- refusal log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trunkline")
    ]


def test_refusal_log_one_line_per_source_per_interval() -> None:
    """Per source: the first refusal of an interval is a WARNING, the rest are
    counted and the count rides on that source's next line."""
    clock = Clock()
    logger = logging.getLogger("trunkline.test_refusals")
    lines: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lines.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        rl = RefusalLog(logger, interval_s=60, clock=clock)
        for _ in range(100):
            rl.refused("10.0.0.1", 401, "/agent", "unknown API key 'x'")
        rl.refused("10.0.0.2", 401, "/v1/pools", "expired")
        warn = [r for r in lines if r.levelno == logging.WARNING]
        assert [(r.remote, r.suppressed) for r in warn] == [("10.0.0.1", 0), ("10.0.0.2", 0)]  # type: ignore[attr-defined]
        assert sum(r.levelno == logging.DEBUG for r in lines) == 101  # every one at DEBUG
        assert warn[0].reason == "unknown API key 'x'"  # type: ignore[attr-defined]
        clock.now += 61
        rl.refused("10.0.0.1", 401, "/agent", "bad signature")
        last = [r for r in lines if r.levelno == logging.WARNING][-1]
        assert (last.remote, last.suppressed) == ("10.0.0.1", 99)  # type: ignore[attr-defined]
    finally:
        logger.removeHandler(handler)


def test_refusal_log_is_bounded_across_many_sources() -> None:
    """A flood spread over 5,000 addresses writes at most `max_lines` WARNING lines
    per interval, remembers at most `max_sources` addresses, and reports what it
    dropped on the next line."""
    clock = Clock()
    logger = logging.getLogger("trunkline.test_refusals_many")
    lines: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lines.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.propagate = False
    try:
        rl = RefusalLog(logger, interval_s=60, max_lines=20, max_sources=100, clock=clock)
        for i in range(5000):
            rl.refused(f"10.1.{i // 256}.{i % 256}", 401, "/agent")
        assert len(lines) == 20
        assert len(rl._sources) <= 100
        clock.now += 61
        rl.refused("192.0.2.1", 401, "/agent")
        assert len(lines) == 21
        assert lines[-1].suppressed_elsewhere == 5000 - 20  # type: ignore[attr-defined]
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


async def test_a_bad_token_flood_logs_a_few_lines_and_a_bystander_keeps_working(
    make_srv: MakeSrv, caplog: pytest.LogCaptureFixture
) -> None:
    """5,000 bad-token attempts (on /agent and REST, from one address) write one
    WARNING line, not 5,000; after the interval the next line says how many were
    suppressed. A worker connected throughout keeps getting and running jobs."""
    srv = await make_srv(POOL)
    clock = Clock()
    srv.ts.app[AUTH].refusals = RefusalLog(clock=clock)
    w = await srv.connect("support", auto="accept", auto_run=True)
    caplog.set_level(logging.INFO, logger="trunkline")
    tokens = list(bad_tokens().values())
    sent = 0

    async def flood(n: int, path: str) -> None:
        nonlocal sent
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                hdrs = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
                async with s.get(srv.url + path, headers=hdrs) as r:
                    assert r.status == 401
                sent += 1

    attack = asyncio.gather(*(flood(1250, p) for p in ("/agent", "/v1/pools") * 2))
    served_at: list[int] = []  # how many attempts had been made when a bystander job ran
    while not attack.done():
        job_id = await running_job(srv, w)
        served_at.append(sent)
        await w.succeed(job_id)
    await attack
    assert sent == 5000
    assert any(0 < n < 5000 for n in served_at), served_at
    refused = [r for r in warnings_of(caplog) if r.getMessage() == "request refused"]
    assert len(refused) == 1, [r.__dict__ for r in refused[:3]]
    assert refused[0].remote == "127.0.0.1"  # type: ignore[attr-defined]
    assert len(warnings_of(caplog)) == 1
    clock.now += 61
    status, _ = await srv.call("GET", "/v1/pools", headers={"Authorization": "Bearer x"})
    assert status == 401
    refused = [r for r in warnings_of(caplog) if r.getMessage() == "request refused"]
    assert refused[-1].suppressed == 4999  # type: ignore[attr-defined]
    assert not w.closed.is_set()
    await running_job(srv, w)  # and after it
