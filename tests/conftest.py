"""Fixtures for every test directory.

Each test gets a data directory of its own: `XDG_STATE_HOME` points at a
fresh, not yet created path, so a server built in-process or started as a
child process (which inherits the environment) keeps its SQLite history
there (the default `[server] data_dir` is `$XDG_STATE_HOME/trunkline`), never
in the working tree or another test's history."""

from __future__ import annotations

import itertools

import pytest

_state_dirs = itertools.count()


@pytest.fixture(autouse=True)
def _private_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp() / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(base / str(next(_state_dirs))))
