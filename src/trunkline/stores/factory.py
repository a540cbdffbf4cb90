"""The one place a configuration becomes a history store."""

from __future__ import annotations

from trunkline.config import Config, data_dir
from trunkline.stores.memory import MemoryHistory
from trunkline.stores.protocol import HistoryStore

SQLITE_FILE = "history.sqlite3"


def create_store(config: Config) -> HistoryStore:
    """The (unopened) history store `config.store` names: memory (keeping
    `[server] history_size` records), SQLite in the data directory, or
    PostgreSQL at `[store] url`. The caller opens it, which is where an
    unusable store is reported (`StoreError`)."""
    store = config.store
    if store.backend == "memory":
        return MemoryHistory(config.server.history_size)
    if store.backend == "postgresql":
        from trunkline.stores.postgres import PostgresHistory

        return PostgresHistory(store.url)
    from trunkline.stores.sqlite import SqliteHistory

    return SqliteHistory(data_dir(config.server) / SQLITE_FILE)
