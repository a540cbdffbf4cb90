"""The history writer: ended job records reach the store off the hot path.

Theory of operation: the dispatcher calls `put(record)` as a job ends; that
only files the record in an ordered in-memory map and wakes one writer task,
which waits `batch_window_s` for more to pile up, then hands the oldest
pending records to `HistoryStore.add` in batches of up to `batch_size`: a
transaction costs far more than a row (in SQLite, every index page a batch
touches is written once per commit), so a busy server writes hundreds of
records per transaction, and a record waits at most the window plus one
write before it is stored (the most a `kill -9` can lose). A record is
readable (`get`, `query`) from the moment it is put: from memory until the
store has it, from the store afterwards. If the store falls behind by
`max_pending` records, new ones are shed (counted in `dropped`, logged at
most once per `_LOG_EVERY_S`), never stalling dispatch.

`open()` opens the store at start, so an unusable one stops the server with
its `StoreError`. A store that fails later (disk full, database gone) puts
the writer in degraded mode: the error is logged and counted, records stay in
memory (pending, up to `max_pending`), reads are answered from memory alone,
and the batch is retried with a backoff until the store takes it again, which
ends the degradation. No store error ever reaches the caller of `put`, `get`
or `query`. `status()` tells it all (/healthz, /metrics). `aclose()` writes
out everything still pending (clean shutdown loses nothing).

The newest `recent_size` records are also kept for the dashboard, which reads
them synchronously on every snapshot.

Scale events (`put_scale_event`) take the same path: pending in memory in
order, written in batches by the same task (after the job records gathered
with them), shed and counted in `dropped` when `max_pending` jobs and events
are waiting, readable at once (`scale_events` merges pending and stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.stores import HistoryStore, InvalidQuery, JobFilter, JobRecord, Page, StoreError
from trunkline.stores.query import MAX_LIMIT, check_limit, cursor_after, decode_cursor, order_key
from trunkline.stores.usage import (
    ScaleEventRecord,
    UsageRow,
    check_event_query,
    event_matches,
    event_order,
)

log = logging.getLogger("trunkline.history")

_LOG_EVERY_S = 10.0
# "history database <path or URL>: " in a store's errors: logged, but not
# shown by /healthz, which anyone who reaches the port may read.
_WHERE = re.compile(r"history database \S+: ")
_RETRY_S = (0.5, 10.0)


@dataclass(frozen=True, slots=True)
class HistoryStatus:
    """The history as an operator sees it (`reason` without the store's path
    or URL, which the log has). `lag_s`: age of the oldest record
    not yet in the store (what a crash would lose); `pruned`: records removed
    by retention."""

    backend: str
    degraded: bool
    reason: str
    pending: int
    lag_s: float
    written: int
    dropped: int
    write_errors: int
    pruned: int = 0
    prune_errors: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "state": "degraded" if self.degraded else "ok",
            "reason": self.reason,
            "pending": self.pending,
            "lag_s": round(self.lag_s, 3),
            "written": self.written,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "pruned": self.pruned,
            "prune_errors": self.prune_errors,
        }


class HistoryWriter:
    def __init__(
        self,
        store: HistoryStore,
        *,
        max_pending: int = 50_000,
        batch_size: int = 2000,
        recent_size: int = 200,
        batch_window_s: float = 0.2,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.batch_window_s = batch_window_s
        self.dropped = 0
        self.written = 0
        self.write_errors = 0
        self.degraded_reason = ""  # "" while the store works
        self._last_error_log = -_LOG_EVERY_S
        self._pending: OrderedDict[str, JobRecord] = OrderedDict()
        self._pending_events: deque[ScaleEventRecord] = deque()
        self._recent: deque[JobRecord] = deque(maxlen=recent_size)
        self._wake: asyncio.Event | None = None
        # True from `_wake.set()` until the writer clears it: a put then only
        # files its record (the writer's turn is already due).
        self._woken = False
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log = -_LOG_EVERY_S
        self._opened = False

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reason)

    def status(self) -> HistoryStatus:
        lag = 0.0
        if self._pending:
            oldest = next(iter(self._pending.values()))
            lag = max(0.0, time.time() - (oldest.ended_at or time.time()))
        return HistoryStatus(
            backend=str(getattr(self.store, "backend", type(self.store).__name__)),
            degraded=self.degraded,
            reason=_WHERE.sub("", self.degraded_reason),
            pending=len(self._pending),
            lag_s=lag,
            written=self.written,
            dropped=self.dropped,
            write_errors=self.write_errors,
        )

    async def open(self) -> None:
        """Open the store; raises its `StoreError` if it cannot be used."""
        await self._ensure_open()

    def _failed(self, what: str, exc: BaseException) -> None:
        """A store call failed: degraded until a write succeeds again."""
        first = not self.degraded
        self.degraded_reason = f"{what}: {type(exc).__name__}: {exc}"[:500]
        now = time.monotonic()
        if first or now - self._last_error_log >= _LOG_EVERY_S:
            self._last_error_log = now
            log.error(
                "history store failing: keeping records in memory",
                extra={
                    "error": self.degraded_reason,
                    "pending": len(self._pending),
                    "write_errors_total": self.write_errors,
                },
            )

    def _recovered(self) -> None:
        if self.degraded:
            log.warning("history store works again", extra={"was": self.degraded_reason})
            self.degraded_reason = ""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer task on `loop` (records put before are kept)."""
        self._wake = asyncio.Event()
        self._woken = False
        self._task = loop.create_task(self._run(), name="trunkline-history-writer")
        if self._pending or self._pending_events:
            self._wake_up()

    def _full(self) -> bool:
        return len(self._pending) + len(self._pending_events) >= self.max_pending

    def _wake_up(self) -> None:
        """Give the writer its turn (once per turn: `_woken`)."""
        if self._wake is not None:
            self._woken = True
            self._wake.set()

    def put(self, record: JobRecord) -> None:
        """File an ended record for writing; never blocks."""
        pending = self._pending
        # _full() inline: this runs once per ended job
        if len(pending) + len(self._pending_events) >= self.max_pending:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= _LOG_EVERY_S:
                self._last_drop_log = now
                log.warning(
                    "history writer full: record dropped",
                    extra={"pending": len(self._pending), "dropped_total": self.dropped},
                )
            return
        pending[record.job_id] = record
        self._recent.append(record)
        if not self._woken:
            self._wake_up()

    def put_scale_event(self, event: ScaleEventRecord) -> None:
        """File a scale event for writing; never blocks (sheds when full,
        counted in `dropped`)."""
        if self._full():
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= _LOG_EVERY_S:
                self._last_drop_log = now
                log.warning(
                    "history writer full: scale event dropped",
                    extra={"pool": event.pool, "dropped_total": self.dropped},
                )
            return
        self._pending_events.append(event)
        if not self._woken:
            self._wake_up()

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[ScaleEventRecord]:
        """Up to `limit` scale events, newest first: pending and stored ones
        merged (each once). While the store fails, the pending ones alone.
        Raises `InvalidQuery` (limit, times)."""
        check_event_query(since, until, limit)
        merged = {
            e.event_id: e for e in self._pending_events if event_matches(e, pool, since, until)
        }
        try:
            stored = await self.store.scale_events(pool=pool, since=since, until=until, limit=limit)
        except (asyncio.CancelledError, InvalidQuery):
            raise
        except Exception as exc:
            self._failed("reading", exc)
            stored = ()
        for e in stored:
            merged.setdefault(e.event_id, e)
        return sorted(merged.values(), key=event_order, reverse=True)[:limit]

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        """The store's usage report (stored records: those still pending, the
        last batch window's, count at the next report). Raises `InvalidQuery`
        for bad parameters, `StoreError` while the store cannot answer."""
        try:
            return await self.store.usage(since=since, until=until, bucket=bucket, pool=pool)
        except (asyncio.CancelledError, InvalidQuery):
            raise
        except Exception as exc:
            self._failed("reading", exc)
            raise StoreError(f"the history store cannot answer: {type(exc).__name__}") from exc

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def get(self, job_id: str) -> JobRecord | None:
        """The record of an ended job, or None (also when the store fails)."""
        rec = self._pending.get(job_id)
        if rec is not None:
            return rec
        try:
            return await self.store.get(job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed("reading", exc)
            return None

    def recent(self, limit: int) -> list[JobRecord]:
        """Up to `limit` of the newest records put, newest first."""
        out: list[JobRecord] = []
        for rec in reversed(self._recent):
            if len(out) >= limit:
                break
            out.append(rec)
        return out

    async def query(self, flt: JobFilter, limit: int) -> AsyncIterator[JobRecord]:
        """Up to `limit` records matching `flt`: pending ones newest first,
        then the store's (each record once)."""
        if limit <= 0:
            return
        seen: set[str] = set()
        for rec in reversed(list(self._pending.values())):
            if flt.matches(rec):
                seen.add(rec.job_id)
                yield rec
                if len(seen) >= limit:
                    return
        cursor: str | None = None
        n = len(seen)
        while n < limit:
            try:
                page = await self.store.query(flt, limit=min(MAX_LIMIT, limit - n), cursor=cursor)
            except (asyncio.CancelledError, InvalidQuery):
                raise
            except Exception as exc:
                self._failed("reading", exc)
                return  # what memory holds is the answer while the store fails
            for rec in page.records:
                if rec.job_id not in seen:
                    n += 1
                    yield rec
            if page.next_cursor is None or not page.records:
                return
            cursor = page.next_cursor

    async def page(self, flt: JobFilter, limit: int, cursor: str | None = None) -> Page:
        """One page of ended records matching `flt` in store order, pending
        ones merged with the store's by their order key (each record once), so
        its `next_cursor` (a store cursor) pages on whether the records in
        between are still in memory or stored meanwhile. While the store fails,
        the page holds what memory has. Raises `InvalidQuery` / `BadCursor`."""
        check_limit(limit)
        after = None if cursor is None else decode_cursor(cursor)
        pending = heapq.nlargest(
            limit + 1,
            (
                r
                for r in self._pending.values()
                if (after is None or order_key(r) < after) and flt.matches(r)
            ),
            key=order_key,
        )
        try:
            stored = await self.store.query(flt, limit=limit, cursor=cursor)
        except (asyncio.CancelledError, InvalidQuery):
            raise
        except Exception as exc:
            self._failed("reading", exc)
            stored = Page(())
        merged: dict[str, JobRecord] = {}
        for rec in (*pending, *stored.records):
            merged.setdefault(rec.job_id, rec)
        rows = sorted(merged.values(), key=order_key, reverse=True)
        more = len(rows) > limit or stored.next_cursor is not None
        del rows[limit:]
        return Page(tuple(rows), cursor_after(rows[-1]) if more and rows else None)

    async def _run(self) -> None:
        assert self._wake is not None
        delay = _RETRY_S[0]
        while True:
            await self._wake.wait()
            if self.batch_window_s > 0 and len(self._pending) < self.batch_size:
                await asyncio.sleep(self.batch_window_s)  # let a batch gather
            self._wake.clear()
            self._woken = False
            # What gathered in the window; records put meanwhile wait for the next one.
            todo = len(self._pending) + len(self._pending_events)
            while todo > 0 and (self._pending or self._pending_events):
                try:
                    await self._ensure_open()  # opened at start, unless a test skipped it
                    todo -= await self._write_batch()
                    delay = _RETRY_S[0]
                    self._recovered()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.write_errors += 1
                    self._failed("writing", exc)
                    await asyncio.sleep(delay)  # backoff before retrying the same batch
                    delay = min(delay * 2, _RETRY_S[1])
            if self._pending or self._pending_events:
                self._wake_up()

    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True

    async def _write_batch(self) -> int:
        """Store the oldest pending records (up to `batch_size`), or when none
        is pending, the pending scale events; how many."""
        if not self._pending:
            events = list(self._pending_events)[: self.batch_size]
            await self.store.add_scale_events(events)
            for _ in events:
                self._pending_events.popleft()
            return len(events)
        batch = []
        for rec in self._pending.values():
            batch.append(rec)
            if len(batch) >= self.batch_size:
                break
        await self.store.add(batch)
        self.written += len(batch)
        for rec in batch:
            if self._pending.get(rec.job_id) is rec:
                del self._pending[rec.job_id]
        return len(batch)

    async def aclose(self, *, give_up_s: float = 30.0) -> None:
        """Write out everything pending, then stop the writer task. A store
        still failing after `give_up_s` loses what is pending (logged with
        the count), so a broken store cannot hold shutdown forever."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + give_up_s
        delay = _RETRY_S[0]
        while True:
            try:
                await self._ensure_open()
                while self._pending or self._pending_events:
                    await self._write_batch()
                return
            except Exception as exc:
                self.write_errors += 1
                self._failed("writing at shutdown", exc)
                if time.monotonic() + delay > deadline:
                    log.error(
                        "history store failing at shutdown: records lost",
                        extra={"lost": len(self._pending), "error": self.degraded_reason},
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])


class HistoryCollector(Collector):
    """The history writer's state for /metrics, read at scrape time."""

    def __init__(self, status: Callable[[], HistoryStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        st = self._status()
        labels = ["backend"]
        value = [st.backend]

        def counter(name: str, doc: str, n: int) -> Metric:
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(value, n)
            return m

        def gauge(name: str, doc: str, v: float) -> Metric:
            m = GaugeMetricFamily(name, doc, labels=labels)
            m.add_metric(value, v)
            return m

        yield counter(
            "trunkline_history_written",
            "Ended-job records written to the history store.",
            st.written,
        )
        yield counter(
            "trunkline_history_dropped",
            "Ended-job records shed because the history store fell too far behind.",
            st.dropped,
        )
        yield counter(
            "trunkline_history_write_errors", "Failed writes to the history store.", st.write_errors
        )
        yield counter(
            "trunkline_history_pruned", "Records removed by retention (age, size).", st.pruned
        )
        yield counter("trunkline_history_prune_errors", "Failed retention runs.", st.prune_errors)
        yield gauge(
            "trunkline_history_degraded",
            "1 while the history store fails and records are kept in memory only.",
            1.0 if st.degraded else 0.0,
        )
        yield gauge(
            "trunkline_history_pending", "Records not yet in the history store.", st.pending
        )
        yield gauge(
            "trunkline_history_lag_seconds",
            "Age of the oldest record not yet in the history store (what a crash would lose).",
            st.lag_s,
        )
