"""Every coordination backend passes the one contract suite (contract.py):
the in-memory double and a real redis-server."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from cluster.contract import CHECKS
from cluster.redisserver import RedisServer

from trunkline.cluster import ClusterUnavailable, Coordinator, MemoryCoordinator, create_coordinator

_ns = itertools.count()


@pytest.fixture(params=["memory", "redis"])
async def coordinator(request: pytest.FixtureRequest) -> AsyncIterator[Coordinator]:
    """A fresh store: the in-memory double on the real clock, or real Redis
    under a namespace of its own."""
    if request.param == "memory":
        yield MemoryCoordinator(time.monotonic)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    c = create_coordinator(server.url, namespace=f"t{next(_ns)}", timeout_s=2.0)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
async def test_contract(
    coordinator: Coordinator, check: Callable[[Coordinator], Awaitable[None]]
) -> None:
    """The backend meets one contract check (named in the test id)."""
    await check(coordinator)


async def test_redis_unreachable_raises_cluster_unavailable() -> None:
    """A Redis nobody listens on is ClusterUnavailable on every call, quickly."""
    from support import free_port

    c = create_coordinator(f"redis://127.0.0.1:{free_port()}/0", namespace="x", timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(ClusterUnavailable):
        await c.acquire("p", "a", 1000)
    with pytest.raises(ClusterUnavailable):
        await c.members()
    assert time.monotonic() - t0 < 2.0
    await c.close()


async def test_memory_double_down_raises() -> None:
    """The double's outage switch makes every call ClusterUnavailable, and lifting it recovers."""
    c = MemoryCoordinator(time.monotonic)
    c.down = True
    with pytest.raises(ClusterUnavailable):
        await c.ping()
    c.down = False
    assert await c.acquire("p", "a", 1000) == 1


async def test_redis_restart_without_data_keeps_epochs_growing(redis_server: RedisServer) -> None:
    """After Redis lost everything, an acquire with the seen floor still gets a greater epoch."""
    server = RedisServer()
    server.start()
    try:
        c = create_coordinator(server.url, namespace="r", timeout_s=1.0)
        assert await c.acquire("p", "a", 10_000) == 1
        server.restart()  # no persistence: the epoch counter is gone
        with pytest.raises(ClusterUnavailable):
            await c.ping()  # the old connection broke
        assert await c.acquire("p", "b", 10_000, floor=1) == 2
        await c.close()
    finally:
        server.stop()
