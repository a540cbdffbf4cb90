"""Three real trunkline servers on one real redis-server carrying calls: the
13-call burst with workers spread over the members."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster.conftest import redis_or_skip
from cluster.redisserver import RedisServer
from cluster.servers import POOL, cluster_of, owner_of, signal_server
from protoworker import ProtoWorker
from support import ServerProcess, wait_until


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (tests restart and pause it)."""
    server = redis_or_skip()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def servers(tmp_path: Path, redis: RedisServer) -> AsyncIterator[list[ServerProcess]]:
    started = cluster_of(tmp_path, redis.url, 3)
    try:
        yield started
    finally:
        for srv in started:
            if srv.proc is not None and srv.proc.poll() is None:
                signal_server(srv, signal.SIGCONT)
            srv.stop()


async def dispatch(srv: ServerProcess, max_wait_s: float = 30.0) -> tuple[int, dict[str, object]]:
    status, body = await srv.post("/v1/dispatches", {"agent_name": POOL, "max_wait_s": max_wait_s})
    return status, body


async def test_burst_of_13_through_three_members_holds_the_cap(
    servers: list[ServerProcess],
) -> None:
    """13 calls sent round-robin to three members, one cap-4 worker on each: cap held, none lost."""
    owner, _ = await owner_of(servers)
    workers = [ProtoWorker.autonomous(srv.url, POOL, max_jobs=4) for srv in servers]
    for w in workers:
        await w.connect()  # the non-owners pipe theirs to the owner
    try:
        ids = []
        for i in range(13):
            status, body = await dispatch(servers[i % 3])  # non-owners forward to the owner
            assert status == 201, body
            ids.append(body["job_id"])
        assert len(set(ids)) == 13
        await wait_until(lambda: sum(len(w.active) for w in workers) == 12, 10.0, what="12 running")
        for w in workers:
            await w.barrier()
            assert len(w.active) == 4  # the cap, whatever member the worker is connected to
        queued = await owner.get(f"/v1/jobs/{ids[-1]}")
        assert queued["state"] == "queued", queued
        first = next(iter(workers[1].active))
        await workers[1].succeed(first)
        await wait_until(lambda: ids[-1] in workers[1].active, 10.0, what="13th placed")
        for w in workers:
            for job in list(w.active):
                await w.succeed(job)
        offered = [j for w in workers for j in w.offers]
        assert sorted(offered) == sorted(ids)  # each job offered once, to one worker

        async def all_ended() -> bool:
            states = [(await owner.get(f"/v1/jobs/{j}"))["state"] for j in ids]
            return states == ["succeeded"] * 13

        await wait_until(all_ended, 10.0, what="13 succeeded")
        for w in workers:
            assert w.terminated == []
    finally:
        for w in workers:
            await w.close()
