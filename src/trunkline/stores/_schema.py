"""The SQL backends' schema history: versions and forward migrations.

`migrations(...)` gives the schema's history in a dialect, oldest first:
version N is reached by running steps 1..N in order, each in the transaction
that records the new version, so a crash mid-migration leaves the old
version intact. `LATEST` is the version a new store is created at; a file or
database of a newer version is refused (`newer_schema_message`), since an
older trunkline cannot read what a newer one wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from trunkline.stores._sql import INDEXED, NULLABLE_INDEXED


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history: `version` is reached by running `steps`."""

    version: int
    what: str
    steps: tuple[str, ...]


def migrations(
    jobs_table_sql: str, real: str, key_text: str = "TEXT", blob: str = "BLOB"
) -> tuple[Migration, ...]:
    """The schema's history in a dialect: `jobs_table_sql` creates the jobs
    table, `real` is the float type's name, `key_text` the text type of ids
    that order ties (byte order), `blob` the bytes type."""
    v1 = (
        jobs_table_sql,
        "CREATE INDEX trunkline_jobs_by_end ON trunkline_jobs (ended_at, job_id)",
        *(
            f"CREATE INDEX trunkline_jobs_by_{name} ON trunkline_jobs ({col}, ended_at, job_id)"
            + (f" WHERE {col} IS NOT NULL" if col in NULLABLE_INDEXED else "")
            for name, col in INDEXED
        ),
    )
    v2 = (
        f"CREATE TABLE trunkline_job_spans (lo {real} NOT NULL, hi {real} NOT NULL)",
        "INSERT INTO trunkline_job_spans (lo, hi) SELECT"
        " COALESCE(MIN(ended_at - created_at), 0), COALESCE(MAX(ended_at - created_at), 0)"
        " FROM trunkline_jobs",
    )
    v3 = (
        f"""CREATE TABLE trunkline_scale_events (
    event_id {key_text} NOT NULL PRIMARY KEY,
    at {real} NOT NULL,
    pool TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_replicas INTEGER NOT NULL,
    to_replicas INTEGER NOT NULL,
    desired INTEGER NOT NULL,
    reason TEXT NOT NULL,
    running INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    queued INTEGER NOT NULL,
    refused INTEGER NOT NULL,
    slots_per_replica INTEGER NOT NULL,
    spare_slots INTEGER NOT NULL,
    replicas TEXT NOT NULL
)""",
    )
    # kind in both: the report counts events per bucket and kind from the
    # index alone, without a read of each row.
    event_indexes = (
        "CREATE INDEX trunkline_scale_events_by_at"
        " ON trunkline_scale_events (at, event_id, pool, kind)",
        "CREATE INDEX trunkline_scale_events_by_pool"
        " ON trunkline_scale_events (pool, at, event_id, kind)",
    )
    cache = (
        f"""CREATE TABLE trunkline_usage (
    width INTEGER NOT NULL,
    bucket_start {real} NOT NULL,
    pool TEXT NOT NULL,
    requested INTEGER NOT NULL,
    placed INTEGER NOT NULL,
    refused TEXT NOT NULL,
    agent_minutes {real} NOT NULL,
    peak INTEGER NOT NULL,
    wait_p50 {real},
    wait_p95 {real},
    wait_max {real},
    scale_events TEXT NOT NULL,
    waits {blob},
    PRIMARY KEY (width, bucket_start, pool)
)""",
        f"""CREATE TABLE trunkline_usage_done (
    width INTEGER NOT NULL,
    bucket_start {real} NOT NULL,
    PRIMARY KEY (width, bucket_start)
)""",
    )
    # Version 3's cache and indexes changed shape while it was developed;
    # they are only a cache and indexes, so 5 rebuilds them from scratch.
    v5 = (
        "DROP INDEX IF EXISTS trunkline_scale_events_by_at",
        "DROP INDEX IF EXISTS trunkline_scale_events_by_pool",
        "DROP TABLE IF EXISTS trunkline_usage",
        "DROP TABLE IF EXISTS trunkline_usage_done",
        *event_indexes,
        *cache,
    )
    return (
        Migration(1, "jobs table, one index per filter", v1),
        Migration(2, "job spans: created-at ranges read through the ended-at indexes", v2),
        Migration(
            3, "scale events; the usage report's per-bucket cache", v3 + event_indexes + cache
        ),
        Migration(4, "created_at in every jobs index: time ranges skip in the index", v4()),
        Migration(5, "the usage cache and scale-event indexes rebuilt in their final shape", v5),
        # No table changes: the version says that SQLite rows written from now
        # on may hold a trace in the compact binary form (`pack_trace`), which
        # an older trunkline cannot read, so it must refuse the file.
        # PostgreSQL keeps JSON traces; its version 6 is the same as 5.
        Migration(6, "traces in a compact binary form (SQLite)", ()),
    )


def v4() -> tuple[str, ...]:
    """Every jobs index rebuilt with `created_at` after the order columns: a
    time-range page skips the rows the job spans let into its ended-at range
    (those created outside it) from the index entry, instead of reading each
    from the table. The pool and state indexes also carry each other's
    column, so pool + outcome (`--pool support --outcome no_capacity`) is
    read from either index alone. Measured over 1,000,000 records with a cold
    page cache: pool + 1 h first page p50 39 -> 5 ms, max 169 -> 12 ms."""
    out = [
        "DROP INDEX trunkline_jobs_by_end",
        "CREATE INDEX trunkline_jobs_by_end ON trunkline_jobs (ended_at, job_id, created_at)",
    ]
    carry = {"agent_name": ", state", "state": ", agent_name"}
    for name, col in INDEXED:
        out += [
            f"DROP INDEX trunkline_jobs_by_{name}",
            f"CREATE INDEX trunkline_jobs_by_{name} ON trunkline_jobs"
            f" ({col}, ended_at, job_id, created_at{carry.get(col, '')})"
            + (f" WHERE {col} IS NOT NULL" if col in NULLABLE_INDEXED else ""),
        ]
    return tuple(out)


LATEST = 6
COMPACT_TRACE = 6  # the SQLite schema version from which traces are packed


def newer_schema_message(where: str, found: int) -> str:
    return (
        f"{where} has history schema version {found}, newer than this trunkline knows "
        f"({LATEST}): it was written by a newer trunkline; run that version, or point "
        "the store elsewhere"
    )
