"""The history-store contract, part two: scale events and the usage report.

Same rules as `contract.py` (whose `CHECKS` include these): each check takes
a `Backend` and raises AssertionError when the backend breaks the contract.
Expected usage figures come from `expected_usage` here, a brute-force reading
of the definitions in `trunkline.stores.usage` (every bucket, every job,
concurrency counted at every instant a call starts), never from the store or
from `usage.compute`, so a wrong definition in the shared code fails too.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from trunkline.stores import InvalidQuery, JobRecord, TraceRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow

if TYPE_CHECKING:
    from stores.contract import Backend


# contract.py imports this module at its end (to add these checks to its
# CHECKS), so its helpers are looked up when a check runs, not at import.
def raises(kind: type[BaseException], match: str = "") -> Any:
    from stores.contract import raises

    return raises(kind, match)


@asynccontextmanager
async def opened(backend: Backend) -> AsyncIterator[Any]:
    from stores.contract import opened

    async with opened(backend) as store:
        yield store


async def filled(store: Any, records: Sequence[JobRecord], batch: int = 7) -> None:
    from stores.contract import filled

    await filled(store, records, batch)


HOUR = 3600.0
DAY = 86_400.0
T0 = (
    math.floor(1_700_000_000 / DAY) * DAY + 5 * HOUR
)  # a day boundary plus 5 h: days and hours both cut
USAGE_POOLS = ("support", "sales")
# Refused jobs' reasons and the kind each is, worded as trunkline.core.reasons words them.
REFUSALS = (
    ("queue_full", "pool 'p' has 9 jobs queued, its limit (max_queued = 9); retry later"),
    ("quota", "pool 'p' is at its quota of 4 jobs; 2 other jobs queued; waited 5.00 s"),
    ("no_workers", "pool 'p' has no worker registered; 0 other jobs queued; waited 5.00 s"),
    ("no_free_slot", "pool 'p' has no worker with a free slot (2 workers); 1 other jobs"),
    ("other", "the SIP edge gave up"),
)


@dataclasses.dataclass(frozen=True)
class Call:
    """A test job with the facts the reference needs spelled out."""

    record: JobRecord
    refused: str | None  # the refusal kind, by construction


def call(
    n: int,
    pool: str,
    created: float,
    *,
    wait: float = 0.5,
    serve: tuple[float, float] | None = None,
    refused: str | None = None,
) -> Call:
    """Job `n` of `pool`: created at `created`, queued `wait` s, then served
    over `serve` (start, end) or refused with kind `refused`."""
    if refused is not None:
        state = "rejected" if refused == "rejected" else "no_capacity"
        reason = dict(REFUSALS).get(refused, "worker W1 rejected the job (terminate=true)")
        placed = created + wait if refused == "rejected" else None
        ended = created + wait + (0.01 if refused == "rejected" else 0.0)
        running = None
    else:
        assert serve is not None
        state, reason = ("succeeded" if n % 5 else "failed"), ""
        placed, running, ended = created + wait, serve[0], serve[1]
    rec = JobRecord(
        job_id=f"U{n:05d}",
        agent_name=pool,
        room=f"r{n}",
        state=state,
        reason=reason,
        worker_id=None if running is None else f"W{n % 3}",
        created_at=created,
        placed_at=placed,
        running_at=running,
        ended_at=ended,
        queue_wait_s=wait,
        max_wait_s=5.0,
        trace=(TraceRecord(created, "requested"),),
    )
    return Call(rec, refused)


def usage_calls(count: int = 160, seed: int = 3) -> list[Call]:
    """Calls over about seven hours around a day boundary: short and long
    (up to 2.5 h, so many span buckets), some ending exactly when another
    starts, some served for no time at all, a fifth refused (every kind),
    waits repeated so percentiles fall on ties."""
    rnd = random.Random(seed)
    out: list[Call] = []
    for n in range(count):
        pool = USAGE_POOLS[n % 2]
        created = T0 - 2 * HOUR + rnd.randrange(0, 7 * 3600 * 4) / 4  # quarter seconds
        wait = rnd.choice((0.0, 0.25, 0.25, 1.0, 2.5, 7.75))
        if n % 5 == 4:
            kinds = [k for k, _ in REFUSALS] + ["rejected"]
            out.append(call(n, pool, created, wait=wait, refused=kinds[n // 5 % len(kinds)]))
            continue
        start = created + wait + rnd.choice((0.0, 0.75, 3.0))  # placed, then started
        length = rnd.choice((0.0, 30.0, 240.0, 1800.0, 5400.0, 9000.0))
        out.append(call(n, pool, created, wait=wait, serve=(start, start + length)))
    # Exact touch: one call ends at the instant the next starts (counted once),
    # in a pool of their own, where it decides the peak.
    out.append(call(count, "billing", T0 - 100, wait=0.0, serve=(T0 - 100, T0 + 50)))
    out.append(call(count + 1, "billing", T0 + 50, wait=0.0, serve=(T0 + 50, T0 + 70)))
    # A call served across the whole range's buckets.
    out.append(
        call(count + 2, "sales", T0 - 2 * HOUR, wait=0.0, serve=(T0 - 2 * HOUR, T0 + 5 * HOUR))
    )
    return out


def events(count: int = 24, seed: int = 5) -> list[ScaleEventRecord]:
    """Scale events of both pools and a third that has no calls, some at the
    same instant (ties broken by event id), shuffled."""
    rnd = random.Random(seed)
    kinds = ("up", "down", "replace", "failed", "rollout")
    out = []
    for n in range(count):
        at = T0 - 2 * HOUR + (n // 2) * 1234.5
        out.append(
            ScaleEventRecord(
                event_id=f"E{n:03d}",
                at=at,
                pool=("support", "sales", "voicemail")[n % 3],
                kind=kinds[n % 5],
                from_replicas=n % 4,
                to_replicas=n % 4 + (1 if n % 2 else -1),
                desired=n % 4 + 1,
                reason=f"demand {n} > capacity",
                running=n,
                reserved=n % 2,
                queued=n % 3,
                refused=n % 4,
                slots_per_replica=4,
                spare_slots=1,
                replicas=(f"rep-{n}", f"rep-{n + 1}"),
            )
        )
    rnd.shuffle(out)
    return out


# ------------------------------------------------------------ the reference


def _nearest_rank(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    k = math.ceil(pct / 100 * len(ordered))
    return ordered[max(k, 1) - 1]


def expected_usage(
    calls: Sequence[Call],
    evs: Sequence[ScaleEventRecord],
    since: float,
    until: float,
    bucket: str,
    pool: str | None = None,
) -> list[UsageRow]:
    """The report worked out by brute force from the definitions."""
    width = HOUR if bucket == "hour" else DAY
    first = math.floor(since / width) * width
    rows = []
    s = first
    while s < until:
        e = s + width
        for p in sorted({c.record.agent_name for c in calls} | {ev.pool for ev in evs}):
            if pool is not None and p != pool:
                continue
            mine = [c for c in calls if c.record.agent_name == p]
            created = [c for c in mine if s <= c.record.created_at < e]
            served = [
                (c.record.running_at, c.record.ended_at)
                for c in mine
                if c.record.running_at is not None
                and c.record.ended_at is not None
                and c.record.ended_at > c.record.running_at
                and c.record.running_at < e
                and c.record.ended_at > s
            ]
            evk = sorted({ev.kind for ev in evs if ev.pool == p and s <= ev.at < e})
            if not created and not served and not evk:
                continue
            instants = [s] + [r for r, _ in served if s < r < e]
            peak = max(sum(1 for r, d in served if r <= t < d) for t in instants)
            refused: dict[str, int] = {}
            for c in created:
                if c.refused is not None:
                    refused[c.refused] = refused.get(c.refused, 0) + 1
            waits = [c.record.queue_wait_s for c in created]
            rows.append(
                UsageRow(
                    pool=p,
                    start=s,
                    bucket=bucket,
                    requested=len(created),
                    placed=sum(1 for c in created if c.record.placed_at is not None),
                    refused=tuple(sorted(refused.items())),
                    agent_minutes=math.fsum(min(d, e) - max(r, s) for r, d in served) / 60,
                    peak_concurrent=peak if served else 0,
                    wait_p50_s=_nearest_rank(waits, 50) if waits else None,
                    wait_p95_s=_nearest_rank(waits, 95) if waits else None,
                    wait_max_s=max(waits) if waits else None,
                    scale_events=tuple(
                        (
                            k,
                            sum(
                                1 for ev in evs if ev.pool == p and ev.kind == k and s <= ev.at < e
                            ),
                        )
                        for k in evk
                    ),
                )
            )
        s = e
    return rows


def assert_same_usage(got: Sequence[UsageRow], want: Sequence[UsageRow], what: str) -> None:
    """Row by row, field by field (agent minutes to 1e-9: SQL sums may round)."""
    assert isinstance(got, tuple), f"{what}: usage must return a tuple, got {type(got).__name__}"
    key = [(r.start, r.pool) for r in got]
    assert key == [(r.start, r.pool) for r in want], f"{what}: rows (start, pool) differ"
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, UsageRow)
        gd, wd = g._asdict(), w._asdict()
        assert gd.pop("agent_minutes") == pytest.approx(wd.pop("agent_minutes"), rel=1e-9), (
            f"{what}: agent_minutes of {g.pool} at {g.start}"
        )
        gd["refused"], gd["scale_events"] = tuple(gd["refused"]), tuple(gd["scale_events"])
        wd["refused"], wd["scale_events"] = tuple(wd["refused"]), tuple(wd["scale_events"])
        assert gd == wd, f"{what}: {g.pool} at {g.start}"


async def _report(store: object, calls: Sequence[Call], evs: Sequence[ScaleEventRecord]) -> None:
    """Every report shape over the data matches the reference."""
    assert hasattr(store, "usage")
    cases = [
        (T0 - 2 * HOUR, T0 + 6 * HOUR, "hour", None),
        (T0 - 90 * 60, T0 + 30, "hour", "support"),  # partial buckets: reported whole
        (T0 - DAY, T0 + DAY, "day", None),
        (T0 - 2 * HOUR, T0 + 6 * HOUR, "day", "sales"),
        (T0 + 20 * HOUR, T0 + 23 * HOUR, "hour", None),  # nothing there
    ]
    for since, until, bucket, pool in cases:
        got = await store.usage(since=since, until=until, bucket=bucket, pool=pool)
        want = expected_usage(calls, evs, since, until, bucket, pool)
        assert_same_usage(got, want, f"usage {bucket} {pool} [{since - T0}, {until - T0})")


# --------------------------------------------------------------------- checks


async def check_usage_report(backend: Backend) -> None:
    """Per pool and hour/day bucket: calls requested, placed, refused by kind,
    agent minutes, peak concurrency, queue-wait p50/p95/max and scale events,
    as the definitions give them; a pool filter; empty ranges are empty."""
    calls, evs = usage_calls(), events()
    async with opened(backend) as store:
        await filled(store, [c.record for c in calls], batch=11)
        await store.add_scale_events(evs)
        await _report(store, calls, evs)


async def check_usage_sees_late_records(backend: Backend) -> None:
    """A report already answered (a store may cache it) changes when records
    filed later count in its buckets: a long call that ended later, a job
    created back then."""
    calls, evs = usage_calls(), events()
    first, late = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    async with opened(backend) as store:
        await filled(store, [c.record for c in first])
        await store.add_scale_events(evs[:10])
        await _report(store, first, evs[:10])
        await filled(store, [c.record for c in late], batch=5)
        await store.add_scale_events(evs[10:])
        await _report(store, calls, evs)
        extra = call(9999, "support", T0 - 2 * HOUR + 1, serve=(T0 - 2 * HOUR + 2, T0 + 4 * HOUR))
        await store.add([extra.record])
        await _report(store, [*calls, extra], evs)


async def check_usage_bad_params(backend: Backend) -> None:
    """A report the store cannot give raises InvalidQuery naming the part."""
    async with opened(backend) as store:
        with raises(InvalidQuery, "bucket"):
            await store.usage(since=T0, until=T0 + HOUR, bucket="week")
        with raises(InvalidQuery, "since"):
            await store.usage(since=T0 + HOUR, until=T0, bucket="hour")
        with raises(InvalidQuery, "since"):
            await store.usage(since=T0, until=T0, bucket="hour")
        with raises(InvalidQuery, "until"):
            await store.usage(since=T0, until=math.inf, bucket="day")
        with raises(InvalidQuery, "since"):
            await store.usage(since=math.nan, until=T0, bucket="day")
        with raises(InvalidQuery, "bucket"):  # 2,001 hours
            await store.usage(since=T0, until=T0 + 2001 * HOUR, bucket="hour")
        assert await store.usage(since=T0, until=T0 + 2000 * HOUR, bucket="hour") == ()


async def check_usage_after_prune(backend: Backend) -> None:
    """Retention takes records and scale events out of the report too."""
    calls, evs = usage_calls(), events()
    async with opened(backend) as store:
        await filled(store, [c.record for c in calls])
        await store.add_scale_events(evs)
        await _report(store, calls, evs)
        cut = T0 + 30 * 60
        await store.prune(before=cut)
        left = [c for c in calls if (c.record.ended_at or 0) >= cut]
        await _report(store, left, [e for e in evs if e.at >= cut])
        await store.prune(keep=10)
        newest = sorted(left, key=lambda c: (c.record.ended_at or 0, c.record.job_id))[-10:]
        await _report(store, newest, [e for e in evs if e.at >= cut])


async def check_scale_events(backend: Backend) -> None:
    """Scale events round-trip exactly, newest first (ties by event id
    descending), by pool and time range (since inclusive, until exclusive),
    up to a limit; a repeated event id keeps the first event."""
    evs = events()
    async with opened(backend) as store:
        assert await store.scale_events() == ()
        await store.add_scale_events(evs[:13])
        await store.add_scale_events(evs[13:])
        again = dataclasses.replace(evs[0], reason="rewritten", to_replicas=99)
        await store.add_scale_events([again])
        order = sorted(evs, key=lambda e: (e.at, e.event_id), reverse=True)
        assert await store.scale_events(limit=1000) == tuple(order)
        assert await store.scale_events(limit=5) == tuple(order[:5])
        since, until = T0 - HOUR, T0 + HOUR
        for pool in (None, "support", "voicemail", "nobody"):
            want = tuple(
                e for e in order if (pool is None or e.pool == pool) and since <= e.at < until
            )
            got = await store.scale_events(pool=pool, since=since, until=until, limit=100)
            assert got == want, f"pool {pool}"
        edge = order[3].at
        assert all(e.at >= edge for e in await store.scale_events(since=edge, limit=100))
        assert edge in {e.at for e in await store.scale_events(since=edge, limit=100)}
        assert edge not in {e.at for e in await store.scale_events(until=edge, limit=100)}


async def check_scale_events_bad_query(backend: Backend) -> None:
    """A scale-event query outside the limits raises InvalidQuery."""
    async with opened(backend) as store:
        for limit in (0, 1001, -1):
            with raises(InvalidQuery, "limit"):
                await store.scale_events(limit=limit)
        with raises(InvalidQuery, "since"):
            await store.scale_events(since=math.nan)
        assert await store.scale_events(limit=1000) == ()


USAGE_CHECKS = (
    check_usage_report,
    check_usage_sees_late_records,
    check_usage_bad_params,
    check_usage_after_prune,
    check_scale_events,
    check_scale_events_bad_query,
)
