"""Fixtures of the cluster tests: a real redis-server for the session
(`redis_server`), one of a test's own (`redis`: tests restart and pause it),
and three `trunkline serve` members on it (`servers`).

The contract checks live outside test modules: have pytest rewrite their
asserts anyway, so a failing backend shows the values that differ."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("cluster.contract")

from cluster.redisserver import RedisServer, RedisUnavailable  # noqa: E402
from cluster.servers import cluster_of, signal_server  # noqa: E402
from support import ServerProcess  # noqa: E402


def redis_or_skip() -> RedisServer:
    """A not yet started RedisServer; skipped without the binary, except in
    CI (CI=true), where that fails."""
    try:
        return RedisServer()
    except RedisUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (Debian's binary, a temp directory,
    a free loopback port)."""
    server = redis_or_skip()
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
    """Three members s0, s1, s2 on `redis`, listening; stopped afterwards
    (a paused one is resumed first, so it can be stopped)."""
    started = cluster_of(tmp_path, redis.url, 3)
    try:
        yield started
    finally:
        for srv in started:
            if srv.proc is not None and srv.proc.poll() is None:
                signal_server(srv, signal.SIGCONT)
            srv.stop()
