"""`/agent` input bounded and checked (issue 9, "Workers"): what a worker holding a valid
token can make the server hold or do. Each test runs the attack next to a bystander
worker in its own pool, which must keep being served."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import struct
from typing import Any

import aiohttp
import pytest
from livekit.protocol import agent
from protoworker import ProtoWorker
from server.conftest import MakeServer
from server.helpers import Srv
from server.limits import bystander, served, strict_json
from support import KEY, SECRET, wait_until

from trunkline.auth import agent_token


def _pool(name: str, **settings: Any) -> dict[str, Any]:
    return {"pools": {name: settings}}


async def _upgrade_refusal(srv: Srv, query: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {agent_token(KEY, SECRET)}"}
    async with srv.session.get(srv.url + "/agent" + query, headers=headers) as r:
        return r.status, await r.json()


# ------------------------------------------------------------------ max_jobs


async def test_max_jobs_over_the_ceiling_is_refused_at_the_upgrade(srv: Srv) -> None:
    """`?max_jobs=20000000` (1.3 GB of placement index before) gets 400 naming the ceiling
    and the key that sets it; `max_worker_jobs` itself is accepted."""
    good = await bystander(srv)
    status, body = await _upgrade_refusal(srv, "?max_jobs=20000000")
    assert status == 400
    assert body["code"] == "invalid_argument"
    assert "from 1 to 1000" in body["message"]
    assert "max_worker_jobs" in body["message"]
    big = await srv.connect("big", max_jobs=1000)
    assert srv.dispatcher.worker(big.worker_id).capacity == 1000
    await served(srv, good)


async def test_the_max_jobs_ceiling_is_configurable(make_server: MakeServer) -> None:
    """`[server] max_worker_jobs` sets the ceiling."""
    srv = await make_server({"server": {"max_worker_jobs": 50}})
    status, body = await _upgrade_refusal(srv, "?max_jobs=51")
    assert status == 400
    assert "from 1 to 50" in body["message"]
    w = await srv.connect("p", max_jobs=50)
    assert srv.dispatcher.worker(w.worker_id).capacity == 50


# ------------------------------------------------------------------- migrate


async def test_made_up_migrated_ids_are_adopted_only_up_to_capacity_and_quota(
    make_server: MakeServer,
) -> None:
    """1,000 made-up ids from a worker of capacity 2 in a pool of quota 4: two are adopted,
    998 get a JobTermination, the pool never counts more than its quota, and a real
    dispatch is still placed (it used to count 5,000 active jobs and refuse everything)."""
    srv = await make_server(_pool("q", max_concurrent_jobs=4))
    good = ProtoWorker.autonomous(srv.url, "q", max_jobs=2)
    srv.workers.append(good)
    await good.connect()
    first = (await srv.dispatch("q"))["job_id"]
    await srv.wait_state(first, "running")
    hostile = await srv.connect("q", max_jobs=2)
    ids = [f"AJ_madeup{i:05d}" for i in range(1000)]
    await hostile.migrate(*ids)
    await hostile.barrier()
    assert len(hostile.terminated) == 998
    assert set(hostile.terminated) == set(ids[2:])
    assert srv.dispatcher.pool("q").active == 3
    second = (await srv.dispatch("q"))["job_id"]
    await srv.wait_state(second, "running")
    assert second in good.active
    assert srv.dispatcher.pool("q").active == 4
    third = await srv.dispatch("q", max_wait_s=0)
    assert third["state"] == "no_capacity"
    assert "quota of 4" in third["reason"]


@pytest.mark.parametrize(
    ("ids", "reason"),
    [
        pytest.param([f"AJ_{i}" for i in range(5000)], "names 5000 jobs; at most 1000", id="many"),
        pytest.param(["AJ_" + "x" * 200], "job id over 128 characters", id="long-id"),
    ],
)
async def test_an_oversized_migrate_closes_that_connection(
    srv: Srv, ids: list[str], reason: str
) -> None:
    """A migrate naming more jobs than any worker may run, or an id no job has, is a
    protocol error: that connection closes with the reason, nothing is adopted."""
    good = await bystander(srv)
    hostile = await srv.connect("h", max_jobs=4)
    await hostile.migrate(*ids)
    await hostile.wait_closed()
    assert reason in hostile.close_reason
    assert srv.dispatcher.live_job_count() == 0
    await served(srv, good)


async def test_a_second_worker_cannot_take_over_another_workers_orphaned_job(
    make_server: MakeServer,
) -> None:
    """An orphaned job stays with the identity that lost it (here its `worker_token`): a
    different worker's migrate gets a JobTermination and the job keeps waiting; the real
    worker reconnecting within the grace migrates it back."""
    srv = await make_server(_pool("m", reconnect_grace_s=30))
    victim = await srv.connect("m", worker_token="replica-a")
    job_id = (await srv.dispatch("m"))["job_id"]
    assert await victim.take_job() == job_id
    await victim.abort()
    await srv.wait_state(job_id, "orphaned")
    thief = await srv.connect("m", worker_token="replica-b")
    await thief.migrate(job_id)
    assert await thief.next_termination() == job_id
    job = await srv.job(job_id)
    assert job["state"] == "orphaned"
    assert ("migrate_refused", thief.worker_id) in [
        (e["event"], e["worker_id"]) for e in job["trace"]
    ]
    back = await srv.connect("m", worker_token="replica-a")
    await back.migrate(job_id)
    job = await srv.wait_state(job_id, "running")
    assert job["worker_id"] == back.worker_id
    await back.barrier()
    assert back.pending("termination") == 0


class _FromAddress(ProtoWorker):
    """A ProtoWorker connecting from a given loopback address (127.0.0.0/8 all works)."""

    def __init__(self, *args: Any, local: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.local = local

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(local_addr=(self.local, 0))
        self._session = aiohttp.ClientSession(connector=connector)
        self._ws = await self._session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}"}, autoping=True
        )
        self._reader = asyncio.create_task(self._read())


async def test_workers_declaring_no_identity_are_told_apart_by_address(
    make_server: MakeServer,
) -> None:
    """Without a worker token (plain livekit-agents), the remote address is the identity:
    a worker from another address cannot take the orphan, one from the same address can."""
    srv = await make_server(_pool("m", reconnect_grace_s=30))
    victim = _FromAddress(srv.url, "m", local="127.0.0.2")
    srv.workers.append(victim)
    await victim.connect()
    job_id = (await srv.dispatch("m"))["job_id"]
    assert await victim.take_job() == job_id
    await victim.abort()
    await srv.wait_state(job_id, "orphaned")
    thief = await srv.connect("m")  # from 127.0.0.1
    await thief.migrate(job_id)
    assert await thief.next_termination() == job_id
    back = _FromAddress(srv.url, "m", local="127.0.0.2")
    srv.workers.append(back)
    await back.connect()
    await back.migrate(job_id)
    job = await srv.wait_state(job_id, "running")
    assert job["worker_id"] == back.worker_id


# ------------------------------------------------------------ outbound limit


def _frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client websocket frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def _deaf_worker(srv: Srv, agent_name: str, max_jobs: int) -> socket.socket:
    """A worker that registers and then never reads its socket (tiny receive buffer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    host, port = srv.ts.host, srv.ts.port
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /agent?max_jobs={max_jobs} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {agent_token(KEY, SECRET)}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    reg = agent.RegisterWorkerRequest(type=agent.JobType.JT_ROOM, agent_name=agent_name)
    await loop.sock_sendall(sock, _frame(agent.WorkerMessage(register=reg).SerializeToString()))
    return sock


async def test_a_worker_that_never_reads_is_cut_off_at_the_outbound_limit(
    make_server: MakeServer,
) -> None:
    """Frames queued for a worker that does not read its socket stop at
    `worker_outbound_limit_bytes`: the connection is dropped (it used to be queued for
    without end) and the worker-loss rules apply to it."""
    srv = await make_server({"server": {"worker_outbound_limit_bytes": 65536}})
    good = await bystander(srv)
    sock = await _deaf_worker(srv, "deaf", max_jobs=1000)
    try:
        deaf = await wait_until(
            lambda: next((w for w in srv.dispatcher.workers() if w.agent_name == "deaf"), None),
            what="the deaf worker registered",
        )
        metadata = "m" * 60_000
        for _ in range(300):  # 18 MB of offers at most; the limit is 64 KiB past the buffers
            await srv.dispatch("deaf", metadata=metadata)
            if srv.dispatcher.worker(deaf.id) is None:
                break
        assert srv.dispatcher.worker(deaf.id) is None, "the deaf worker was never cut off"
    finally:
        sock.close()
    await served(srv, good)


# ---------------------------------------------------------------------- load


async def test_a_load_that_is_not_a_number_is_never_served(srv: Srv) -> None:
    """Load NaN or ±inf is ignored (the last valid load stays) and finite loads are clamped
    to [0, 1]: /v1/workers is strict JSON throughout (NaN used to be written as-is)."""
    good = await bystander(srv)
    w = await srv.connect("l")
    expected = []
    for load, seen in [(0.25, 0.25), (math.nan, 0.25), (math.inf, 0.25), (7.5, 1.0),
                       (-math.inf, 1.0), (-2.0, 0.0)]:  # fmt: skip
        await w.status(load=load)
        await w.barrier()
        async with srv.session.get(srv.url + "/v1/workers", headers=srv.auth) as r:
            body = strict_json(await r.text())
        (info,) = [x for x in body["workers"] if x["worker_id"] == w.worker_id]
        expected.append(seen)
        assert info["load"] == pytest.approx(seen)
    await served(srv, good)


# -------------------------------------------------------------------- traces


async def test_answers_for_jobs_never_offered_to_that_worker_grow_nothing(srv: Srv) -> None:
    """5,000 answers for the bystander's job from another worker of its pool add nothing to
    its trace (each used to add an event: 200k answers, 200k events) nor take slots."""
    good = await bystander(srv)
    job_id = (await srv.dispatch("bystander"))["job_id"]
    await srv.wait_state(job_id, "running")
    before = (await srv.job(job_id))["trace"]
    hostile = await srv.connect("bystander", max_jobs=1)
    await hostile.status(full=True)
    for i in range(5000):
        resp = agent.AvailabilityResponse(job_id=job_id, available=i % 2 == 0, terminate=True)
        await hostile.send(agent.WorkerMessage(availability=resp))
    await hostile.barrier()
    job = await srv.job(job_id)
    assert job["trace"] == before
    assert job["state"] == "running"
    assert srv.dispatcher.worker(hostile.worker_id).used == 0
    await good.succeed(job_id)
    await srv.wait_state(job_id, "succeeded")
    await served(srv, good)


async def test_a_jobs_trace_is_capped(make_server: MakeServer) -> None:
    """`[server] max_trace_events`: a job offered to a silent worker, then flooded with its
    late answers, keeps at most that many events, with a counted `trace_truncated`."""
    srv = await make_server(
        {"server": {"max_trace_events": 20}, **_pool("t", availability_timeout_s=0.2)}
    )
    silent = await srv.connect("t", max_jobs=1)
    job_id = (await srv.dispatch("t"))["job_id"]
    assert (await silent.next_offer()).id == job_id
    await srv.wait_state(job_id, "queued")  # timed out on the silent worker
    for _ in range(500):
        await silent.reject(job_id, terminate=False)
    await silent.barrier()
    trace = (await srv.job(job_id))["trace"]
    assert len(trace) == 20
    (marker,) = [e for e in trace if e["event"] == "trace_truncated"]
    assert marker["detail"].endswith("events dropped")
    assert trace[0]["event"] == "requested"


# ----------------------------------------------------------------- terminate


async def test_a_termination_the_worker_never_confirms_ends_cancelled(
    make_server: MakeServer,
) -> None:
    """A worker that ignores JobTermination holds the slot only `terminate_timeout_s`: the
    job ends `cancelled` saying so and the slot goes to the next job."""
    srv = await make_server(_pool("tt", terminate_timeout_s=0.3, max_jobs_per_worker=1))
    w = ProtoWorker(srv.url, "tt", auto="accept", auto_run=True)  # never confirms an end
    srv.workers.append(w)
    await w.connect()
    job_id = (await srv.dispatch("tt"))["job_id"]
    await srv.wait_state(job_id, "running")
    status, _ = await srv.call("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200
    assert await w.next_termination() == job_id
    nxt = (await srv.dispatch("tt"))["job_id"]
    job = await srv.wait_state(job_id, "cancelled")
    assert "did not confirm the termination within 0.3 s" in job["reason"]
    await srv.wait_state(nxt, "running")
    assert srv.dispatcher.worker(w.worker_id).used == 1


# ------------------------------------------------------------ other bounds


async def test_a_bad_agent_name_at_register_closes_the_connection(srv: Srv) -> None:
    """A 1 kB agent name, or one with other characters, is refused at register with the
    rule in the close reason; no pool is made for it."""
    good = await bystander(srv)
    for name in ("x" * 1000, "has space"):
        w = srv.worker(name)
        await w.open()
        await w.register()
        await w.wait_closed()
        assert "agent name" in w.close_reason
    assert {p.name for p in srv.dispatcher.pools()} == {"bystander"}
    await served(srv, good)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("participant_metadata", "m" * 70_000, "metadata exceeds 65536 bytes"),
        ("participant_identity", "i" * 300, "identity exceeds 256 bytes"),
        ("participant_name", "n" * 300, "name exceeds 256 bytes"),
    ],
)
async def test_an_oversized_accept_closes_the_connection(
    srv: Srv, field: str, value: str, reason: str
) -> None:
    """An accept whose participant fields (they go into the room token) exceed REST's
    limits is a protocol error; the job is offered elsewhere."""
    good = await bystander(srv)
    hostile = await srv.connect("bystander", max_jobs=1)
    await good.status(full=True)
    job_id = (await srv.dispatch("bystander"))["job_id"]
    assert (await hostile.next_offer()).id == job_id
    resp = agent.AvailabilityResponse(job_id=job_id, available=True, **{field: value})
    await hostile.send(agent.WorkerMessage(availability=resp))
    await hostile.wait_closed()
    assert reason in hostile.close_reason
    await good.status()
    await srv.wait_state(job_id, "running")
    assert job_id in good.active


async def test_a_huge_job_error_is_cut(srv: Srv) -> None:
    """A failed job's error is kept to 2 KiB in its reason."""
    w = await srv.connect("e", max_jobs=1)
    job_id = (await srv.dispatch("e"))["job_id"]
    await w.take_job()
    await w.fail(job_id, "x" * 500_000)
    job = await srv.wait_state(job_id, "failed")
    assert len(job["reason"]) == 2048
