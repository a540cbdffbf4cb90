"""The job-history store protocol: what the dispatcher and the API need of a
backend, nothing more.

A store keeps ended jobs as immutable `JobRecord`s and answers filtered,
paginated queries in one order (see `trunkline.stores.query`). Every method is
async because SQL backends do I/O; the memory backend simply never waits.
Every backend passes the same contract suite (`tests/stores/contract.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from trunkline.stores.query import JobFilter, Page
from trunkline.stores.records import JobRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, unwritable, damaged, of a newer
    schema): the message names the store, the cause and what to do."""


class HistoryStore(Protocol):
    """A place for ended jobs. Call `open` before anything else and `close` last.

    Records are immutable once stored: adding a job id the store already holds
    keeps the first record and drops the new one (first write wins), so a
    retried batch is harmless. A bounded store evicts the oldest records in
    query order (oldest `ended_at`) past its capacity."""

    async def open(self) -> None:
        """Make the store ready (connect, create or migrate the schema). Raises
        `StoreError` naming the store and the cause if it cannot be used."""

    async def close(self) -> None:
        """Write out what was added and release resources; idempotent."""

    async def add(self, records: Sequence[JobRecord]) -> None:
        """Store a batch of ended records. Raises ValueError, storing none of the
        batch, if one has not ended (`ended_at` is None)."""

    async def get(self, job_id: str) -> JobRecord | None:
        """The record of `job_id`, or None if the store does not hold it."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        """Up to `limit` records matching `flt`, newest-ended first, starting
        after `cursor` (a `next_cursor` of an earlier page, of any filter) or at
        the newest. Raises `InvalidQuery` for a limit outside 1..MAX_LIMIT and
        `BadCursor` for a cursor the store did not hand out."""

    async def count(self, flt: JobFilter) -> int:
        """How many stored records match `flt`."""

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        """Retention: remove the records that ended before `before` (Unix
        seconds), then the oldest (in query order) past the newest `keep`; None
        skips that rule. Returns how many records were removed. Scale events
        that happened before `before` go too (not counted)."""

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        """Store a batch of scale events, atomically; an `event_id` the store
        already holds keeps its first event (first write wins)."""

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> tuple[ScaleEventRecord, ...]:
        """Up to `limit` scale events of `pool` (None: every pool) with
        `since <= at < until` (None: open), newest first (`at`, then
        `event_id`, descending). Raises `InvalidQuery` for a limit outside
        1..1000 or a non-finite time."""

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        """The usage report (`trunkline.stores.usage`): a row per pool and
        `bucket` ("hour" or "day") that saw calls or scale events, for every
        bucket overlapping [since, until), of `pool` only if set; ordered by
        bucket start, then pool. Computed from the stored records exactly as
        `usage.compute` defines. Raises `InvalidQuery` for a bad bucket or
        range (see `usage.check_usage`)."""
