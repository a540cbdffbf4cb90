"""Three real trunkline servers on one real redis-server, and Redis in
trouble: unreachable for 10 s (paused), restarted without its data."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster.conftest import redis_or_skip
from cluster.redisserver import RedisServer
from cluster.servers import POOL, TTL_S, cluster_of, owner_of, signal_server, view
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


async def test_redis_unreachable_for_10_s_refuses_then_recovers(
    servers: list[ServerProcess], redis: RedisServer
) -> None:
    """Redis paused 10 s: running calls go on, requests get cluster_unavailable, then recovery."""
    owner, epoch = await owner_of(servers)
    w = ProtoWorker(owner.url, POOL, max_jobs=4)
    await w.connect()
    try:
        status, _ = await dispatch(owner)
        assert status == 201
        job = await w.take_job()
        redis.pause()
        t0 = time.monotonic()
        try:

            async def refused() -> bool:
                status, body = await dispatch(owner)
                return status == 503 and body["code"] == "cluster_unavailable"

            await wait_until(refused, TTL_S * 4, what="cluster_unavailable while Redis is away")
            v = await view(owner)
            assert v["store"] != "ok"
            await wait_until(lambda: time.monotonic() - t0 >= 10.0, 15.0, what="10 s outage")
            await w.barrier()
            assert w.terminated == []
            assert w.active == {job}
        finally:
            redis.resume()
        new, _ = await owner_of(servers, within=10.0, above=epoch)
        status, body = await dispatch(new)
        assert status == 201, body
    finally:
        await w.close()


async def test_redis_restarted_without_data_epochs_keep_growing(
    servers: list[ServerProcess], redis: RedisServer
) -> None:
    """Redis restarted empty: a member takes the pool again, at an epoch above the old one."""
    _, epoch = await owner_of(servers)
    redis.restart()
    new, _ = await owner_of(servers, within=10.0, above=epoch)
    status, body = await dispatch(new)
    assert status == 201, body
