"""Broken fakes for the scale-event and usage checks (`contract_usage.py`):
each is the memory backend with one defect a SQL backend could have, paired
with the check that must catch it. `test_contract_catches_broken.py` runs them
with the others (`USAGE_FAKES`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from stores.contract import Backend

from trunkline.stores import MemoryHistory
from trunkline.stores.usage import (
    BUCKETS,
    ScaleEventRecord,
    UsageInput,
    UsageRow,
    bucket_starts,
    compute,
    event_counts,
    event_matches,
    with_scale_events,
)


def fake(cls: type[MemoryHistory], **kw: object) -> Backend:
    def make(capacity: int | None) -> MemoryHistory:
        return cls(capacity=10_000 if capacity is None else capacity, **kw)

    return Backend(cls.__name__ + "".join(f"-{v}" for v in kw.values()), make, True)


class _Recomputes(MemoryHistory):
    """The memory report with the job inputs (or the result) changed."""

    def _inputs(self, jobs: list[UsageInput]) -> list[UsageInput]:
        return jobs

    def _rows(self, rows: dict[tuple[str, float], UsageRow]) -> dict[tuple[str, float], UsageRow]:
        return rows

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        await super().usage(since=since, until=until, bucket=bucket, pool=pool)  # validates
        width = BUCKETS[bucket]
        starts = bucket_starts(since, until, width)
        jobs = [_input(r) for r in self._by_id.values() if pool is None or r.agent_name == pool]
        rows = self._rows(compute(self._inputs(jobs), starts, width, bucket))
        lo, hi = starts[0], starts[-1] + width
        evs = [(e.pool, e.at, e.kind) for _, e in self._events if event_matches(e, pool, lo, hi)]
        return with_scale_events(rows, event_counts(evs, width), bucket, pool)


def _input(r: Any) -> UsageInput:
    return (
        r.agent_name, r.state, r.reason, r.created_at, r.placed_at, r.running_at,
        r.ended_at, r.queue_wait_s,
    )  # fmt: skip


class UsageByEnded(_Recomputes):
    """Counts calls in the bucket they ended in, not the one they were created in."""

    def _inputs(self, jobs: list[UsageInput]) -> list[UsageInput]:
        return [(p, s, r, e, pl, ru, e, w) for p, s, r, _c, pl, ru, e, w in jobs]


class ServedFromPlaced(_Recomputes):
    """Agent minutes and concurrency from placement, not from running."""

    def _inputs(self, jobs: list[UsageInput]) -> list[UsageInput]:
        return [
            (p, s, r, c, pl, pl if ru is not None else None, e, w)
            for p, s, r, c, pl, ru, e, w in jobs
        ]


class PeakCountsTouching(_Recomputes):
    """An end and a start at the same instant both count (+1 before -1)."""

    def _inputs(self, jobs: list[UsageInput]) -> list[UsageInput]:
        # Lengthen every served interval by a hair: touching calls now overlap.
        return [
            (p, s, r, c, pl, ru, e + 1e-6 if ru is not None and e > ru else e, w)
            for p, s, r, c, pl, ru, e, w in jobs
        ]


class InterpolatedPercentile(_Recomputes):
    """p95 by linear interpolation instead of nearest rank."""

    def _rows(self, rows: dict[tuple[str, float], UsageRow]) -> dict[tuple[str, float], UsageRow]:
        out = {}
        for key, row in rows.items():
            waits = sorted(
                r.queue_wait_s
                for r in self._by_id.values()
                if r.agent_name == key[0]
                and math.floor(r.created_at / _width(row)) * _width(row) == row.start
            )
            p95 = row.wait_p95_s
            if waits:
                pos = 0.95 * (len(waits) - 1)
                lo = math.floor(pos)
                hi = min(lo + 1, len(waits) - 1)
                p95 = waits[lo] + (waits[hi] - waits[lo]) * (pos - lo)
            out[key] = row._replace(wait_p95_s=p95)
        return out


def _width(row: UsageRow) -> int:
    return BUCKETS[row.bucket]


class MinutesUnclipped(_Recomputes):
    """A call's whole length counted in every bucket it touches."""

    def _rows(self, rows: dict[tuple[str, float], UsageRow]) -> dict[tuple[str, float], UsageRow]:
        out = {}
        for key, row in rows.items():
            w = _width(row)
            total = math.fsum(
                ((r.ended_at or 0.0) - r.running_at) / 60
                for r in self._by_id.values()
                if r.agent_name == key[0]
                and r.running_at is not None
                and (r.ended_at or 0.0) > r.running_at
                and r.running_at < row.start + w
                and (r.ended_at or 0.0) > row.start
            )
            out[key] = row._replace(agent_minutes=total)
        return out


class RefusedLumped(_Recomputes):
    """Every refusal counted under one kind."""

    def _rows(self, rows: dict[tuple[str, float], UsageRow]) -> dict[tuple[str, float], UsageRow]:
        return {
            k: r._replace(refused=(("no_capacity", r.refused_total),) if r.refused else ())
            for k, r in rows.items()
        }


class UsageIgnoresPool(MemoryHistory):
    """The pool filter of the report is dropped."""

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        return await super().usage(since=since, until=until, bucket=bucket)


class StaleUsageCache(MemoryHistory):
    """Keeps each report it answered and never forgets it."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.cache: dict[tuple[Any, ...], tuple[UsageRow, ...]] = {}

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        key = (since, until, bucket, pool)
        if key not in self.cache:
            self.cache[key] = await super().usage(
                since=since, until=until, bucket=bucket, pool=pool
            )
        return self.cache[key]


class CacheSurvivesPrune(StaleUsageCache):
    """Forgets its cached reports on add, but not when retention prunes."""

    async def add(self, records: Sequence[Any]) -> None:
        self.cache.clear()
        await super().add(records)

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        self.cache.clear()
        await super().add_scale_events(events)


class AcceptsAnyBucket(MemoryHistory):
    """An unknown bucket is read as an hour."""

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        return await super().usage(
            since=since, until=until, bucket=bucket if bucket in BUCKETS else "hour", pool=pool
        )


class EventsLastWriteWins(MemoryHistory):
    """A repeated event id replaces the stored event."""

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        ids = {e.event_id for e in events}
        self._events = [x for x in self._events if x[1].event_id not in ids]
        self._event_ids -= ids
        await super().add_scale_events(events)


class EventsOldestFirst(MemoryHistory):
    """Scale events listed oldest first."""

    async def scale_events(self, **kw: Any) -> tuple[ScaleEventRecord, ...]:
        got = await super().scale_events(**{**kw, "limit": 1000})
        return tuple(reversed(got))[: kw.get("limit", 100)]


class EventsUntilInclusive(MemoryHistory):
    """`until` matched inclusively."""

    async def scale_events(self, **kw: Any) -> tuple[ScaleEventRecord, ...]:
        until = kw.get("until")
        if until is not None:
            kw["until"] = math.nextafter(until, math.inf)
        return await super().scale_events(**kw)


class EventsNotPruned(MemoryHistory):
    """Retention leaves scale events in place."""

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        events = list(self._events)
        n = await super().prune(before=before, keep=keep)
        self._events = events
        self._event_ids = {e.event_id for _, e in events}
        return n


class EventLimitUnchecked(MemoryHistory):
    """Any scale-event limit is accepted (a bad one gives everything)."""

    async def scale_events(self, **kw: Any) -> tuple[ScaleEventRecord, ...]:
        limit = kw.get("limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            kw["limit"] = 1000
        return await super().scale_events(**kw)


USAGE_FAKES: list[tuple[Backend, str]] = [
    (fake(UsageByEnded), "check_usage_report"),
    (fake(ServedFromPlaced), "check_usage_report"),
    (fake(PeakCountsTouching), "check_usage_report"),
    (fake(InterpolatedPercentile), "check_usage_report"),
    (fake(MinutesUnclipped), "check_usage_report"),
    (fake(RefusedLumped), "check_usage_report"),
    (fake(UsageIgnoresPool), "check_usage_report"),
    (fake(StaleUsageCache), "check_usage_sees_late_records"),
    (fake(CacheSurvivesPrune), "check_usage_after_prune"),
    (fake(EventsNotPruned), "check_usage_after_prune"),
    (fake(AcceptsAnyBucket), "check_usage_bad_params"),
    (fake(EventsLastWriteWins), "check_scale_events"),
    (fake(EventsOldestFirst), "check_scale_events"),
    (fake(EventsUntilInclusive), "check_scale_events"),
    (fake(EventLimitUnchecked), "check_scale_events_bad_query"),
]
