"""Fixtures for every test directory.

Each test gets a data directory of its own: `XDG_STATE_HOME` points at a
fresh, not yet created path, so a server built in-process or started as a
child process (which inherits the environment) keeps its SQLite history
there (the default `[server] data_dir` is `$XDG_STATE_HOME/trunkline`), never
in the working tree or another test's history. Module-scoped fixtures (a
server shared by a module's tests) start before any test's own directory is
set, so each module gets one too, set before them (autouse fixtures of a scope
run before that scope's other fixtures)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

_state_dirs = itertools.count()


@pytest.fixture(autouse=True)
def _private_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp() / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(base / str(next(_state_dirs))))


@pytest.fixture(autouse=True, scope="module")
def _module_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.getbasetemp() / "state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(base / f"module-{next(_state_dirs)}"))
        yield
