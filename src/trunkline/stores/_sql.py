"""What the SQL backends share: the schema's history, rows, and WHERE clauses.

Theory of operation
-------------------
SQLite and PostgreSQL keep ended jobs in one table, `trunkline_jobs`, a
column per scalar field of `JobRecord` (the SIP call flattened into `sip_*`
columns, NULL when the job did not come through the edge) and the trace and
attributes as JSON text. The JSON is written with `ensure_ascii`, so every
string, even one holding NUL or a lone surrogate, comes back exactly; floats
are written with `repr`, so times come back to the last bit. SQLite files of
schema 6 and later get the trace in a compact binary form instead
(`pack_trace`: the times as packed doubles, the strings as one ASCII JSON
array), which costs a fifth of the JSON's instructions to write, since
turning a float into its shortest text is slow; `from_row` reads both forms,
so rows written before the migration stay as they are.

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
within one job length of an edge. Since schema version 4 every index also
holds `created_at` (after the order columns), so those rows are skipped from
the index entry without a read of the table.

Scale events live in `trunkline_scale_events`, one row each, indexed by
time and by (pool, time). The usage report is cached per bucket: a row of
`trunkline_usage` per (bucket width, bucket start, pool) with the figures
`usage.compute` gave, and a row of `trunkline_usage_done` per (width, start)
saying every pool's row of that bucket is there. Adding records forgets (in
the same transaction) the `done` mark of every bucket they count in
(`usage.touched`); a report recomputes the buckets without a mark from the
records (one ranged read of the ended-at index per run of adjacent buckets)
and marks them, in one write transaction that adds cannot interleave with,
so a mark is never set on figures that miss a committed record. Retention
forgets the marks of every bucket at or before what it removed. Scale-event
counts are not cached: there are few, and they are counted at each report.

The schema's history (its versions and forward migrations) is in `_schema.py`.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trunkline.stores import usage
from trunkline.stores.query import JobFilter
from trunkline.stores.records import JobRecord, SipCallRecord, TraceRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow

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
# The SIP call's columns come last: a row without one may leave them out.
SIP_COLUMNS = 5

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


def _not_json(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# `_json`'s C encoder, built once: `JSONEncoder.encode` builds one (and a
# circular-reference check) per call, a third of its cost for a record's
# small values. Same output as `_json` for what records hold (no circularity).
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _not_json, _esc, None, ":", ",", False, False, True)
)


def _fast_json(value: object) -> str:
    """`_json(value)` for the tuples, strings and numbers of a record."""
    if _c_encode is None:
        return _json(value)
    return "".join(_c_encode(value, 0))


def trace_json(trace: Sequence[TraceRecord]) -> str:
    """The trace as JSON `[[at, event, worker_id, detail], ...]` (PostgreSQL,
    and SQLite files before schema 6), by the C encoder: a `TraceRecord` is a
    tuple, which it writes as a list."""
    return _fast_json(trace)


# The compact trace (SQLite since schema 6): a version byte, the event count,
# the times as little-endian doubles (exact, and no float-to-text conversion,
# which was a fifth of what storing a record cost), then the events, workers
# and details as one ASCII JSON array of three arrays.
_TRACE_V1 = 1
_TRACE_HEAD = struct.Struct("<BI")
_EMPTY_TRACE = _TRACE_HEAD.pack(_TRACE_V1, 0)


@functools.lru_cache(maxsize=64)
def _doubles(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


def pack_trace(trace: Sequence[TraceRecord]) -> bytearray:
    """`trace` in the compact binary form `unpack_trace` reads back exactly.
    A bytearray: sqlite3 binds one as it is, while a `bytes` value (like
    None) first goes through its adapter lookup, which builds and discards
    an AttributeError each time."""
    n = len(trace)
    if not n:
        return bytearray(_EMPTY_TRACE)
    ats, events, workers, details = zip(*trace, strict=True)
    out = bytearray(_TRACE_HEAD.pack(_TRACE_V1, n))
    out += _doubles(n).pack(*ats)
    out += _fast_json((events, workers, details)).encode("ascii")
    return out


def unpack_trace(blob: bytes) -> tuple[TraceRecord, ...]:
    """The trace `pack_trace` wrote; ValueError for anything else."""
    try:
        version, n = _TRACE_HEAD.unpack_from(blob)
        if version != _TRACE_V1:
            raise ValueError(f"trace format {version} is unknown")
        if not n:
            return ()
        start = _TRACE_HEAD.size + 8 * n
        ats = struct.unpack_from(f"<{n}d", blob, _TRACE_HEAD.size)
        events, workers, details = json.loads(blob[start:])
        return tuple([TraceRecord(*t) for t in zip(ats, events, workers, details, strict=True)])
    except (struct.error, ValueError, TypeError) as e:
        raise ValueError(f"a stored trace is damaged: {e}") from None


def _load_trace(value: str | bytes) -> tuple[TraceRecord, ...]:
    if isinstance(value, (bytes, bytearray)):
        return unpack_trace(value)
    return tuple(TraceRecord(at, ev, w, d) for at, ev, w, d in json.loads(value))


def _opt(s: str | None) -> str | None:
    return None if s is None else clean_text(s)


def _clean(s: str) -> bool:
    """True if `s` needs `clean_text` (rare: NUL or a non-ASCII character)."""
    return not s.isascii() or "\x00" in s


def to_row(
    r: JobRecord, trace: Callable[[Sequence[TraceRecord]], str | bytes | bytearray] = trace_json
) -> tuple[Any, ...]:
    """`r` as the values of `COLUMNS`, its trace encoded by `trace` (JSON
    text by default; SQLite passes `pack_trace`)."""
    sip = r.sip
    attrs = r.attributes
    worker_id, replica_id = r.worker_id, r.replica_id
    # One check over every text value instead of a `clean_text` call each:
    # nearly every record is plain ASCII.
    text = "".join(
        (
            r.job_id, r.dispatch_id, r.agent_name, r.room, r.metadata, r.reason,
            worker_id or "", replica_id or "",
        )
    )  # fmt: skip
    if sip is not None:
        text += sip.call_id + sip.from_number + sip.to_number + sip.trunk
    if _clean(text):
        return _to_row_cleaned(r, trace)
    return (
        r.job_id,
        r.dispatch_id,
        r.agent_name,
        r.room,
        r.metadata,
        _fast_json(attrs) if attrs else "[]",
        r.state,
        r.reason,
        worker_id,
        replica_id,
        r.created_at,
        r.placed_at,
        r.running_at,
        r.ended_at,
        r.queue_wait_s,
        r.max_wait_s,
        trace(r.trace),
        None if sip is None else sip.call_id,
        None if sip is None else sip.from_number,
        None if sip is None else sip.to_number,
        None if sip is None else sip.trunk,
        None if sip is None else sip.final_status,
    )


def _to_row_cleaned(
    r: JobRecord, trace: Callable[[Sequence[TraceRecord]], str | bytes | bytearray]
) -> tuple[Any, ...]:
    """`to_row` for a record with a text value `clean_text` changes."""
    sip = r.sip
    return (
        clean_text(r.job_id),
        clean_text(r.dispatch_id),
        clean_text(r.agent_name),
        clean_text(r.room),
        clean_text(r.metadata),
        _fast_json(r.attributes),
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
        trace(r.trace),
        None if sip is None else clean_text(sip.call_id),
        None if sip is None else clean_text(sip.from_number),
        None if sip is None else clean_text(sip.to_number),
        None if sip is None else clean_text(sip.trunk),
        None if sip is None else sip.final_status,
    )


def from_row(row: Sequence[Any]) -> JobRecord:
    """The record a row of `COLUMNS` holds (a trace as JSON text or in the
    compact binary form)."""
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
        trace=_load_trace(trace),
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


# ----------------------------------------------------------- scale events

EVENT_COLUMNS = (
    "event_id",
    "at",
    "pool",
    "kind",
    "from_replicas",
    "to_replicas",
    "desired",
    "reason",
    "running",
    "reserved",
    "queued",
    "refused",
    "slots_per_replica",
    "spare_slots",
    "replicas",
)
SELECT_EVENT_COLUMNS = ", ".join(EVENT_COLUMNS)


def to_event_row(e: ScaleEventRecord) -> tuple[Any, ...]:
    """`e` as the values of `EVENT_COLUMNS`."""
    return (
        clean_text(e.event_id),
        float(e.at),
        clean_text(e.pool),
        clean_text(e.kind),
        int(e.from_replicas),
        int(e.to_replicas),
        int(e.desired),
        clean_text(e.reason),
        int(e.running),
        int(e.reserved),
        int(e.queued),
        int(e.refused),
        int(e.slots_per_replica),
        int(e.spare_slots),
        _json([clean_text(r) for r in e.replicas]),
    )


def from_event_row(row: Sequence[Any]) -> ScaleEventRecord:
    """The scale event a row of `EVENT_COLUMNS` holds."""
    (
        event_id, at, pool, kind, from_r, to_r, desired, reason, running, reserved,
        queued, refused, slots, spare, replicas,
    ) = row  # fmt: skip
    return ScaleEventRecord(
        event_id=event_id,
        at=at,
        pool=pool,
        kind=kind,
        from_replicas=from_r,
        to_replicas=to_r,
        desired=desired,
        reason=reason,
        running=running,
        reserved=reserved,
        queued=queued,
        refused=refused,
        slots_per_replica=slots,
        spare_slots=spare,
        replicas=tuple(json.loads(replicas)),
    )


def unique_events(events: Sequence[ScaleEventRecord]) -> list[ScaleEventRecord]:
    """`events` with each event id once, the first occurrence kept."""
    seen: set[str] = set()
    out = []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            out.append(e)
    return out


def event_where(
    pool: str | None, since: float | None, until: float | None, param: Callable[[int], str]
) -> Where:
    w = Where(param, [], [])
    if pool is not None:
        w.add("pool = {}", clean_text(pool))
    if since is not None:
        w.add("at >= {}", since)
    if until is not None:
        w.add("at < {}", until)
    return w


# ------------------------------------------------------------------ usage

WIDTHS = tuple(usage.BUCKETS.values())
USAGE_ORDER = " ORDER BY bucket_start, pool"
USAGE_ROW_COLUMNS = (
    "pool, bucket_start, requested, placed, refused, agent_minutes, peak,"
    " wait_p50, wait_p95, wait_max, scale_events"
)


def usage_select(param: Callable[[int], str]) -> str:
    """The jobs a run of buckets [s, e) needs (`usage.compute`'s input):
    parameters (ended-at low, ended-at high, s, e, e, s). The ended-at range
    is what the job spans allow (see the module docstring), so the read is
    one range of the ended-at index."""
    p = param
    return (
        f"SELECT {', '.join(usage.USAGE_FIELDS)} FROM trunkline_jobs"
        f" WHERE ended_at >= {p(1)} AND ended_at < {p(2)}"
        f" AND ((created_at >= {p(3)} AND created_at < {p(4)})"
        f" OR (running_at < {p(5)} AND ended_at > {p(6)}))"
    )


def usage_args(s: float, e: float, lo: float, hi: float) -> tuple[float, ...]:
    """`usage_select`'s parameters for the buckets [s, e), job spans (lo, hi)."""
    return (s + min(lo, 0.0) - 1.0, e + max(hi, 0.0) + 1.0, s, e, e, s)


def event_counts_select(
    width: int, bucket_index: str, pool: str | None, param: Callable[[int], str]
) -> tuple[str, list[Any]]:
    """Scale events counted per (pool, bucket index, kind) for [lo, hi)
    (values appended by the caller: lo, hi first); `bucket_index` is the
    dialect's floor of `at / width` as an integer."""
    w = Where(param, [], [])
    w.add("at >= {}", 0.0)
    w.add("at < {}", 0.0)
    if pool is not None:
        w.add("pool = {}", clean_text(pool))
    b = bucket_index.format(width=width)
    return (
        f"SELECT pool, {b} AS b, kind, count(*) FROM trunkline_scale_events{w.sql()}"
        f" GROUP BY pool, {b}, kind",
        w.args,
    )


def runs(starts: Sequence[float], width: int) -> list[list[float]]:
    """`starts` (ascending) split into runs of adjacent buckets."""
    out: list[list[float]] = []
    for s in starts:
        if out and s - out[-1][-1] == width:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def event_keys(events: Sequence[ScaleEventRecord]) -> list[tuple[int, float]]:
    """The (width, start) buckets scale events count in."""
    return sorted({(w, usage.bucket_of(e.at, w)) for e in events for w in WIDTHS})


def prune_cut(before: float | None, removed: int, oldest: float | None) -> float | None:
    """Up to which bucket start retention must forget the usage cache: the
    buckets before `before` (their scale events went) and, when it removed
    records, every bucket at or before the oldest record left (None: none)."""
    cut = -math.inf if before is None else before
    if removed:
        cut = max(cut, math.inf if oldest is None else oldest)
    return None if cut == -math.inf else cut


def touched_keys(rows: Sequence[tuple[Any, ...]]) -> list[tuple[int, float]]:
    """The (width, start) buckets the job rows (from `to_row`) count in."""
    ci, ri, ei = COLUMNS.index("created_at"), COLUMNS.index("running_at"), COLUMNS.index("ended_at")
    if not rows:
        return []
    # A batch nearly always lies within one bucket of each width: then that
    # bucket is the answer (each row's created bucket, and its served
    # interval cannot reach past the batch's extremes), found from the
    # batch's extremes instead of row by row.
    lo = min(row[ci] for row in rows)
    hi = max(max(row[ei], row[ci]) for row in rows)
    if all(row[ri] is None or row[ri] >= lo for row in rows):
        keys: set[tuple[int, float]] = set()
        for w in WIDTHS:
            start = usage.bucket_of(lo, w)
            if usage.bucket_of(hi, w) != start:
                break
            keys.add((w, start))
        else:
            return sorted(keys)
    keys = set()
    for row in rows:
        keys.update(usage.touched(row[ci], row[ri], row[ei], WIDTHS))
    return sorted(keys)


def pack_waits(waits: Sequence[float] | None) -> bytes | None:
    """Sorted queue waits as a blob (8-byte little-endian doubles)."""
    return None if waits is None else struct.pack(f"<{len(waits)}d", *waits)


def unpack_waits(blob: bytes | None) -> tuple[float, ...]:
    return () if not blob else struct.unpack(f"<{len(blob) // 8}d", blob)


def to_usage_row(width: int, r: UsageRow, waits: Sequence[float] | None = None) -> tuple[Any, ...]:
    """`r` as the values of a `trunkline_usage` row (width first); an hour
    row keeps its sorted `waits` too (a day's are ranked from them)."""
    return (
        width,
        r.start,
        r.pool,
        r.requested,
        r.placed,
        _json(r.refused),
        r.agent_minutes,
        r.peak_concurrent,
        r.wait_p50_s,
        r.wait_p95_s,
        r.wait_max_s,
        _json(r.scale_events),
        pack_waits(waits),
    )


@functools.lru_cache(maxsize=4096)
def _counts(text: str) -> tuple[tuple[str, int], ...]:
    """A JSON list of [kind, count] pairs; the few distinct ones repeat over
    thousands of rows, so each is parsed once."""
    return tuple((k, n) for k, n in json.loads(text))


def from_usage_row(row: Sequence[Any], bucket: str) -> UsageRow:
    """The usage row a `USAGE_ROW_COLUMNS` row holds."""
    pool, start, requested, placed, refused, minutes, peak, p50, p95, wmax, events = row
    return UsageRow(
        pool, start, bucket, requested, placed, _counts(refused), minutes, peak, p50, p95, wmax,
        _counts(events),
    )  # fmt: skip
