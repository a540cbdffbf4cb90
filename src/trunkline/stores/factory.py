"""The one place a configuration becomes a history store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trunkline.stores.memory import MemoryHistory
from trunkline.stores.protocol import HistoryStore

if TYPE_CHECKING:  # the writer process imports the stores, not the config
    from trunkline.config import Config

SQLITE_FILE = "history.sqlite3"


def create_store(config: Config) -> HistoryStore:
    """The (unopened) history store `config.store` names: memory (keeping
    `[server] history_size` records), SQLite in the data directory, or
    PostgreSQL at `[store] url`; a SQL store's writes in a child process
    unless `[store] writer = "thread"`. The caller opens it, which is where an
    unusable store is reported (`StoreError`)."""
    store = config.store
    if store.backend == "memory":
        return MemoryHistory(config.server.history_size)
    inner: HistoryStore
    if store.backend == "postgresql":
        from trunkline.stores.postgres import PostgresHistory

        inner = PostgresHistory(store.url)
    else:
        from trunkline.config import data_dir
        from trunkline.stores.sqlite import SqliteHistory

        inner = SqliteHistory(data_dir(config.server) / SQLITE_FILE)
    if store.writer == "thread":
        return inner
    from trunkline.stores.offload import OffloadedStore

    return OffloadedStore(inner)
