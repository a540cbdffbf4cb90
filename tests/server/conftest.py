"""Fixtures: a real trunkline app served in the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from server.helpers import Srv
from support import KEY, SECRET

from trunkline.config import parse_config
from trunkline.server.app import build_app

MakeServer = Callable[..., Awaitable[Srv]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """`await make_server({toml-as-dict})` → a started `Srv` (the test key)."""
    started: list[Srv] = []

    async def make(config: dict[str, Any] | None = None) -> Srv:
        app = build_app(parse_config({"keys": {KEY: SECRET}, **(config or {})}))
        ts = TestServer(app, host="127.0.0.1")
        await ts.start_server()
        srv = Srv(ts)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.close()


@pytest.fixture
async def srv(make_server: MakeServer) -> Srv:
    """A server with default pools (unknown capacity, 10 s queue wait)."""
    return await make_server()
