"""PostgreSQL job history: for deployments whose servers share one database.

Theory of operation
-------------------
asyncpg (the optional extra `trunkline[postgres]`) speaks PostgreSQL's binary
protocol natively on the event loop: no thread, no libpq, doubles sent and
read as 8-byte floats (times come back to the last bit). A small pool of
connections serves the writer and the API's reads at once.

The tables are those of the SQLite backend (`trunkline.stores._sql`), with
`trunkline_` names so they can share a database with other programs, and
`job_id` in the "C" collation: store order breaks ties by code point, the
same in every backend, whatever the database's locale.

Several servers may use one database. The schema is migrated at `open` under
a transaction-scoped advisory lock (the first server to start migrates, the
others wait and find it done); a batch is one `INSERT ... ON CONFLICT DO
NOTHING` transaction (first write wins across servers too); retention takes a
session advisory lock, so one server at a time prunes. A report that fills
the usage cache locks `trunkline_usage_done` EXCLUSIVE for its transaction:
an add, which deletes from that table, waits for it, and it waits for adds
in flight, so no server caches figures that miss a committed record. A committed batch is
as durable as the server's `synchronous_commit` makes it (on by default).

Connection errors never show the password: `describe()` and every
`StoreError` name the URL with it replaced by `***`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from trunkline.stores import _schema, _sql, usage
from trunkline.stores.protocol import HistoryStore, StoreError
from trunkline.stores.query import JobFilter, Page, check_limit, decode_cursor, order_key, page_of
from trunkline.stores.records import JobRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow

_JOBS_TABLE = """CREATE TABLE trunkline_jobs (
    job_id text COLLATE "C" PRIMARY KEY,
    dispatch_id text NOT NULL,
    agent_name text NOT NULL,
    room text NOT NULL,
    metadata text NOT NULL,
    attributes text NOT NULL,
    state text NOT NULL,
    reason text NOT NULL,
    worker_id text,
    replica_id text,
    created_at double precision NOT NULL,
    placed_at double precision,
    running_at double precision,
    ended_at double precision NOT NULL,
    queue_wait_s double precision NOT NULL,
    max_wait_s double precision NOT NULL,
    trace text NOT NULL,
    sip_call_id text,
    sip_from text,
    sip_to text,
    sip_trunk text,
    sip_final_status integer
)"""

MIGRATIONS = _schema.migrations(_JOBS_TABLE, "double precision", 'text COLLATE "C"', "bytea")

_INSERT = (
    f"INSERT INTO trunkline_jobs ({_sql.SELECT_COLUMNS}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_sql.COLUMNS)))}) "
    "ON CONFLICT (job_id) DO NOTHING"
)
_SPANS = "trunkline_job_spans"
_INSERT_EVENT = (
    f"INSERT INTO trunkline_scale_events ({_sql.SELECT_EVENT_COLUMNS}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_sql.EVENT_COLUMNS)))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_INSERT_USAGE = f"INSERT INTO trunkline_usage VALUES ({', '.join(f'${i}' for i in range(1, 14))})"
_BUCKET_INDEX = "floor(at / {width})::bigint"
HOUR = usage.BUCKETS["hour"]
_FORGET = "DELETE FROM trunkline_usage_done WHERE width = $1 AND bucket_start = $2"
# Advisory lock keys (any fixed bigints; "trunklin" and "trunkprn" in ASCII).
_MIGRATE_LOCK = 0x7472756E6B6C696E
_PRUNE_LOCK = 0x7472756E6B70726E
CONNECT_TIMEOUT_S = 10.0


def _dollar(i: int) -> str:
    return f"${i}"


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class PostgresHistory:
    """A `HistoryStore` in the PostgreSQL database at `url`
    (`postgresql://user:password@host:port/database`; query parameters such
    as `sslmode` as libpq reads them). Unbounded: retention (`prune`) keeps
    it in size. `schema_version` builds the schema only up to that version
    (tests of migrations); leave it at the latest."""

    backend = "postgresql"
    caches_usage = True  # the usage report's buckets are cached (retention warms them)

    def __init__(
        self, url: str, *, schema_version: int = _schema.LATEST, pool_size: int = 4
    ) -> None:
        self.url = url
        self.schema_version = schema_version
        self.pool_size = pool_size
        self._pool: Any = None

    def describe(self) -> str:
        return f"PostgreSQL {redact(self.url)}"

    def _error(self, e: BaseException) -> StoreError:
        return StoreError(f"history database {redact(self.url)}: {type(e).__name__}: {e}")

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise StoreError(
                "the PostgreSQL history store needs asyncpg: pip install 'trunkline[postgres]'"
            ) from None
        where = redact(self.url)
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                # No floor: asyncpg would keep reconnecting in the background
                # (and logging it) while the database is down.
                min_size=0,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=60.0,
            )
        except (ValueError, asyncpg.InterfaceError) as e:  # a URL asyncpg cannot read
            raise StoreError(f"[store] url {where} is not usable: {e}") from None
        try:
            try:
                conn = await self._pool.acquire()  # the first connection: is it there at all?
            except (OSError, TimeoutError, asyncpg.PostgresError) as e:
                raise StoreError(
                    f"cannot connect to the history database {where}: {type(e).__name__}: {e}; "
                    "check [store] url, that PostgreSQL runs there and accepts this user"
                ) from None
            try:
                await self._migrate(conn, where)
            finally:
                await self._pool.release(conn)
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: Any, where: str) -> None:
        import asyncpg

        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS trunkline_schema (version integer NOT NULL)"
                )
                version = await conn.fetchval("SELECT version FROM trunkline_schema")
                if version is None:
                    version = 0
                    await conn.execute("INSERT INTO trunkline_schema (version) VALUES (0)")
                if version > _schema.LATEST:
                    raise StoreError(
                        _schema.newer_schema_message(f"history database {where}", version)
                    )
                for m in MIGRATIONS:
                    if version < m.version <= self.schema_version:
                        for step in m.steps:
                            await conn.execute(step)
                        await conn.execute("UPDATE trunkline_schema SET version = $1", m.version)
        except asyncpg.PostgresError as e:
            raise StoreError(
                f"cannot prepare the history tables in {where}: {type(e).__name__}: {e}; "
                "the user needs CREATE on the database's schema"
            ) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (TimeoutError, OSError):
                pool.terminate()

    def _require(self) -> Any:
        if self._pool is None:
            raise StoreError("PostgreSQL history store is not open")
        return self._pool

    async def schema(self) -> int:
        """The schema version of the database."""
        return int(await self._require().fetchval("SELECT version FROM trunkline_schema"))

    # ---------------------------------------------------------------- writes

    async def add(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        for r in records:
            order_key(r)  # raises for a live record: none of the batch is stored
        rows = [_sql.to_row(r) for r in _sql.unique(records)]
        lo, hi = _sql.spans(rows)
        pool = self._require()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(_INSERT, rows)
                await conn.execute(
                    f"UPDATE {_SPANS} SET lo = LEAST(lo, $1), hi = GREATEST(hi, $2)", lo, hi
                )
                await conn.executemany(_FORGET, _sql.touched_keys(rows))
        except (OSError, TimeoutError) as e:
            raise self._error(e) from e
        except Exception as e:
            if type(e).__module__.startswith("asyncpg"):
                raise self._error(e) from e
            raise

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        removed = 0
        pool = self._require()
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _PRUNE_LOCK):
                return 0  # another server is pruning this database right now
            try:
                if before is not None:
                    while True:
                        n = await self._delete(
                            conn, "WHERE ended_at < $1 ORDER BY ended_at, job_id LIMIT $2",
                            before, _sql.PRUNE_CHUNK,
                        )  # fmt: skip
                        removed += n
                        if n < _sql.PRUNE_CHUNK:
                            break
                if keep is not None:
                    total = await conn.fetchval("SELECT count(*) FROM trunkline_jobs")
                    excess = max(0, int(total) - keep)
                    while excess > 0:
                        n = await self._delete(
                            conn,
                            "ORDER BY ended_at, job_id LIMIT $1",
                            min(excess, _sql.PRUNE_CHUNK),
                        )
                        if n == 0:
                            break
                        removed += n
                        excess -= n
                if before is not None:
                    await conn.execute("DELETE FROM trunkline_scale_events WHERE at < $1", before)
                    await conn.execute(
                        "DELETE FROM trunkline_usage WHERE bucket_start < $1", before - 86_400
                    )
                oldest = await conn.fetchval("SELECT min(ended_at) FROM trunkline_jobs")
                cut = _sql.prune_cut(before, removed, oldest)
                if cut is not None:
                    await conn.execute(
                        "DELETE FROM trunkline_usage_done WHERE bucket_start <= $1", cut
                    )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _PRUNE_LOCK)
        return removed

    @staticmethod
    async def _delete(conn: Any, tail: str, *args: Any) -> int:
        status = await conn.execute(
            "DELETE FROM trunkline_jobs WHERE job_id IN "
            f"(SELECT job_id FROM trunkline_jobs {tail})",
            *args,
        )
        return int(str(status).rsplit(" ", 1)[-1])

    # ----------------------------------------------------------------- reads

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._require().fetchrow(
            f"SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs WHERE job_id = $1",
            _sql.clean_text(job_id),
        )
        return None if row is None else _sql.from_row(tuple(row))

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        after = None if cursor is None else decode_cursor(cursor)
        w = _sql.where(flt, after, _dollar, _SPANS)
        w.args.append(limit + 1)
        rows = await self._require().fetch(
            f"SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs{w.sql()} "
            f"ORDER BY ended_at DESC, job_id DESC LIMIT ${len(w.args)}",
            *w.args,
        )
        return page_of((_sql.from_row(tuple(r)) for r in rows), limit)

    async def count(self, flt: JobFilter) -> int:
        w = _sql.where(flt, None, _dollar, _SPANS)
        n = await self._require().fetchval(f"SELECT count(*) FROM trunkline_jobs{w.sql()}", *w.args)
        return int(n)

    # ---------------------------------------------------- scale events, usage

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        if not events:
            return
        rows = [_sql.to_event_row(e) for e in _sql.unique_events(events)]
        try:
            async with self._require().acquire() as conn, conn.transaction():
                await conn.executemany(_INSERT_EVENT, rows)
                await conn.executemany(_FORGET, _sql.event_keys(events))
        except (OSError, TimeoutError) as e:
            raise self._error(e) from e
        except Exception as e:
            if type(e).__module__.startswith("asyncpg"):
                raise self._error(e) from e
            raise

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> tuple[ScaleEventRecord, ...]:
        usage.check_event_query(since, until, limit)
        w = _sql.event_where(pool, since, until, _dollar)
        w.args.append(limit)
        rows = await self._require().fetch(
            f"SELECT {_sql.SELECT_EVENT_COLUMNS} FROM trunkline_scale_events{w.sql()} "
            f"ORDER BY at DESC, event_id DESC LIMIT ${len(w.args)}",
            *w.args,
        )
        return tuple(_sql.from_event_row(tuple(r)) for r in rows)

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        width = usage.check_usage(since, until, bucket)
        starts = usage.bucket_starts(since, until, width)
        lo, hi = starts[0], starts[-1] + width
        async with self._require().acquire() as conn:
            if await self._missing(conn, starts, width):
                async with conn.transaction():
                    await conn.execute("LOCK TABLE trunkline_usage_done IN EXCLUSIVE MODE")
                    missing = await self._missing(conn, starts, width)  # another server's?
                    if missing:
                        await self._fill(conn, missing, width)
            w = _sql.Where(
                _dollar,
                ["width = $1", "bucket_start >= $2", "bucket_start < $3"],
                [width, lo, hi],
            )
            if pool is not None:
                w.add("pool = {}", _sql.clean_text(pool))
            cached = await conn.fetch(
                f"SELECT {_sql.USAGE_ROW_COLUMNS} FROM trunkline_usage{w.sql()}{_sql.USAGE_ORDER}",
                *w.args,
            )
        return tuple(_sql.from_usage_row(c, bucket) for c in cached)

    @staticmethod
    async def _missing(conn: Any, starts: list[float], width: int) -> list[float]:
        """Which of `starts` (ascending) the cache has no mark for."""
        rows = await conn.fetch(
            "SELECT bucket_start FROM trunkline_usage_done"
            " WHERE width = $1 AND bucket_start >= $2 AND bucket_start < $3",
            width, starts[0], starts[-1] + width,
        )  # fmt: skip
        done = {r[0] for r in rows}
        return [s for s in starts if s not in done]

    async def _fill(self, conn: Any, missing: list[float], width: int) -> None:
        """Compute the buckets `missing` and cache them (in the caller's
        transaction): hours from the records, days from their hours and the
        day's waits ranked by the database (as the SQLite store does)."""
        span_lo, span_hi = await conn.fetchrow(f"SELECT lo, hi FROM {_SPANS}")
        computed: dict[tuple[str, float], UsageRow] = {}
        waits: dict[tuple[str, float], list[float]] = {}
        if width == HOUR:
            select = _sql.usage_select(_dollar)
            for run in _sql.runs(missing, width):
                s, e = run[0], run[-1] + width
                jobs = await conn.fetch(select, *_sql.usage_args(s, e, span_lo, span_hi))
                rows = usage.compute((tuple(j) for j in jobs), run, width, "hour", waits)
                sql, args = _sql.event_counts_select(width, _BUCKET_INDEX, None, _dollar)
                args[:2] = [s, e]
                counts = [(p, b * width, k, n) for p, b, k, n in await conn.fetch(sql, *args)]
                computed.update(
                    (r[:2], r) for r in usage.with_scale_events(rows, counts, "hour", None)
                )
        else:
            hours = [h for d in missing for h in usage.bucket_starts(d, d + width, HOUR)]
            todo = await self._missing(conn, hours, HOUR)
            if todo:
                await self._fill(conn, todo, HOUR)
            for d in missing:
                hour_rows = [
                    (_sql.from_usage_row(tuple(r)[:-1], "hour"), _sql.unpack_waits(r[-1]))
                    for r in await conn.fetch(
                        f"SELECT {_sql.USAGE_ROW_COLUMNS}, waits FROM trunkline_usage"
                        " WHERE width = $1 AND bucket_start >= $2 AND bucket_start < $3",
                        HOUR, d, d + width,
                    )
                ]  # fmt: skip
                computed.update(usage.days_from_hours(hour_rows, d))
        for run in _sql.runs(missing, width):
            await conn.execute(
                "DELETE FROM trunkline_usage WHERE width = $1 AND bucket_start >= $2"
                " AND bucket_start < $3",
                width, run[0], run[-1] + width,
            )  # fmt: skip
        if computed:
            await conn.executemany(
                _INSERT_USAGE,
                [_sql.to_usage_row(width, r, waits.get(k)) for k, r in computed.items()],
            )
        await conn.executemany(
            "INSERT INTO trunkline_usage_done VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(width, b) for b in missing],
        )

    async def explain(self, flt: JobFilter) -> list[str]:
        """PostgreSQL's plan for a first page of `flt` (benchmarks, tests)."""
        w = _sql.where(flt, None, _dollar, _SPANS)
        w.args.append(51)
        rows = await self._require().fetch(
            f"EXPLAIN SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs{w.sql()} "
            f"ORDER BY ended_at DESC, job_id DESC LIMIT ${len(w.args)}",
            *w.args,
        )
        return [str(r[0]) for r in rows]


if TYPE_CHECKING:
    _satisfies_protocol: HistoryStore = PostgresHistory("")
