"""Builders of every history-store backend for the contract suite and the
other store tests: `(request) -> Backend`, fixtures through `request`."""

from __future__ import annotations

import itertools

import asyncpg
import pytest
from stores.contract import Backend
from stores.pgserver import PostgresServer

from trunkline.stores import MemoryHistory
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory

_schemas = itertools.count(1)


def fresh_schema_url(server: PostgresServer) -> tuple[str, str]:
    """(schema name, URL whose connections use it): a private, empty
    namespace per store, created by the store's first `open`."""
    name = f"t{next(_schemas)}"
    return name, f"{server.url()}?search_path={name}"


def memory(request: pytest.FixtureRequest) -> Backend:
    return Backend(
        "memory",
        lambda capacity: MemoryHistory() if capacity is None else MemoryHistory(capacity),
        bounded=True,
    )


def sqlite(request: pytest.FixtureRequest) -> Backend:
    tmp = request.getfixturevalue("tmp_path")
    n = itertools.count()
    return Backend(
        "sqlite", lambda _capacity: SqliteHistory(tmp / f"h{next(n)}" / "history.sqlite3")
    )


def offloaded_sqlite(path: object) -> OffloadedStore:
    """SQLite at `path`, its writes in the history writer process (the default)."""
    return OffloadedStore(SqliteHistory(str(path)))


def sqlite_process(request: pytest.FixtureRequest) -> Backend:
    tmp = request.getfixturevalue("tmp_path")
    n = itertools.count()
    return Backend(
        "sqlite-process",
        lambda _capacity: offloaded_sqlite(tmp / f"h{next(n)}" / "history.sqlite3"),
    )


class FreshSchemaPostgres(PostgresHistory):
    """A PostgresHistory in a schema of its own, created on first open."""

    def __init__(self, server: PostgresServer, **kw: object) -> None:
        self.schema_name, url = fresh_schema_url(server)
        self.admin_url = server.url()
        super().__init__(url, **kw)  # type: ignore[arg-type]
        self._created = False

    async def open(self) -> None:
        if not self._created:
            conn = await asyncpg.connect(self.admin_url)
            try:
                await conn.execute(f"CREATE SCHEMA {self.schema_name}")
            finally:
                await conn.close()
            self._created = True
        await super().open()


def postgresql(request: pytest.FixtureRequest) -> Backend:
    server = request.getfixturevalue("postgres")
    return Backend("postgresql", lambda _capacity: FreshSchemaPostgres(server))


def postgresql_process(request: pytest.FixtureRequest) -> Backend:
    server = request.getfixturevalue("postgres")

    # FreshSchemaPostgres's open (in the server) creates the schema the child opens.
    return Backend("postgresql-process", lambda _: OffloadedStore(FreshSchemaPostgres(server)))
