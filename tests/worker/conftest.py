"""Fixtures for worker SDK tests: a fake protocol server and a running Worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from worker.fake_server import FakeServer
from worker.helpers import Events, make_opts, running


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with FakeServer() as server:
        yield server


@pytest.fixture
def events(tmp_path: Path) -> Events:
    return Events(tmp_path / "events.jsonl")


@pytest.fixture
def run_worker(fake: FakeServer) -> Callable[..., Any]:
    def start(**overrides: Any) -> Any:
        return running(make_opts(fake.url, **overrides))

    return start
