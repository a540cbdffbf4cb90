"""Three real trunkline servers on one real redis-server: pool ownership,
refusals at non-owners, take-over after kill -9, a paused owner sending
nothing on stale authority (Redis trouble: test_redis_trouble.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
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


async def test_one_owner_others_refuse_naming_it(servers: list[ServerProcess]) -> None:
    """One member owns the pool; the others refuse 503 not_pool_owner naming its URL."""
    owner, epoch = await owner_of(servers)
    assert epoch >= 1

    async def all_members() -> bool:
        v = await view(owner)
        return {m["member"] for m in v["members"]} == {"s0", "s1", "s2"}

    await wait_until(all_members, 5.0, what="three members listed")
    for srv in servers:
        status, body = await dispatch(srv)
        if srv is owner:
            assert status == 201, body
        else:
            assert status == 503, body
            assert body["code"] == "not_pool_owner"
            assert body["owner_url"] == owner.url


async def test_kill_9_of_the_owner_hands_the_pool_to_a_survivor(
    servers: list[ServerProcess],
) -> None:
    """After kill -9 of the owner a survivor owns the pool at a greater epoch within ~a lease."""
    owner, epoch = await owner_of(servers)
    signal_server(owner, signal.SIGKILL)
    t0 = time.monotonic()
    rest = [s for s in servers if s is not owner]
    new, new_epoch = await owner_of(rest, above=epoch)
    took = time.monotonic() - t0
    assert new_epoch > epoch
    assert took < TTL_S + 2.0, took
    status, body = await dispatch(new)
    assert status == 201, body


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
        signal_server(owner, signal.SIGCONT)
        await w.succeed(job)  # frees the slot: the stale owner would now offer the queued job

        async def fenced() -> bool:
            async with aiohttp.ClientSession() as s, s.get(owner.url + "/metrics") as r:
                text = await r.text()
            name = "trunkline_cluster_frames_fenced"
            line = next(x for x in text.splitlines() if x.startswith(name))
            return float(line.split()[-1]) >= 1

        await wait_until(fenced, 10.0, what="the stale owner's offer fenced")
        await w.barrier()
        assert w.offers == [job], w.offers  # nothing after the pause
        status, body = await dispatch(owner)
        assert status == 503, body  # refused at once; names the new owner once re-read

        async def names_owner() -> bool:
            status, body = await dispatch(owner)
            return status == 503 and body["code"] == "not_pool_owner"

        await wait_until(names_owner, TTL_S * 2, what="not_pool_owner after the view refresh")
    finally:
        await w.close()
