"""Every history-store backend passes every check of the contract suite.

To add a backend: write a builder `(request) -> Backend` in
`stores/backends.py` (it may use fixtures through `request.getfixturevalue`,
e.g. a tmp_path or the session's PostgreSQL server) and add one
`pytest.param(builder, id=...)` line to BACKENDS.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from stores.backends import memory, postgresql, postgresql_process, sqlite, sqlite_process
from stores.contract import CHECKS, Backend, Check

BACKENDS: list[object] = [
    pytest.param(memory, id="memory"),
    pytest.param(sqlite, id="sqlite"),
    pytest.param(postgresql, id="postgresql"),
    # The default for SQL stores: writes in the history writer process.
    pytest.param(sqlite_process, id="sqlite-process"),
    pytest.param(postgresql_process, id="postgresql-process"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    build: Callable[[pytest.FixtureRequest], Backend] = request.param
    return build(request)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_contract(backend: Backend, check: Check) -> None:
    """`backend` passes `check` (the check's docstring says what it pins)."""
    await check(backend)
