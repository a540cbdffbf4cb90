"""Fixtures of the cluster tests: a real redis-server for the session.

The contract checks live outside test modules: have pytest rewrite their
asserts anyway, so a failing backend shows the values that differ."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("cluster.contract")

from cluster.redisserver import RedisServer, RedisUnavailable  # noqa: E402


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
