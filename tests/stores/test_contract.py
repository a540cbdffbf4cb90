"""Every history-store backend passes every check of the contract suite.

To add a backend: write a builder `(request) -> Backend` (it may use fixtures
through `request.getfixturevalue`, e.g. a tmp_path or a database URL) and add
one `pytest.param(builder, id=...)` line to BACKENDS.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from stores.contract import CHECKS, Backend, Check

from trunkline.stores import MemoryHistory


def memory(request: pytest.FixtureRequest) -> Backend:
    return Backend(
        "memory",
        lambda capacity: MemoryHistory() if capacity is None else MemoryHistory(capacity),
        bounded=True,
    )


BACKENDS: list[object] = [
    pytest.param(memory, id="memory"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    build: Callable[[pytest.FixtureRequest], Backend] = request.param
    return build(request)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_contract(backend: Backend, check: Check) -> None:
    """`backend` passes `check` (the check's docstring says what it pins)."""
    await check(backend)
