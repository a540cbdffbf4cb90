"""What the SQL backends share: the schema's history, rows, and WHERE clauses.

Theory of operation
-------------------
SQLite and PostgreSQL keep ended jobs in one table, `trunkline_jobs`, a
column per scalar field of `JobRecord` (the SIP call flattened into `sip_*`
columns, NULL when the job did not come through the edge) and the trace and
attributes as JSON text. The JSON is written with `ensure_ascii`, so every
string, even one holding NUL or a lone surrogate, comes back exactly; floats
are written with `repr`, so times come back to the last bit.

The scalar text columns cannot hold everything a Python string can: neither
database stores a lone surrogate (they are not UTF-8) and PostgreSQL stores no
NUL. `clean_text` replaces each such character with U+FFFD, in both backends
alike, on the way in (records and filter values): a record carrying one is
stored, slightly changed, instead of failing its whole batch forever.

Store order is `ended_at DESC, job_id DESC`; every index is (column,
ended_at, job_id) so a filtered page is an index range read backwards and
stops after `limit + 1` rows. The time filters bound `created_at`, which is
not the order column; `trunkline_job_spans` keeps the smallest and largest
`ended_at - created_at` ever stored (`lo`, `hi`), so a created-at range
becomes an ended-at range the indexes can seek: `created_at >= since` implies
`ended_at >= since + lo`, `created_at < until` implies `ended_at < until + hi`
(one second of slack each way absorbs float rounding). The rows in that range
whose `created_at` falls outside are skipped, a few at most: those that ended
within one job length of an edge.

`MIGRATIONS` is the schema's history, oldest first: version N is reached by
running steps 1..N in order, each in the transaction that records the new
version, so a crash mid-migration leaves the old version intact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trunkline.stores.query import JobFilter
from trunkline.stores.records import JobRecord, SipCallRecord, TraceRecord

# Column order of every SELECT and INSERT; `to_row` and `from_row` follow it.
COLUMNS = (
    "job_id",
    "dispatch_id",
    "agent_name",
    "room",
    "metadata",
    "attributes",
    "state",
    "reason",
    "worker_id",
    "replica_id",
    "created_at",
    "placed_at",
    "running_at",
    "ended_at",
    "queue_wait_s",
    "max_wait_s",
    "trace",
    "sip_call_id",
    "sip_from",
    "sip_to",
    "sip_trunk",
    "sip_final_status",
)
SELECT_COLUMNS = ", ".join(COLUMNS)

# (JobFilter field, column) for the equality filters; each has an index.
EQUALITY_FILTERS = (
    ("agent_name", "agent_name"),
    ("room", "room"),
    ("worker_id", "worker_id"),
    ("dispatch_id", "dispatch_id"),
    ("trunk", "sip_trunk"),
    ("caller", "sip_from"),
)
# Every index: name suffix and leading column (then ended_at, job_id).
# Columns that are NULL for many jobs (no worker, not a SIP call) get partial
# indexes: those rows cost no index entry, and `col = value` implies the
# index's `col IS NOT NULL` to both planners.
NULLABLE_INDEXED = frozenset({"worker_id", "sip_trunk", "sip_from"})
INDEXED = (
    ("pool", "agent_name"),
    ("state", "state"),
    *((col, col) for field, col in EQUALITY_FILTERS if field != "agent_name"),
)

# Deleted per statement by `prune`, so a large backlog never holds the write
# lock (SQLite) or a long transaction (PostgreSQL) for long.
PRUNE_CHUNK = 5000


def clean_text(s: str) -> str:
    """`s` as both SQL backends can store it: NUL and lone surrogates become
    U+FFFD; any other string is returned as is (the common, fast case)."""
    if s.isascii():
        return s.replace("\x00", "\ufffd") if "\x00" in s else s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


# One encoder for every record: json.dumps with arguments builds a new one per call.
_json = json.JSONEncoder(separators=(",", ":")).encode
_esc = json.encoder.encode_basestring_ascii


def _num(x: float) -> str:
    """A finite float as JSON; TypeError for anything else (the slow path)."""
    text = float.__repr__(x)
    if text[-1] in "fn":  # inf, -inf, nan: not JSON numbers
        raise TypeError(text)
    return text


def _trace_json(trace: Sequence[TraceRecord]) -> str:
    """The trace as JSON `[[at, event, worker_id, detail], ...]`, what `_json`
    would give, built directly (the biggest part of writing a record)."""
    try:
        return (
            "["
            + ",".join(
                f"[{_num(t.at)},{_esc(t.event)},"
                f"{'null' if t.worker_id is None else _esc(t.worker_id)},"
                f"{'null' if t.detail is None else _esc(t.detail)}]"
                for t in trace
            )
            + "]"
        )
    except TypeError:  # not a float or str where one belongs: let json say how to write it
        return _json([(t.at, t.event, t.worker_id, t.detail) for t in trace])


def _opt(s: str | None) -> str | None:
    return None if s is None else clean_text(s)


def to_row(r: JobRecord) -> tuple[Any, ...]:
    """`r` as the values of `COLUMNS`."""
    sip = r.sip
    return (
        clean_text(r.job_id),
        clean_text(r.dispatch_id),
        clean_text(r.agent_name),
        clean_text(r.room),
        clean_text(r.metadata),
        _json(r.attributes),
        r.state,
        clean_text(r.reason),
        _opt(r.worker_id),
        _opt(r.replica_id),
        r.created_at,
        r.placed_at,
        r.running_at,
        r.ended_at,
        r.queue_wait_s,
        r.max_wait_s,
        _trace_json(r.trace),
        None if sip is None else clean_text(sip.call_id),
        None if sip is None else clean_text(sip.from_number),
        None if sip is None else clean_text(sip.to_number),
        None if sip is None else clean_text(sip.trunk),
        None if sip is None else sip.final_status,
    )


def from_row(row: Sequence[Any]) -> JobRecord:
    """The record a row of `COLUMNS` holds."""
    (
        job_id, dispatch_id, agent_name, room, metadata, attributes, state, reason,
        worker_id, replica_id, created_at, placed_at, running_at, ended_at,
        queue_wait_s, max_wait_s, trace, call_id, from_number, to_number, trunk, final,
    ) = row  # fmt: skip
    return JobRecord(
        job_id=job_id,
        dispatch_id=dispatch_id,
        agent_name=agent_name,
        room=room,
        metadata=metadata,
        attributes=tuple((k, v) for k, v in json.loads(attributes)),
        state=state,
        reason=reason,
        worker_id=worker_id,
        replica_id=replica_id,
        created_at=created_at,
        placed_at=placed_at,
        running_at=running_at,
        ended_at=ended_at,
        queue_wait_s=queue_wait_s,
        max_wait_s=max_wait_s,
        trace=tuple(TraceRecord(at, ev, w, d) for at, ev, w, d in json.loads(trace)),
        sip=(
            None
            if call_id is None
            else SipCallRecord(call_id, from_number, to_number, trunk, final)
        ),
    )


def spans(rows: Sequence[tuple[Any, ...]]) -> tuple[float, float]:
    """(smallest, largest) `ended_at - created_at` of rows from `to_row`."""
    ci, ei = COLUMNS.index("created_at"), COLUMNS.index("ended_at")
    d = [row[ei] - row[ci] for row in rows]
    return min(d), max(d)


def unique(records: Sequence[JobRecord]) -> list[JobRecord]:
    """`records` with each job id once, the first occurrence kept."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.job_id not in seen:
            seen.add(r.job_id)
            out.append(r)
    return out


@dataclass
class Where:
    """A WHERE clause under construction: `add(sql_with_{}, value...)` with one
    `{}` per value; `param(i)` is the dialect's placeholder for value i (1-based)."""

    param: Callable[[int], str]
    conds: list[str]
    args: list[Any]

    def add(self, sql: str, *values: Any) -> None:
        marks = []
        for v in values:
            self.args.append(v)
            marks.append(self.param(len(self.args)))
        self.conds.append(sql.format(*marks))

    def sql(self) -> str:
        return (" WHERE " + " AND ".join(self.conds)) if self.conds else ""


def where(
    flt: JobFilter, after: tuple[float, str] | None, param: Callable[[int], str], spans_table: str
) -> Where:
    """The WHERE clause of `flt`, records strictly after the cursor key `after`
    in store order (None: from the newest), with its values."""
    w = Where(param, [], [])
    if flt.states is not None:
        states = sorted(flt.states)
        marks = ", ".join("{}" for _ in states)
        w.add(f"state IN ({marks})", *states)
    for field, col in EQUALITY_FILTERS:
        value = getattr(flt, field)
        if value is not None:
            w.add(f"{col} = {{}}", clean_text(value))
    if flt.since is not None:
        w.add("created_at >= {}", flt.since)
        w.add(f"ended_at >= {{}} + (SELECT lo FROM {spans_table}) - 1", flt.since)
    if flt.until is not None:
        w.add("created_at < {}", flt.until)
        w.add(f"ended_at < {{}} + (SELECT hi FROM {spans_table}) + 1", flt.until)
    if after is not None:
        w.add("(ended_at, job_id) < ({}, {})", after[0], after[1])
    return w


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history: `version` is reached by running `steps`."""

    version: int
    what: str
    steps: tuple[str, ...]


def migrations(jobs_table_sql: str, real: str) -> tuple[Migration, ...]:
    """The schema's history in a dialect: `jobs_table_sql` creates the jobs
    table, `real` is the float type's name."""
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
    return (
        Migration(1, "jobs table, one index per filter", v1),
        Migration(2, "job spans: created-at ranges read through the ended-at indexes", v2),
    )


LATEST = 2


def newer_schema_message(where: str, found: int) -> str:
    return (
        f"{where} has history schema version {found}, newer than this trunkline knows "
        f"({LATEST}): it was written by a newer trunkline; run that version, or point "
        "the store elsewhere"
    )
