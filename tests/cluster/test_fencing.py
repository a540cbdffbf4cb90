"""Three real trunkline servers on one real redis-server: an owner paused past
its lease sends nothing on its stale authority."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from cluster.conftest import redis_or_skip
from cluster.redisserver import RedisServer
from cluster.servers import POOL, TTL_S, cluster_of, owner_of, signal_server
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


async def test_paused_owner_sends_nothing_on_stale_authority(
    servers: list[ServerProcess],
) -> None:
    """An owner SIGSTOPped past its lease, then resumed, sends no offer: its frames are fenced."""
    owner, epoch = await owner_of(servers)
    w = ProtoWorker(owner.url, POOL, max_jobs=1)
    await w.connect()
    try:
        status, _ = await dispatch(owner)
        assert status == 201
        job = await w.take_job()
        status, queued = await dispatch(owner)  # waits: the worker is full
        assert status == 201, queued
        assert queued["state"] == "queued", queued
        signal_server(owner, signal.SIGSTOP)
        rest = [s for s in servers if s is not owner]
        _, new_epoch = await owner_of(rest, within=TTL_S * 5, above=epoch)
        assert new_epoch > epoch
        # Sent while it is paused, read first when it resumes: the freed slot
        # makes the stale owner offer the queued job at once.
        await w.succeed(job)
        signal_server(owner, signal.SIGCONT)

        async def fenced() -> bool:
            async with aiohttp.ClientSession() as s, s.get(owner.url + "/metrics") as r:
                text = await r.text()
            name = "trunkline_cluster_frames_fenced"
            line = next(x for x in text.splitlines() if x.startswith(name))
            return float(line.split()[-1]) >= 1

        await wait_until(fenced, 10.0, what="the stale owner's offer fenced")
        # Having lost the pool it lets its worker go, to reconnect to the owner.
        await w.wait_closed()
        assert w.offers == [job], w.offers  # nothing after the pause
        assert w.pending("availability") == 0
    finally:
        await w.close()
