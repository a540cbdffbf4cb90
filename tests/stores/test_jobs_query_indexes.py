"""Schema version 4: every jobs index carries created_at (pool and state each
other's column too), on a new history and on one migrated from version 3
with records in it, in SQLite and PostgreSQL; SQLite answers a pool + time
range page and a pool + outcome page from the index without a sort."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
from stores.backends import FreshSchemaPostgres
from stores.contract import BASE, dataset, newest_first
from stores.pgserver import PostgresServer

from trunkline.stores import JobFilter
from trunkline.stores._sql import INDEXED
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory

INDEXES = ("trunkline_jobs_by_end", *(f"trunkline_jobs_by_{name}" for name, _ in INDEXED))
EXTRA = {"trunkline_jobs_by_pool": ["state"], "trunkline_jobs_by_state": ["agent_name"]}
QUERIES = (
    JobFilter(agent_name="sales", since=BASE + 50, until=BASE + 300),
    JobFilter(agent_name="sales", states=frozenset({"no_capacity", "failed"})),
    JobFilter(caller="+4930111", since=BASE + 100),
)


def sqlite_columns(path: Path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as db:
        return {
            name: [row[2] for row in db.execute(f"PRAGMA index_info({name})")] for name in INDEXES
        }


def want(name: str) -> list[str]:
    lead = [] if name == "trunkline_jobs_by_end" else [_lead(name)]
    return [*lead, "ended_at", "job_id", "created_at", *EXTRA.get(name, [])]


def _lead(name: str) -> str:
    return dict((f"trunkline_jobs_by_{n}", col) for n, col in INDEXED)[name]


@pytest.mark.parametrize("start", [3, 4])
async def test_sqlite_indexes_carry_created_at(tmp_path: Path, start: int) -> None:
    """A new file, and a version-3 file with records reopened at the latest,
    have the version-4 indexes; queries answer exactly as before."""
    path = tmp_path / "history.sqlite3"
    records = dataset(60)
    old = SqliteHistory(path, schema_version=start)
    await old.open()
    await old.add(records)
    await old.close()
    store = SqliteHistory(path)
    await store.open()
    try:
        assert sqlite_columns(path) == {name: want(name) for name in INDEXES}
        for flt in QUERIES:
            page = await store.query(flt, limit=100)
            assert [r.job_id for r in page.records] == newest_first(
                [r for r in records if flt.matches(r)]
            )
            plan = " | ".join(await store.run_read(store.explain, flt))
            assert "TEMP B-TREE" not in plan, plan
    finally:
        await store.close()


async def test_postgres_indexes_carry_created_at(postgres: PostgresServer) -> None:
    """PostgreSQL migrated from version 3 with records has the same indexes."""
    records = dataset(40)
    old = FreshSchemaPostgres(postgres, schema_version=3)
    await old.open()
    await old.add(records)
    await old.close()
    store = PostgresHistory(old.url)
    await store.open()
    try:
        conn = await asyncpg.connect(postgres.url())
        try:
            rows = await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1",
                old.schema_name,
            )
        finally:
            await conn.close()
        defs = {r["indexname"]: r["indexdef"] for r in rows}
        for name in INDEXES:
            cols = defs[name].split("(", 1)[1].split(")", 1)[0]
            assert [c.strip() for c in cols.split(",")] == want(name), defs[name]
        flt = QUERIES[0]
        page = await store.query(flt, limit=100)
        assert [r.job_id for r in page.records] == newest_first(
            [r for r in records if flt.matches(r)]
        )
    finally:
        await store.close()
