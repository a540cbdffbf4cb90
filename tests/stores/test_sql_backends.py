"""What the SQL backends do beyond the contract: schema versions and forward
migration, survival across reopen, refusal of files and databases they must
not use (with a message naming the fix), private files, index use."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
from pathlib import Path

import asyncpg
import pytest
from stores.backends import FreshSchemaPostgres, fresh_schema_url
from stores.contract import BASE, dataset, newest_first, record
from stores.pgserver import PostgresServer
from support import free_port

from trunkline.stores import JobFilter, JobRecord, StoreError
from trunkline.stores._schema import LATEST
from trunkline.stores.postgres import PostgresHistory, redact
from trunkline.stores.sqlite import SqliteHistory

# Jobs of very different lengths: the time filters must still select by created_at.
LONG = [
    record(n, created_at=BASE + 100 * n, ended_at=BASE + 100 * n + (86400.0 if n % 4 else 1.0))
    for n in range(16)
]
RANGE = JobFilter(since=BASE + 350, until=BASE + 1050)


def sqlite_store(tmp_path: Path, **kw: int) -> SqliteHistory:
    return SqliteHistory(tmp_path / "data" / "history.sqlite3", **kw)


async def _ids(store: SqliteHistory | PostgresHistory, flt: JobFilter) -> list[str]:
    page = await store.query(flt, limit=100)
    return [r.job_id for r in page.records]


# ---------------------------------------------------------------- migrations


async def test_sqlite_migrates_a_version_1_file_forward(tmp_path: Path) -> None:
    """A history file of schema version 1 (before job spans) opens at the
    latest version with its records intact, and created-at ranges over them
    (backfilled spans) select exactly the matching records."""
    old = sqlite_store(tmp_path, schema_version=1)
    await old.open()
    await _add_v1(old, LONG)
    assert await old.schema() == 1
    await old.close()

    new = sqlite_store(tmp_path)
    await new.open()
    try:
        assert await new.schema() == LATEST
        assert await new.count(JobFilter()) == len(LONG)
        assert await _ids(new, RANGE) == newest_first([r for r in LONG if RANGE.matches(r)])
        assert await new.get("J0005") == LONG[5]
    finally:
        await new.close()


async def _add_v1(store: SqliteHistory | PostgresHistory, records: list[JobRecord]) -> None:
    """Insert as a version-1 server did: the jobs table only (no spans table yet)."""
    from trunkline.stores import _sql

    rows = [_sql.to_row(r) for r in records]
    cols = _sql.SELECT_COLUMNS
    if isinstance(store, SqliteHistory):
        marks = ", ".join("?" for _ in _sql.COLUMNS)

        def insert() -> None:
            db = store._w.conn()
            db.executemany(f"INSERT INTO trunkline_jobs ({cols}) VALUES ({marks})", rows)

        await store._w.run(insert)
    else:
        marks = ", ".join(f"${i + 1}" for i in range(len(_sql.COLUMNS)))
        async with store._require().acquire() as conn:
            await conn.executemany(f"INSERT INTO trunkline_jobs ({cols}) VALUES ({marks})", rows)


async def test_postgres_migrates_a_version_1_database_forward(postgres: PostgresServer) -> None:
    """A PostgreSQL history at schema version 1 opens at the latest version
    with its records intact and correct created-at ranges."""
    old = FreshSchemaPostgres(postgres, schema_version=1)
    await old.open()
    await _add_v1(old, LONG)
    assert await old.schema() == 1
    await old.close()

    new = PostgresHistory(old.url)
    await new.open()
    try:
        assert await new.schema() == LATEST
        assert await new.count(JobFilter()) == len(LONG)
        assert await _ids(new, RANGE) == newest_first([r for r in LONG if RANGE.matches(r)])
        assert await new.get("J0005") == LONG[5]
    finally:
        await new.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    """A file written by a newer trunkline (higher schema version) is refused
    at open, untouched, with a message saying so."""
    store = sqlite_store(tmp_path)
    await store.open()
    await store.close()
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE trunkline_schema SET version = 99")
    newer = rf"version 99, newer than this trunkline knows \({LATEST}\)"
    with pytest.raises(StoreError, match=newer):
        await sqlite_store(tmp_path).open()
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT version FROM trunkline_schema").fetchone() == (99,)


async def test_postgres_refuses_a_newer_schema(postgres: PostgresServer) -> None:
    """A PostgreSQL history written by a newer trunkline is refused at open."""
    store = FreshSchemaPostgres(postgres)
    await store.open()
    async with store._require().acquire() as conn:
        await conn.execute("UPDATE trunkline_schema SET version = 7")
    await store.close()
    with pytest.raises(StoreError, match="version 7, newer than this trunkline"):
        await PostgresHistory(store.url).open()


async def test_postgres_servers_starting_together_migrate_once(postgres: PostgresServer) -> None:
    """Several servers opening one new database at once: one migrates, the
    others wait for it and find the schema ready (no error, one version row)."""
    name, url = fresh_schema_url(postgres)
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    stores = [PostgresHistory(url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        async with stores[0]._require().acquire() as c:
            assert await c.fetch("SELECT version FROM trunkline_schema") == [(LATEST,)]
        await asyncio.gather(*(s.add([record(n)]) for n, s in enumerate(stores)))
        assert await stores[1].count(JobFilter()) == 4
    finally:
        await asyncio.gather(*(s.close() for s in stores))


# ------------------------------------------------------------------ reopen


async def test_sqlite_records_survive_reopen(tmp_path: Path) -> None:
    """Records added and the store closed are all there when it is opened again."""
    data = dataset(40)
    store = sqlite_store(tmp_path)
    await store.open()
    for i in range(0, 40, 9):
        await store.add(data[i : i + 9])
    await store.close()
    again = sqlite_store(tmp_path)
    await again.open()
    try:
        assert await again.count(JobFilter()) == 40
        assert await again.get(data[7].job_id) == data[7]
    finally:
        await again.close()


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    """The data directory is created 0700 and the history file 0600 (they
    hold callers' numbers)."""
    store = sqlite_store(tmp_path)
    await store.open()
    await store.add([record(2)])
    await store.close()
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


async def test_concurrent_adds_and_reads_all_land(tmp_path: Path) -> None:
    """Batches added from many tasks at once, with reads in between, are all
    stored; no read fails while the writer works."""
    store = sqlite_store(tmp_path)
    await store.open()
    try:
        data = dataset(200)
        batches = [data[i : i + 10] for i in range(0, 200, 10)]
        reads = [store.query(JobFilter(agent_name="sales"), limit=20) for _ in range(20)]
        await asyncio.gather(*(store.add(b) for b in batches), *reads)
        assert await store.count(JobFilter()) == 200
    finally:
        await store.close()


# ------------------------------------------------------- refused at open


async def test_sqlite_refuses_a_corrupt_file(tmp_path: Path) -> None:
    """A history file that is not SQLite (or damaged) is refused at open with
    a message naming the file and the fix; the file is left as it was."""
    store = sqlite_store(tmp_path)
    store.path.parent.mkdir(parents=True)
    junk = b"this is not a database\n" * 400
    store.path.write_bytes(junk)
    with pytest.raises(StoreError, match=r"is unreadable .*Move it aside") as info:
        await store.open()
    assert str(store.path) in str(info.value)
    assert store.path.read_bytes() == junk


async def test_sqlite_refuses_a_truncated_history(tmp_path: Path) -> None:
    """A real history file cut short (a disk that filled mid-copy) is refused
    at open, not silently replaced."""
    store = sqlite_store(tmp_path)
    await store.open()
    await store.add(dataset(300))
    await store.close()
    raw = store.path.read_bytes()
    store.path.write_bytes(raw[:100] + b"\xff" * (len(raw) - 100))
    with pytest.raises(StoreError, match="unreadable"):
        await sqlite_store(tmp_path).open()


async def test_sqlite_refuses_another_programs_database(tmp_path: Path) -> None:
    """A SQLite file of another program at the history's path is refused (not
    written into)."""
    path = tmp_path / "data" / "history.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match=r"database of another program \(tables: invoices\)"):
        await SqliteHistory(path).open()


async def test_sqlite_refuses_an_unusable_data_dir(tmp_path: Path) -> None:
    """A data directory that cannot be created (a file is in the way) or a
    history path that is a directory give a clear error naming the path."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(StoreError, match=r"cannot create the data directory .*blocker.*data_dir"):
        await SqliteHistory(blocker / "history.sqlite3").open()
    folder = tmp_path / "dir.sqlite3"
    folder.mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        await SqliteHistory(folder).open()


async def test_sqlite_refuses_a_read_only_file(tmp_path: Path) -> None:
    """A history file that opens read-only (here through SQLite's own
    read-only flag, which even root obeys) is refused at open, where the
    migration takes the write lock."""
    store = sqlite_store(tmp_path)
    await store.open()
    await store.close()
    ro = SqliteHistory(store.path)
    ro._connect = lambda: sqlite3.connect(  # type: ignore[method-assign]
        f"file:{store.path}?mode=ro", uri=True, isolation_level=None
    )
    with pytest.raises(StoreError, match=r"cannot be written \(attempt to write a readonly"):
        await ro.open()


async def test_postgres_unreachable_is_refused_quickly() -> None:
    """An unreachable PostgreSQL is refused at open, within the connect
    timeout, naming the URL without its password and what to check."""
    url = f"postgresql://trunkline:s3cret-pw@127.0.0.1:{free_port()}/history"
    store = PostgresHistory(url)
    with pytest.raises(StoreError, match=r"cannot connect .*check \[store\] url") as info:
        await asyncio.wait_for(store.open(), 15.0)
    assert "s3cret-pw" not in str(info.value)
    assert "trunkline:***@127.0.0.1" in str(info.value)


async def test_postgres_unknown_database_is_refused(postgres: PostgresServer) -> None:
    """A database that does not exist on the server is refused at open, naming it."""
    with pytest.raises(StoreError, match=r"nosuchdb.*InvalidCatalogNameError"):
        await PostgresHistory(postgres.url("nosuchdb")).open()


def test_redact_hides_only_the_password() -> None:
    """`redact` replaces the password and keeps everything else of the URL."""
    assert redact("postgresql://u:pw@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


# ---------------------------------------------------------------- indexes


async def test_sqlite_filtered_pages_read_an_index(tmp_path: Path) -> None:
    """The pool + time range and the caller queries read their index in store
    order: no full scan, no sort of the matches (what keeps them fast at a
    million records)."""
    store = sqlite_store(tmp_path)
    await store.open()
    try:
        await store.add([dataclasses.replace(r) for r in dataset(50)])
        cases = {
            "trunkline_jobs_by_pool": JobFilter(agent_name="sales", since=BASE, until=BASE + 99),
            "trunkline_jobs_by_sip_from": JobFilter(caller="+4930111"),
            "trunkline_jobs_by_end": JobFilter(since=BASE + 100),
        }
        for index, flt in cases.items():
            plan = " | ".join(await store.run_read(store.explain, flt))
            assert f"USING INDEX {index}" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
    finally:
        await store.close()
