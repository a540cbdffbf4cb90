"""Fixtures of the store tests: a real PostgreSQL server for the session.

The contract checks live outside test modules: have pytest rewrite their
asserts anyway, so a failing backend shows the values that differ."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("stores.contract", "stores.contract_usage")

from stores.pgserver import PostgresServer, PostgresUnavailable  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server started for this test session (Debian's binaries,
    a temp directory, a free loopback port). Without the binaries the tests
    that need it are skipped, except in CI (CI=true), where they fail."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    server.start()
    try:
        yield server
    finally:
        server.stop()
