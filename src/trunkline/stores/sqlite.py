"""SQLite job history: the embedded default, one file under the data directory.

Theory of operation
-------------------
The standard library's `sqlite3` blocks, so the store never calls it on the
event loop: each of its two connections lives on a thread of its own, and a
coroutine hands that thread one function at a time (`_Thread.run`). The
writer thread does every write (`add`, `prune`, the migration at `open`, the
usage report, which may fill its cache), one transaction each, so writes
never contend with each other; the reader thread answers `get`, `query`,
`count` and `scale_events` in parallel with it, which WAL mode allows
(readers see the last committed transaction and never wait for the writer).
Rows are built and parsed on those threads too, so a big batch does not hold
the loop; an add builds each INSERT statement's rows just before running it,
so the writer thread holds the GIL (which the event loop needs) for one
statement's rows at a time, and SQLite's own work, the bulk of it, runs
without the GIL.

Durability: WAL with `synchronous=NORMAL`. A committed batch survives the
server being killed (even `kill -9`): it is in the WAL file, which the next
open replays. A power loss or kernel crash may take back the last few
committed transactions (the database stays consistent); see docs/history.md.

The file and its directory are created on `open` (directory 0700, file 0600:
the history holds callers' numbers), the schema migrated forward (see
`trunkline.stores._sql`). A file that is not SQLite, a SQLite file of another
program, a schema newer than this code or a directory that cannot be written
raise `StoreError` naming the file and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from trunkline.stores import _schema, _sql, usage
from trunkline.stores.protocol import HistoryStore, StoreError
from trunkline.stores.query import JobFilter, Page, check_limit, decode_cursor, order_key, page_of
from trunkline.stores.records import JobRecord, TraceRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow

T = TypeVar("T")

_JOBS_TABLE = """CREATE TABLE trunkline_jobs (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    dispatch_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    room TEXT NOT NULL,
    metadata TEXT NOT NULL,
    attributes TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    worker_id TEXT,
    replica_id TEXT,
    created_at REAL NOT NULL,
    placed_at REAL,
    running_at REAL,
    ended_at REAL NOT NULL,
    queue_wait_s REAL NOT NULL,
    max_wait_s REAL NOT NULL,
    trace TEXT NOT NULL,
    sip_call_id TEXT,
    sip_from TEXT,
    sip_to TEXT,
    sip_trunk TEXT,
    sip_final_status INTEGER
)"""

MIGRATIONS = _schema.migrations(_JOBS_TABLE, "REAL")

_SPANS = "trunkline_job_spans"
# Page cache per connection (negative: KiB): the indexes' hot pages stay in it.
_CACHE_KIB = 32 * 1024
# Checkpoint the WAL into the database every ~40 MB instead of every 4 MB:
# pages written many times between checkpoints are copied once.
_CHECKPOINT_PAGES = 10_000
_MAX_ROWS_PER_INSERT = 128
_INSERT_EVENT = (
    f"INSERT OR IGNORE INTO trunkline_scale_events ({_sql.SELECT_EVENT_COLUMNS}) "
    f"VALUES ({', '.join('?' for _ in _sql.EVENT_COLUMNS)})"
)
_FORGET = "DELETE FROM trunkline_usage_done WHERE width = ? AND bucket_start = ?"
_BUCKET_INDEX = "CAST(at / {width} AS INTEGER)"  # Unix times are positive: floor
HOUR = usage.BUCKETS["hour"]


@functools.lru_cache(maxsize=32)
def _insert(rows: int, columns: int) -> str:
    """One INSERT of `rows` rows of the first `columns` of `COLUMNS`: a
    batch is a few statements, so SQLite's C code runs long stretches
    without Python's GIL (executemany takes it back after every row)."""
    cols = ", ".join(_sql.COLUMNS[:columns])
    row = f"({', '.join('?' * columns)})"
    return f"INSERT OR IGNORE INTO trunkline_jobs ({cols}) VALUES " + ", ".join([row] * rows)


# A job that did not come through the SIP edge leaves its SIP columns out of
# the INSERT (NULL) rather than binding five Nones: sqlite3 binds a None
# only after an adapter lookup that builds and discards an AttributeError.
_ALL = len(_sql.COLUMNS)
_NO_SIP = _ALL - _sql.SIP_COLUMNS


def _q(_: int) -> str:
    return "?"


def _open_error(where: str, e: sqlite3.Error) -> str:
    """What went wrong opening `where`, and what to do about it."""
    name = getattr(e, "sqlite_errorname", "")
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return (
            f"{where} is unreadable ({e}): it is not a SQLite database, or it is damaged. "
            "Move it aside (trunkline then starts a new, empty history) or restore a backup"
        )
    if name.startswith("SQLITE_READONLY"):
        return f"{where} cannot be written ({e}): make it writable by trunkline, or move it"
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        return f"{where} is locked ({e}): is another trunkline server using this data_dir?"
    return f"cannot use {where}: {e} ({name or type(e).__name__})"


class _Thread:
    """One thread and the connection that lives on it."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.db: sqlite3.Connection | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def conn(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreError("SQLite history store is not open")
        return self.db

    def close_db(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            db.close()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


class SqliteHistory:
    """A `HistoryStore` in the SQLite file `path` (created with its directory).
    Unbounded: retention (`prune`, run by the server in the background) keeps
    it in size. `schema_version` builds the schema only up to that version
    (tests of migrations); leave it at the latest."""

    backend = "sqlite"
    caches_usage = True  # the usage report's buckets are cached (retention warms them)

    def __init__(
        self, path: str | os.PathLike[str], *, schema_version: int = _schema.LATEST
    ) -> None:
        self.path = Path(path)
        self.schema_version = schema_version
        self._rows_per_insert = 1
        # How traces are written: packed once the file is at COMPACT_TRACE.
        self._trace: Callable[[Sequence[TraceRecord]], str | bytes | bytearray] = _sql.pack_trace
        self._w = _Thread("trunkline-sqlite-write")
        self._r = _Thread("trunkline-sqlite-read")
        self._closed = False

    def describe(self) -> str:
        return f"SQLite {self.path}"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            await self._w.run(self._open_writer)
            await self._r.run(self._open_reader)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, each one is explicit.
        return sqlite3.connect(self.path, isolation_level=None, timeout=10.0)

    def _open_writer(self) -> None:
        where = f"history database {self.path}"
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the data directory {directory}: {e.strerror or e}; set "
                "[server] data_dir to a directory trunkline may write, or [store] backend"
            ) from None
        if self.path.is_dir():
            raise StoreError(f"{where} is a directory; move it away or set [server] data_dir")
        try:
            # Created private before SQLite opens it: its -wal and -shm files
            # take the same permissions.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise StoreError(
                f"cannot open {where}: {e.strerror or e}; make it (and {directory}) writable "
                "by trunkline, or set [server] data_dir"
            ) from None
        try:
            db = self._connect()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {where}: {e}") from None
        self._w.db = db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{where}: cannot switch to WAL mode (journal mode {mode!r})")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={64 << 20}")
            most = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(_sql.COLUMNS)
            self._rows_per_insert = max(1, min(_MAX_ROWS_PER_INSERT, most))
            self._migrate(db, where)
        except sqlite3.Error as e:
            raise StoreError(_open_error(where, e)) from None

    def _migrate(self, db: sqlite3.Connection, where: str) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "trunkline_schema" not in tables:
                if tables:
                    raise StoreError(
                        f"{where} is a SQLite database of another program (tables: "
                        f"{', '.join(sorted(tables)[:5])}); point [server] data_dir elsewhere"
                    )
                db.execute("CREATE TABLE trunkline_schema (version INTEGER NOT NULL)")
                db.execute("INSERT INTO trunkline_schema (version) VALUES (0)")
            (version,) = db.execute("SELECT version FROM trunkline_schema").fetchone()
            if version > _schema.LATEST:
                raise StoreError(_schema.newer_schema_message(where, version))
            # A real write, so a file that can only be read is refused now,
            # not at the first ended job.
            db.execute("UPDATE trunkline_schema SET version = version")
            for m in MIGRATIONS:
                if version < m.version <= self.schema_version:
                    for step in m.steps:
                        db.execute(step)
                    db.execute("UPDATE trunkline_schema SET version = ?", (m.version,))
                    version = m.version
            self._trace = _sql.pack_trace if version >= _schema.COMPACT_TRACE else _sql.trace_json
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _open_reader(self) -> None:
        db = self._connect()
        db.execute("PRAGMA query_only=ON")
        db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._r.db = db

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in (self._w, self._r):
            with contextlib.suppress(sqlite3.Error):
                await t.run(t.close_db)
            t.shutdown()

    async def schema(self) -> int:
        """The schema version of the open file."""

        def read() -> int:
            return int(self._r.conn().execute("SELECT version FROM trunkline_schema").fetchone()[0])

        return await self._r.run(read)

    # ---------------------------------------------------------------- writes

    async def add(self, records: Sequence[JobRecord]) -> None:
        if records:
            await self._w.run(self._add, records)

    def _add(self, records: Sequence[JobRecord]) -> None:
        for r in records:
            order_key(r)  # raises for a live record: none of the batch is stored
        recs = _sql.unique(records)
        db = self._w.conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._insert_rows(db, recs)
                db.execute(
                    f"UPDATE {_SPANS} SET lo = min(lo, ?), hi = max(hi, ?)", _sql.spans(rows)
                )
                db.executemany(_FORGET, _sql.touched_keys(rows))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e

    def _insert_rows(self, db: sqlite3.Connection, recs: list[JobRecord]) -> list[tuple[Any, ...]]:
        """`recs` in statements of `_rows_per_insert` rows, the rest in
        power-of-two sizes (so only a few distinct statements are ever
        prepared, and all stay in sqlite3's statement cache); the rows.
        Each statement's rows are built just before it runs: building holds
        the GIL, SQLite's work does not, so the event loop is never held up
        for longer than one statement's rows take to build."""
        out: list[tuple[Any, ...]] = []
        plain = [r for r in recs if r.sip is None]
        for group, columns in ((plain, _NO_SIP), ([r for r in recs if r.sip is not None], _ALL)):
            i, n = 0, len(group)
            size = self._rows_per_insert
            while i < n:
                while size > n - i:
                    size //= 2
                chunk = [_sql.to_row(r, self._trace) for r in group[i : i + size]]
                values = itertools.chain.from_iterable(
                    chunk if columns == _ALL else (row[:columns] for row in chunk)
                )
                db.execute(_insert(size, columns), list(values))
                out += chunk
                i += size
        return out

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        removed = 0
        if before is not None:
            while True:
                n = await self._w.run(
                    self._delete,
                    "WHERE ended_at < ? ORDER BY ended_at, job_id LIMIT ?",
                    (before, _sql.PRUNE_CHUNK),
                )
                removed += n
                if n < _sql.PRUNE_CHUNK:
                    break
        if keep is not None:
            excess = await self._w.run(self._excess, keep)
            while excess > 0:
                n = await self._w.run(
                    self._delete,
                    "ORDER BY ended_at, job_id LIMIT ?",
                    (min(excess, _sql.PRUNE_CHUNK),),
                )
                if n == 0:
                    break
                removed += n
                excess -= n
        await self._w.run(self._after_prune, before, removed)
        return removed

    def _after_prune(self, before: float | None, removed: int) -> None:
        """Scale events older than `before` go; the usage marks of the buckets
        the removed records counted in are forgotten."""
        db = self._w.conn()
        try:
            if before is not None:
                db.execute("DELETE FROM trunkline_scale_events WHERE at < ?", (before,))
                db.execute("DELETE FROM trunkline_usage WHERE bucket_start < ?", (before - 86_400,))
            (oldest,) = db.execute("SELECT min(ended_at) FROM trunkline_jobs").fetchone()
            cut = _sql.prune_cut(before, removed, oldest)
            if cut is not None:
                db.execute("DELETE FROM trunkline_usage_done WHERE bucket_start <= ?", (cut,))
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e

    def _delete(self, tail: str, args: tuple[Any, ...]) -> int:
        db = self._w.conn()
        try:
            cur = db.execute(
                f"DELETE FROM trunkline_jobs WHERE seq IN (SELECT seq FROM trunkline_jobs {tail})",
                args,
            )
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e
        return cur.rowcount

    def _excess(self, keep: int) -> int:
        (n,) = self._w.conn().execute("SELECT count(*) FROM trunkline_jobs").fetchone()
        return max(0, int(n) - keep)

    # ----------------------------------------------------------------- reads

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._r.run(self._get, job_id)

    def _get(self, job_id: str) -> JobRecord | None:
        row = self._read(
            f"SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs WHERE job_id = ?",
            (_sql.clean_text(job_id),),
        )
        return _sql.from_row(row[0]) if row else None

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        after = None if cursor is None else decode_cursor(cursor)
        return await self._r.run(self._query, flt, after, limit)

    def _query(self, flt: JobFilter, after: tuple[float, str] | None, limit: int) -> Page:
        w = _sql.where(flt, after, _q, _SPANS)
        rows = self._read(
            f"SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs{w.sql()} "
            "ORDER BY ended_at DESC, job_id DESC LIMIT ?",
            (*w.args, limit + 1),
        )
        return page_of((_sql.from_row(r) for r in rows), limit)

    async def count(self, flt: JobFilter) -> int:
        w = _sql.where(flt, None, _q, _SPANS)
        rows = await self._r.run(
            self._read, f"SELECT count(*) FROM trunkline_jobs{w.sql()}", tuple(w.args)
        )
        return int(rows[0][0])

    # ---------------------------------------------------- scale events, usage

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        if events:
            await self._w.run(self._add_events, events)

    def _add_events(self, events: Sequence[ScaleEventRecord]) -> None:
        rows = [_sql.to_event_row(e) for e in _sql.unique_events(events)]
        db = self._w.conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT_EVENT, rows)
                db.executemany(_FORGET, _sql.event_keys(events))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> tuple[ScaleEventRecord, ...]:
        usage.check_event_query(since, until, limit)
        w = _sql.event_where(pool, since, until, _q)
        rows = await self._r.run(
            self._read,
            f"SELECT {_sql.SELECT_EVENT_COLUMNS} FROM trunkline_scale_events{w.sql()} "
            "ORDER BY at DESC, event_id DESC LIMIT ?",
            (*w.args, limit),
        )
        return tuple(_sql.from_event_row(r) for r in rows)

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        width = usage.check_usage(since, until, bucket)
        # On the writer thread: filling the cache must not interleave with an
        # add (see `_sql`), and reads of what it wrote need no second hop.
        return await self._w.run(self._usage, since, until, width, bucket, pool)

    def _usage(
        self, since: float, until: float, width: int, bucket: str, pool: str | None
    ) -> tuple[UsageRow, ...]:
        db = self._w.conn()
        starts = usage.bucket_starts(since, until, width)
        lo, hi = starts[0], starts[-1] + width
        try:
            missing = self._missing(db, starts, width)
            if missing:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._fill(db, missing, width)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            w = _sql.Where(
                _q, ["width = ?", "bucket_start >= ?", "bucket_start < ?"], [width, lo, hi]
            )
            if pool is not None:
                w.add("pool = {}", _sql.clean_text(pool))
            cached = db.execute(
                f"SELECT {_sql.USAGE_ROW_COLUMNS} FROM trunkline_usage{w.sql()}{_sql.USAGE_ORDER}",
                w.args,
            )
            return tuple(_sql.from_usage_row(c, bucket) for c in cached)
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e

    @staticmethod
    def _missing(db: sqlite3.Connection, starts: list[float], width: int) -> list[float]:
        """Which of `starts` (ascending) the cache has no mark for."""
        done = {
            row[0]
            for row in db.execute(
                "SELECT bucket_start FROM trunkline_usage_done"
                " WHERE width = ? AND bucket_start >= ? AND bucket_start < ?",
                (width, starts[0], starts[-1] + width),
            )
        }
        return [s for s in starts if s not in done]

    def _fill(self, db: sqlite3.Connection, missing: list[float], width: int) -> None:
        """Compute the buckets `missing` and cache them (in the caller's
        transaction). Hours from the records; days from their hours (filled
        first) and the day's waits ranked by the database."""
        span_lo, span_hi = db.execute(f"SELECT lo, hi FROM {_SPANS}").fetchone()
        computed: dict[tuple[str, float], UsageRow] = {}
        waits: dict[tuple[str, float], list[float]] = {}
        if width == HOUR:
            select = _sql.usage_select(_q)
            for run in _sql.runs(missing, width):
                s, e = run[0], run[-1] + width
                jobs = db.execute(select, _sql.usage_args(s, e, span_lo, span_hi))
                rows = usage.compute(jobs, run, width, "hour", waits)
                sql, args = _sql.event_counts_select(width, _BUCKET_INDEX, None, _q)
                args[:2] = [s, e]
                counts = [(p, b * width, k, n) for p, b, k, n in db.execute(sql, args)]
                computed.update(
                    (r[:2], r) for r in usage.with_scale_events(rows, counts, "hour", None)
                )
        else:
            hours = [h for d in missing for h in usage.bucket_starts(d, d + width, HOUR)]
            todo = self._missing(db, hours, HOUR)
            if todo:
                self._fill(db, todo, HOUR)
            for d in missing:
                hour_rows = [
                    (_sql.from_usage_row(r[:-1], "hour"), _sql.unpack_waits(r[-1]))
                    for r in db.execute(
                        f"SELECT {_sql.USAGE_ROW_COLUMNS}, waits FROM trunkline_usage"
                        " WHERE width = ? AND bucket_start >= ? AND bucket_start < ?",
                        (HOUR, d, d + width),
                    )
                ]
                computed.update(usage.days_from_hours(hour_rows, d))
        for run in _sql.runs(missing, width):
            db.execute(
                "DELETE FROM trunkline_usage WHERE width = ? AND bucket_start >= ?"
                " AND bucket_start < ?",
                (width, run[0], run[-1] + width),
            )
        db.executemany(
            "INSERT INTO trunkline_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_sql.to_usage_row(width, r, waits.get(k)) for k, r in computed.items()],
        )
        db.executemany(
            "INSERT OR REPLACE INTO trunkline_usage_done VALUES (?, ?)",
            [(width, b) for b in missing],
        )

    def explain(self, flt: JobFilter) -> list[str]:
        """SQLite's plan for a first page of `flt` (benchmarks, tests); call
        on the reader thread via `run_read`."""
        w = _sql.where(flt, None, _q, _SPANS)
        rows = self._read(
            f"EXPLAIN QUERY PLAN SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs{w.sql()} "
            "ORDER BY ended_at DESC, job_id DESC LIMIT ?",
            (*w.args, 51),
        )
        return [str(r[-1]) for r in rows]

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the reader thread (benchmarks, tests)."""
        return await self._r.run(fn, *args)

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._r.conn().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"history database {self.path}: {e}") from e


if TYPE_CHECKING:
    _satisfies_protocol: HistoryStore = SqliteHistory("")
