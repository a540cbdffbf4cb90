"""In-memory job history: the newest ended jobs, bounded.

The default store and the test double. Records live in a dict (O(1) `get`) and
their order keys in a list kept sorted oldest first: jobs are filed roughly in
the order they end, so an insert lands at or near the end (a binary search and
a short move), eviction takes the front, and a query walks the list backwards
from its cursor, newest first. Past `capacity` the oldest records (in query
order) are evicted, so memory stays bounded under any load.

Scale events are kept the same way, in a list sorted by (at, event_id), at
most `capacity` of them. The usage report is computed from every record at
each call (`usage.compute`): O(records held), which the capacity bounds.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from trunkline.stores.protocol import HistoryStore
from trunkline.stores.query import JobFilter, Page, check_limit, decode_cursor, order_key, page_of
from trunkline.stores.records import JobRecord
from trunkline.stores.usage import (
    ScaleEventRecord,
    UsageInput,
    UsageRow,
    bucket_starts,
    check_event_query,
    check_usage,
    compute,
    event_counts,
    event_matches,
    event_order,
    with_scale_events,
)

_ANY = JobFilter()


class MemoryHistory:
    """A `HistoryStore` in this process's memory; holds at most `capacity`
    records (0 keeps none). Nothing survives a restart."""

    backend = "memory"

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._by_id: dict[str, JobRecord] = {}
        self._keys: list[tuple[float, str]] = []  # order_key of each record, ascending
        self._events: list[tuple[tuple[float, str], ScaleEventRecord]] = []  # ascending
        self._event_ids: set[str] = set()

    def describe(self) -> str:
        return f"memory (newest {self.capacity} records, none kept on restart)"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def add(self, records: Sequence[JobRecord]) -> None:
        keys = [order_key(r) for r in records]  # validates the whole batch first
        by_id, held = self._by_id, self._keys
        insort, append = bisect.insort, held.append
        for r, key in zip(records, keys, strict=True):
            job_id = key[1]
            if job_id in by_id:
                continue  # first write wins: records are immutable
            by_id[job_id] = r
            # Records come nearly in the order they ended: most sort last.
            if not held or key > held[-1]:
                append(key)
            else:
                insort(held, key)
        excess = len(held) - self.capacity
        if excess > 0:
            for i in range(excess):
                del by_id[held[i][1]]
            del held[:excess]

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        keys = self._keys
        cut = 0 if before is None else bisect.bisect_left(keys, (before, ""))
        if keep is not None:
            cut = max(cut, len(keys) - max(keep, 0))
        for _, job_id in keys[:cut]:
            del self._by_id[job_id]
        del keys[:cut]
        if before is not None:
            n = bisect.bisect_left(self._events, (before, ""), key=lambda x: x[0])
            for _, e in self._events[:n]:
                self._event_ids.discard(e.event_id)
            del self._events[:n]
        return cut

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        for e in events:
            if e.event_id in self._event_ids:
                continue  # first write wins
            self._event_ids.add(e.event_id)
            bisect.insort(self._events, (event_order(e), e), key=lambda x: x[0])
        excess = len(self._events) - self.capacity
        if excess > 0:
            for _, e in self._events[:excess]:
                self._event_ids.discard(e.event_id)
            del self._events[:excess]

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> tuple[ScaleEventRecord, ...]:
        check_event_query(since, until, limit)
        out: list[ScaleEventRecord] = []
        for _, e in reversed(self._events):
            if event_matches(e, pool, since, until):
                out.append(e)
                if len(out) >= limit:
                    break
        return tuple(out)

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        width = check_usage(since, until, bucket)
        starts = bucket_starts(since, until, width)
        lo, hi = starts[0], starts[-1] + width
        jobs = [_usage_input(r) for r in self._by_id.values() if pool in (None, r.agent_name)]
        rows = compute(jobs, starts, width, bucket)
        events = [(e.pool, e.at, e.kind) for _, e in self._events if event_matches(e, pool, lo, hi)]
        return with_scale_events(rows, event_counts(events, width), bucket, pool)

    async def get(self, job_id: str) -> JobRecord | None:
        return self._by_id.get(job_id)

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        start = (
            len(self._keys)
            if cursor is None
            else bisect.bisect_left(self._keys, decode_cursor(cursor))
        )
        return page_of((r for r in self._newest_first(start) if flt.matches(r)), limit)

    async def count(self, flt: JobFilter) -> int:
        if flt == _ANY:
            return len(self._keys)
        return sum(1 for r in self._newest_first(len(self._keys)) if flt.matches(r))

    def __len__(self) -> int:
        return len(self._keys)

    def _newest_first(self, start: int) -> Iterator[JobRecord]:
        """Records whose key is below `self._keys[start]`, newest first."""
        keys, by_id = self._keys, self._by_id
        for i in range(start - 1, -1, -1):
            yield by_id[keys[i][1]]


def _usage_input(r: JobRecord) -> UsageInput:
    assert r.ended_at is not None  # stores hold ended records only
    return (
        r.agent_name, r.state, r.reason, r.created_at, r.placed_at, r.running_at,
        r.ended_at, r.queue_wait_s,
    )  # fmt: skip


if TYPE_CHECKING:
    _satisfies_protocol: HistoryStore = MemoryHistory()
