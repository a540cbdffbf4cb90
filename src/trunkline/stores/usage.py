"""Scale events and the usage report: what the history keeps of scaling, and
the per-pool, per-bucket figures every backend computes the same way.

Theory of operation
-------------------
A `ScaleEventRecord` is an autoscaler decision frozen in wall-clock time:
when, which pool, which way (`kind`), the replicas before and after, and what
triggered it (the pool's demand at that moment and the policy's reason).
Stores keep them, immutable, next to the job records.

The usage report cuts time into UTC-aligned buckets (`hour`, `day`) and gives,
for each pool and bucket that saw anything, a `UsageRow`:

- calls `requested`, `placed` and `refused` (by `refusal_kind`) count the jobs
  *created* in the bucket, and so do the queue-wait figures (nearest-rank
  p50 and p95, and the max, over those jobs' `queue_wait_s`);
- `agent_minutes` and `peak_concurrent` follow the calls being *served*, each
  the half-open interval [running_at, ended_at): agent minutes are the parts
  of those intervals inside the bucket; the peak is the most intervals open at
  one instant of the bucket (an end and a start at the same instant count
  once, ends first);
- `scale_events` counts the bucket's scale events by kind.

Buckets are whole: a report from `since` to `until` covers every bucket that
overlaps [since, until), from its start to its end. `compute` is the one
implementation of these rules: the memory store runs it over every record,
the SQL stores over the records of the buckets their cache lacks, so the
backends cannot disagree on a definition. Sums use `math.fsum`, which gives
the same float whatever order the rows come in.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from trunkline.core.autoscale import ScaleEvent
from trunkline.stores.query import InvalidQuery

BUCKETS: dict[str, int] = {"hour": 3600, "day": 86_400}
MAX_BUCKETS = 2000  # per report: 83 days of hours, 5 years of days
MAX_EVENT_LIMIT = 1000

REFUSED_STATES = frozenset({"no_capacity", "rejected"})
# (kind, a phrase only that cause's reason holds); see trunkline.core.reasons.
# tests/stores/test_usage.py feeds every reason the scheduler writes through
# `refusal_kind`, so rewording one there fails a test instead of a report.
_NO_CAPACITY_KINDS = (
    ("queue_full", "jobs queued, its limit"),
    ("quota", "is at its quota"),
    ("no_workers", "has no worker registered"),
    ("no_free_slot", "has no worker with a free slot"),
)
REFUSAL_KINDS = ("queue_full", "quota", "no_workers", "no_free_slot", "rejected", "other")

Counts = tuple[tuple[str, int], ...]


def refusal_kind(state: str, reason: str) -> str | None:
    """Why a job was refused, as a stable kind (one of `REFUSAL_KINDS`), or
    None if it was not refused (it did not end `no_capacity` or `rejected`)."""
    if state == "rejected":
        return "rejected"
    if state != "no_capacity":
        return None
    for kind, phrase in _NO_CAPACITY_KINDS:
        if phrase in reason:
            return kind
    return "other"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleEventRecord:
    """One scaling decision as the history keeps it; `at` is Unix seconds.

    `kind`: up, down, replace (starts after failures), failed or rollout.
    `from_replicas` / `to_replicas` count serving replicas (starting + ready)
    before and after; `desired` is what the policy asked for. What triggered
    it: the pool's demand then (`running`, `reserved`, `queued`, `refused`
    calls), the slots per replica and spare slots the policy keeps, and
    `reason`. `replicas` names the replicas started or stopped. `event_id`
    is unique (first write wins)."""

    event_id: str
    at: float
    pool: str
    kind: str
    from_replicas: int
    to_replicas: int
    desired: int
    reason: str = ""
    running: int = 0
    reserved: int = 0
    queued: int = 0
    refused: int = 0
    slots_per_replica: int = 0
    spare_slots: int = 0
    replicas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, tuple):
            object.__setattr__(self, "replicas", tuple(self.replicas))
        if not math.isfinite(self.at):
            raise ValueError(f"scale event {self.event_id!r}: 'at' must be finite")

    @classmethod
    def from_event(cls, ev: ScaleEvent, wall_offset: float, event_id: str) -> ScaleEventRecord:
        """The record of the autoscaler's event `ev`, whose scheduler time
        `at + wall_offset` is Unix time."""
        d = ev.demand
        return cls(
            event_id=event_id,
            at=ev.at + wall_offset,
            pool=ev.pool,
            kind=ev.kind,
            from_replicas=ev.from_replicas,
            to_replicas=ev.to_replicas,
            desired=ev.desired,
            reason=ev.reason,
            running=d.running,
            reserved=d.reserved,
            queued=d.queued,
            refused=d.refused,
            slots_per_replica=ev.capacity,
            spare_slots=ev.spare_slots,
            replicas=tuple(ev.replicas),
        )


def event_order(e: ScaleEventRecord) -> tuple[float, str]:
    """`e`'s position in store order (newest first = this, descending)."""
    return (e.at, e.event_id)


class UsageRow(NamedTuple):
    """One pool's figures in one bucket (see the module docstring).
    `refused` and `scale_events` are (kind, count) pairs sorted by kind,
    kinds with no count left out; the waits are None when no call was
    created in the bucket. A named tuple: a month of hours is thousands of
    rows, and a tuple is built ten times faster than a frozen dataclass."""

    pool: str
    start: float
    bucket: str
    requested: int = 0
    placed: int = 0
    refused: Counts = ()
    agent_minutes: float = 0.0
    peak_concurrent: int = 0
    wait_p50_s: float | None = None
    wait_p95_s: float | None = None
    wait_max_s: float | None = None
    scale_events: Counts = ()

    @property
    def refused_total(self) -> int:
        return sum(n for _, n in self.refused)


def check_usage(since: float, until: float, bucket: str) -> int:
    """The bucket width in seconds, if (since, until, bucket) is a report a
    store answers; else raises `InvalidQuery` naming the parameter."""
    width = BUCKETS.get(bucket)
    if width is None:
        raise InvalidQuery(f"'bucket' must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    for name, t in (("since", since), ("until", until)):
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise InvalidQuery(f"'{name}' must be a finite Unix time, got {t!r}")
    if since >= until:
        raise InvalidQuery(f"'since' ({since!r}) must be before 'until' ({until!r})")
    n = len(bucket_starts(since, until, width, cap=MAX_BUCKETS + 1))
    if n > MAX_BUCKETS:
        raise InvalidQuery(
            f"'bucket' {bucket} over this range gives more than {MAX_BUCKETS} buckets; "
            "use a shorter range or bucket=day"
        )
    return width


def bucket_of(t: float, width: int) -> float:
    """The start of the bucket holding time `t`."""
    return math.floor(t / width) * float(width)


def bucket_starts(since: float, until: float, width: int, *, cap: int | None = None) -> list[float]:
    """Starts of the buckets overlapping [since, until), oldest first (at
    most `cap` of them)."""
    first = math.floor(since / width)
    last = math.ceil(until / width)  # exclusive
    if cap is not None:
        last = min(last, first + cap)
    return [float(i * width) for i in range(first, last)]


def touched(
    created: float, running: float | None, ended: float, widths: Iterable[int]
) -> list[tuple[int, float]]:
    """The (width, start) buckets whose figures a record with these times
    counts in: its created bucket and every bucket its served interval
    overlaps (what a store's usage cache must forget when it is added)."""
    out = []
    for w in widths:
        out.append((w, bucket_of(created, w)))
        if running is not None and ended > running:
            first, last = math.floor(running / w), math.ceil(ended / w)
            out.extend((w, float(i * w)) for i in range(first, last))
    return out


# The fields `compute` reads of each job, in this order (the SQL stores
# select just these columns).
USAGE_FIELDS = (
    "agent_name",
    "state",
    "reason",
    "created_at",
    "placed_at",
    "running_at",
    "ended_at",
    "queue_wait_s",
)
UsageInput = tuple[str, str, str, float, float | None, float | None, float, float]


def nearest_rank(sorted_values: Sequence[float], pct: int) -> float:
    """The `pct` percentile of non-empty `sorted_values` by nearest rank: the
    smallest value with at least pct % of the values at or below it."""
    n = len(sorted_values)
    return sorted_values[max(0, (pct * n + 99) // 100 - 1)]


@dataclass
class _Acc:
    requested: int = 0
    placed: int = 0
    waits: list[float] | None = None
    refused: Counter[str] | None = None
    minutes: list[float] | None = None
    initial: int = 0  # intervals open at the bucket's start
    changes: list[tuple[float, int]] | None = None


def compute(
    jobs: Iterable[UsageInput],
    starts: Sequence[float],
    width: int,
    bucket: str,
    waits_out: dict[tuple[str, float], list[float]] | None = None,
) -> dict[tuple[str, float], UsageRow]:
    """The usage rows (without scale events) of the buckets `starts` (of
    `width` seconds, named `bucket`) from `jobs`, which must hold every job
    created in those buckets or served during them (others are ignored), each
    once. Keyed by (pool, start); pools with nothing in a bucket are absent.
    `waits_out`, if given, gets each row's queue waits, sorted (what a SQL
    store keeps to rank a day's waits from its hours')."""
    wanted = set(starts)
    acc: defaultdict[tuple[str, float], _Acc] = defaultdict(_Acc)
    for pool, state, reason, created, placed, running, ended, wait in jobs:
        cb = bucket_of(created, width)
        if cb in wanted:
            a = acc[(pool, cb)]
            a.requested += 1
            if placed is not None:
                a.placed += 1
            if a.waits is None:
                a.waits = []
            a.waits.append(wait)
            kind = refusal_kind(state, reason)
            if kind is not None:
                if a.refused is None:
                    a.refused = Counter()
                a.refused[kind] += 1
        if running is None or not ended > running:
            continue
        for i in range(math.floor(running / width), math.ceil(ended / width)):
            s = float(i * width)
            if s not in wanted:
                continue
            e = s + width
            a = acc[(pool, s)]
            if a.minutes is None:
                a.minutes, a.changes = [], []
            assert a.changes is not None
            a.minutes.append((min(ended, e) - max(running, s)) / 60.0)
            if running <= s:
                a.initial += 1
            else:
                a.changes.append((running, 1))
            if ended < e:
                a.changes.append((ended, -1))
    out: dict[tuple[str, float], UsageRow] = {}
    for (pool, s), a in acc.items():
        peak = level = a.initial
        for _, delta in sorted(a.changes or ()):  # -1 sorts before +1 at one instant
            level += delta
            peak = max(peak, level)
        waits = sorted(a.waits) if a.waits else None
        if waits_out is not None:
            waits_out[(pool, s)] = waits or []
        out[(pool, s)] = UsageRow(
            pool=pool,
            start=s,
            bucket=bucket,
            requested=a.requested,
            placed=a.placed,
            refused=tuple(sorted(a.refused.items())) if a.refused else (),
            agent_minutes=math.fsum(a.minutes) if a.minutes else 0.0,
            peak_concurrent=peak,
            wait_p50_s=nearest_rank(waits, 50) if waits else None,
            wait_p95_s=nearest_rank(waits, 95) if waits else None,
            wait_max_s=waits[-1] if waits else None,
        )
    return out


def event_counts(
    events: Iterable[tuple[str, float, str]], width: int
) -> list[tuple[str, float, str, int]]:
    """(pool, bucket start, kind, count) of scale events given as (pool, at, kind)."""
    counts: Counter[tuple[str, float, str]] = Counter()
    for p, at, kind in events:
        counts[(p, bucket_of(at, width), kind)] += 1
    return [(p, s, k, n) for (p, s, k), n in counts.items()]


def with_scale_events(
    rows: dict[tuple[str, float], UsageRow],
    counts: Iterable[tuple[str, float, str, int]],
    bucket: str,
    pool: str | None,
) -> tuple[UsageRow, ...]:
    """`rows` with the scale-event counts (pool, bucket start, kind, count)
    added (a pool with only scale events in a bucket gets a row of its own),
    restricted to `pool` if set, in (start, pool) order."""
    by_key: defaultdict[tuple[str, float], list[tuple[str, int]]] = defaultdict(list)
    for p, start, kind, n in counts:
        if pool is None or p == pool:
            by_key[(p, float(start))].append((kind, int(n)))
    merged = {k: r for k, r in rows.items() if pool is None or k[0] == pool}
    for key, c in by_key.items():
        r = merged.get(key)
        events = tuple(sorted(c))
        merged[key] = (
            UsageRow(pool=key[0], start=key[1], bucket=bucket, scale_events=events)
            if r is None
            else r._replace(scale_events=events)
        )
    return tuple(merged[k] for k in sorted(merged, key=_start_then_pool))


def _start_then_pool(key: tuple[str, float]) -> tuple[float, str]:
    return key[1], key[0]


def days_from_hours(
    hours: Iterable[tuple[UsageRow, Sequence[float]]], start: float
) -> dict[tuple[str, float], UsageRow]:
    """The rows of the day at `start` from its hour rows, each with its
    sorted queue waits: every job created that day was created in one of its
    hours, every piece of a served interval lies in one of them, and the
    day's peak is its hours' highest. The waits of the day, merged, give its
    percentiles exactly."""
    acc: dict[str, list[tuple[UsageRow, Sequence[float]]]] = defaultdict(list)
    for h, waits in hours:
        acc[h.pool].append((h, waits))
    out = {}
    for p, hs in acc.items():
        refused: Counter[str] = Counter()
        events: Counter[str] = Counter()
        for h, _ in hs:
            refused.update(dict(h.refused))
            events.update(dict(h.scale_events))
        # Sorted runs: the sort merges them (in C), no comparisons inside a run.
        waits = sorted(itertools.chain.from_iterable(w for _, w in hs))
        out[(p, start)] = UsageRow(
            pool=p,
            start=start,
            bucket="day",
            requested=sum(h.requested for h, _ in hs),
            placed=sum(h.placed for h, _ in hs),
            refused=tuple(sorted((k, v) for k, v in refused.items() if v)),
            agent_minutes=math.fsum(h.agent_minutes for h, _ in hs),
            peak_concurrent=max(h.peak_concurrent for h, _ in hs),
            wait_p50_s=nearest_rank(waits, 50) if waits else None,
            wait_p95_s=nearest_rank(waits, 95) if waits else None,
            wait_max_s=waits[-1] if waits else None,
            scale_events=tuple(sorted(events.items())),
        )
    return out


def check_event_query(since: float | None, until: float | None, limit: int) -> None:
    """Raises `InvalidQuery` for a scale-event query a store does not answer."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_EVENT_LIMIT:
        raise InvalidQuery(f"'limit' must be an integer in [1, {MAX_EVENT_LIMIT}], got {limit!r}")
    for name, t in (("since", since), ("until", until)):
        if t is not None and not math.isfinite(t):
            raise InvalidQuery(f"'{name}' must be a finite Unix time, got {t!r}")


def event_matches(
    e: ScaleEventRecord, pool: str | None, since: float | None, until: float | None
) -> bool:
    """`e` is of `pool` (None: any) with since <= at < until (None: open)."""
    return (
        (pool is None or e.pool == pool)
        and (since is None or e.at >= since)
        and (until is None or e.at < until)
    )
