"""Every replica provider passes the one provider contract (contract.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from providers.backends import fake_backend, kubernetes_backend, local_backend
from providers.contract import ALL_CHECKS, Backend


@pytest.fixture(params=["local", "fake", "kubernetes"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        async with local_backend(tmp_path / "run") as b:
            yield b
    elif request.param == "kubernetes":
        async with kubernetes_backend(tmp_path / "cluster") as b:
            yield b
    else:
        yield fake_backend()


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_provider_keeps_the_contract(
    backend: Backend, check: Callable[[Backend], Awaitable[None]]
) -> None:
    """The provider keeps the rule the check's docstring states."""
    await check(backend)
