"""Three real trunkline servers on one real redis-server: kill -9 of the owner
with calls running (workers reconnect to survivors and migrate)."""

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


async def test_kill_9_of_the_owner_with_calls_running_cuts_none(
    servers: list[ServerProcess],
) -> None:
    """Owner kill -9 with 8 calls running: workers reconnect and migrate to the new
    owner, no call is cut or started twice, the cap holds after, every job ends once."""
    owner, epoch = await owner_of(servers)
    workers = [ProtoWorker.autonomous(srv.url, POOL, max_jobs=4) for srv in servers]
    for w in workers:
        await w.connect()
    fresh: list[ProtoWorker] = []
    try:
        ids = []
        for i in range(8):
            status, body = await dispatch(servers[i % 3])
            assert status == 201, body
            ids.append(body["job_id"])
        await wait_until(lambda: sum(len(w.active) for w in workers) == 8, 10.0, what="8 running")
        signal_server(owner, signal.SIGKILL)
        for w in workers:
            await w.wait_closed()  # directly, or through a survivor's pipe
        survivors = [s for s in servers if s is not owner]
        new, _ = await owner_of(survivors, above=epoch)
        # Each worker comes back (to a survivor, as a load balancer would
        # send it) and says which of its jobs still run.
        for i, w in enumerate(workers):
            again = ProtoWorker.autonomous(survivors[i % 2].url, POOL, max_jobs=4)
            await again.connect()
            await again.migrate(*sorted(w.active))
            fresh.append(again)

        async def all_running_at_new_owner() -> bool:
            states = [(await new.get(f"/v1/jobs/{j}"))["state"] for j in ids]
            return states == ["running"] * 8

        await wait_until(all_running_at_new_owner, 10.0, what="8 adopted by the new owner")
        more = []
        for i in range(5):  # 12 slots, 8 held: 4 placed, 1 waits
            status, body = await dispatch(survivors[i % 2])
            assert status == 201, body
            more.append(body["job_id"])
        await wait_until(lambda: sum(len(w.active) for w in fresh) == 4, 10.0, what="4 more placed")
        for old, again in zip(workers, fresh, strict=True):
            await again.barrier()
            assert len(old.active) + len(again.active) <= 4  # the cap, across the failover
            assert again.terminated == []  # no running call cut
        for old, again in zip(workers, fresh, strict=True):
            for job in sorted(old.active | again.active):
                await again.succeed(job)
        await wait_until(
            lambda: any(more[-1] in w.active for w in fresh), 10.0, what="the 13th placed"
        )
        for w in fresh:
            if more[-1] in w.active:
                await w.succeed(more[-1])
        offered = [j for w in workers + fresh for j in w.offers]
        assert sorted(offered) == sorted(ids + more)  # each offered (and started) once

        async def ended() -> bool:
            states = [(await new.get(f"/v1/jobs/{j}"))["state"] for j in ids + more]
            return states == ["succeeded"] * 13

        await wait_until(ended, 10.0, what="every job ended once, succeeded")
    finally:
        for w in workers + fresh:
            await w.close()
