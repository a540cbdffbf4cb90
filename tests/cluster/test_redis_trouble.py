"""Three real trunkline servers on one real redis-server, and Redis in
trouble: unreachable for 10 s (paused), restarted without its data."""

from __future__ import annotations

import time

from cluster.redisserver import RedisServer
from cluster.servers import POOL, TTL_S, dispatch, owner_of, view
from protoworker import ProtoWorker
from support import ServerProcess, wait_until


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
