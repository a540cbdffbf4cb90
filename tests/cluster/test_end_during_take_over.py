"""Three real trunkline servers on one real redis-server: a call that ends
while its worker reconnects after the owner's kill -9 is ended, not placed
again, by the new owner (runtime/cluster_jobs.ClusterFence)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cluster.redisserver import RedisServer
from cluster.servers import POOL, cluster_of, dispatch, owner_of, signal_server
from protoworker import ProtoWorker
from support import ServerProcess, wait_until

from trunkline.cluster import create_coordinator


@pytest.fixture
async def slow_settle(tmp_path: Path, redis: RedisServer) -> AsyncIterator[list[ServerProcess]]:
    """Three members whose take-over waits up to 5 s for workers (plenty of
    time for the end report to arrive before anything is placed again)."""
    started = cluster_of(tmp_path, redis.url, 3, cluster="settle_s = 5")
    try:
        yield started
    finally:
        for srv in started:
            srv.stop()


async def test_a_call_that_ended_while_its_worker_reconnected_is_not_placed_again(
    slow_settle: list[ServerProcess], redis: RedisServer
) -> None:
    """Owner kill -9 with one call running; the call ends while its worker is cut
    off, so the worker comes back at a survivor with no job to migrate and
    reports the end: the new owner takes it as the job's end (succeeded,
    record deleted, counted) and never offers the job again."""
    servers = slow_settle
    owner, epoch = await owner_of(servers)
    edge = next(s for s in servers if s is not owner)
    w = ProtoWorker.autonomous(edge.url, POOL, max_jobs=4)
    await w.connect()
    again: ProtoWorker | None = None
    store = create_coordinator(redis.url, namespace="t", timeout_s=2.0)
    try:
        status, body = await dispatch(edge)
        assert status == 201, body
        job = body["job_id"]
        await wait_until(lambda: job in w.active, 10.0, what="the call runs")

        async def recorded() -> bool:
            return job in await store.records(POOL)

        await wait_until(recorded, 10.0, what="its record written")
        signal_server(owner, signal.SIGKILL)
        await w.wait_closed()
        survivors = [s for s in servers if s is not owner]
        new, _ = await owner_of(survivors, above=epoch)
        again = ProtoWorker.autonomous(edge.url, POOL, max_jobs=4)
        await again.connect()
        await again.succeed(job)  # the end it could not send before

        async def state() -> str:
            async with (
                aiohttp.ClientSession(headers=new.headers()) as s,
                s.get(f"{new.url}/v1/jobs/{job}") as r,
            ):
                return str((await r.json())["state"]) if r.status == 200 else "missing"

        async def ended() -> bool:
            return await state() == "succeeded"

        await wait_until(ended, 10.0, what="the job ended at the new owner")

        async def record_gone() -> bool:
            return job not in await store.records(POOL)

        await wait_until(record_gone, 10.0, what="its record deleted")

        async def counted() -> bool:
            async with aiohttp.ClientSession() as s, s.get(new.url + "/metrics") as r:
                text = await r.text()
            name = "trunkline_cluster_ends_adopted_total"
            line = next(x for x in text.splitlines() if x.startswith(name))
            return float(line.split()[-1]) == 1

        await wait_until(counted, 10.0, what="the end counted")
        await again.barrier()
        assert again.offers == []  # not placed again
        assert w.offers == [job]  # offered once, at the old owner
    finally:
        await store.close()
        await w.close()
        if again is not None:
            await again.close()
