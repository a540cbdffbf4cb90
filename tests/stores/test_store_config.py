"""`[store]` and `[server] data_dir`: defaults, what implies what, and every
mistake reported at once through the config's one ErrorCollector."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import KEY, SECRET

from trunkline.config import ConfigError, StoreConfig, data_dir, default_data_dir, parse_config
from trunkline.stores import MemoryHistory, create_store
from trunkline.stores._schema import LATEST
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory


def test_defaults_are_sqlite_90_days_a_million_records() -> None:
    """No [store]: SQLite in the default data dir, 90 days, 1,000,000 records,
    written by the history writer process."""
    cfg = parse_config({"keys": {KEY: SECRET}})
    assert cfg.store == StoreConfig("sqlite", "", 90.0, 1_000_000, "process")
    store = create_store(cfg)
    assert isinstance(store, OffloadedStore)
    assert isinstance(store.inner, SqliteHistory)
    path = default_data_dir() / "history.sqlite3"
    assert store.inner.path == path
    assert store.spec == ("sqlite", str(path), LATEST)


def test_writer_thread_keeps_the_writes_in_the_server() -> None:
    """`writer = "thread"`: the plain store, its writes on a server thread;
    memory has no writer to move (the key is accepted and changes nothing)."""
    cfg = parse_config({"keys": {KEY: SECRET}, "store": {"writer": "thread"}})
    assert isinstance(create_store(cfg), SqliteHistory)
    pg = {"url": "postgresql://u@h/db", "writer": "thread"}
    assert isinstance(
        create_store(parse_config({"keys": {KEY: SECRET}, "store": pg})), PostgresHistory
    )
    mem = {"backend": "memory", "writer": "process"}
    assert isinstance(
        create_store(parse_config({"keys": {KEY: SECRET}, "store": mem})), MemoryHistory
    )


def test_default_data_dir_follows_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$XDG_STATE_HOME/trunkline when set (absolute), else ./trunkline-data."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "trunkline"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / "trunkline-data"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the spec wants absolute
    assert default_data_dir() == tmp_path / "trunkline-data"


def test_data_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A relative data_dir is taken from the working directory at start."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"keys": {KEY: SECRET}, "server": {"data_dir": "state"}})
    assert data_dir(cfg.server) == tmp_path / "state"


def test_url_implies_postgresql_and_memory_is_kept() -> None:
    """A url alone means backend postgresql; backend memory keeps history_size."""
    cfg = parse_config({"keys": {KEY: SECRET}, "store": {"url": "postgresql://u@h/db"}})
    assert cfg.store.backend == "postgresql"
    store = create_store(cfg)
    assert isinstance(store, OffloadedStore)
    assert isinstance(store.inner, PostgresHistory)
    assert store.inner.url == "postgresql://u@h/db"
    assert store.spec == ("postgresql", "postgresql://u@h/db", LATEST)
    mem = parse_config(
        {"keys": {KEY: SECRET}, "server": {"history_size": 7}, "store": {"backend": "memory"}}
    )
    made = create_store(mem)
    assert isinstance(made, MemoryHistory)
    assert made.capacity == 7


def test_every_store_mistake_is_reported_at_once() -> None:
    """Unknown keys, bad values and contradictions in [store] and [server]
    data_dir come back together, each naming the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "keys": {KEY: SECRET},
                "server": {"data_dir": ""},
                "store": {
                    "backend": "redis",
                    "url": "mysql://x",
                    "retention_days": -1,
                    "max_records": 1.5,
                    "writer": "fork",
                    "path": "x",
                },
            }
        )
    assert info.value.errors == (
        "server.data_dir: must be a directory path (got '')",
        "store.path: unknown key; allowed: backend, url, retention_days, max_records, writer",
        "store.backend: must be one of memory, sqlite, postgresql (got 'redis')",
        "store.url: must be a postgresql://user:password@host:port/database URL (got 'mysql://x')",
        "store.retention_days: must be a number >= 0 (got -1)",
        "store.max_records: must be an integer >= 0 (got 1.5)",
        "store.writer: must be one of process, thread (got 'fork')",
    )


@pytest.mark.parametrize(
    ("store", "error"),
    [
        ({"backend": "postgresql"}, 'store.url: is required with backend "postgresql"'),
        (
            {"backend": "sqlite", "url": "postgresql://h/db"},
            "store.url: is only for backend \"postgresql\" (backend is 'sqlite')",
        ),
        ("sqlite", "store: must be a table"),
    ],
)
def test_contradictions_are_refused(store: object, error: str) -> None:
    """A backend and a url that do not go together are refused, saying why."""
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": {KEY: SECRET}, "store": store})
    assert any(e.startswith(error) for e in info.value.errors), info.value.errors
