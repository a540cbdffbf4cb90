"""Fixtures for operator-view tests: protocol-level workers closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from protoworker import ProtoWorker


@pytest.fixture
async def workers() -> AsyncIterator[list[ProtoWorker]]:
    """A list the test appends its started ProtoWorkers to; each is closed afterwards."""
    started: list[ProtoWorker] = []
    yield started
    for w in started:
        await w.close()
