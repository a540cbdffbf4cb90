"""The history writer: ended job records reach the store off the hot path.

Theory of operation: the dispatcher calls `put(record)` as a job ends; that
only files the record in an ordered in-memory map and wakes one writer task,
which hands the oldest pending records to `HistoryStore.add` in batches. A
record is readable (`get`, `query`) from the moment it is put: from memory
until the store has it, from the store afterwards. If the store falls behind
by `max_pending` records, new ones are shed (counted in `dropped`, logged at
most once per `_LOG_EVERY_S`), never stalling dispatch. A store error is
logged and the batch retried after a backoff. `aclose()` writes out
everything still pending (clean shutdown loses nothing).

The newest `recent_size` records are also kept for the dashboard, which reads
them synchronously on every snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from trunkline.stores import HistoryStore, JobFilter, JobRecord
from trunkline.stores.query import MAX_LIMIT

log = logging.getLogger("trunkline.history")

_LOG_EVERY_S = 10.0
_RETRY_S = (0.5, 10.0)


class HistoryWriter:
    def __init__(
        self,
        store: HistoryStore,
        *,
        max_pending: int = 50_000,
        batch_size: int = 500,
        recent_size: int = 200,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.dropped = 0
        self._pending: OrderedDict[str, JobRecord] = OrderedDict()
        self._recent: deque[JobRecord] = deque(maxlen=recent_size)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log = -_LOG_EVERY_S
        self._opened = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer task on `loop` (records put before are kept)."""
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="trunkline-history-writer")
        if self._pending:
            self._wake.set()

    def put(self, record: JobRecord) -> None:
        """File an ended record for writing; never blocks."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= _LOG_EVERY_S:
                self._last_drop_log = now
                log.warning(
                    "history writer full: record dropped",
                    extra={"pending": len(self._pending), "dropped_total": self.dropped},
                )
            return
        self._pending[record.job_id] = record
        self._recent.append(record)
        if self._wake is not None:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def get(self, job_id: str) -> JobRecord | None:
        rec = self._pending.get(job_id)
        if rec is not None:
            return rec
        return await self.store.get(job_id)

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
            page = await self.store.query(flt, limit=min(MAX_LIMIT, limit - n), cursor=cursor)
            for rec in page.records:
                if rec.job_id not in seen:
                    n += 1
                    yield rec
            if page.next_cursor is None or not page.records:
                return
            cursor = page.next_cursor

    async def _run(self) -> None:
        assert self._wake is not None
        await self._ensure_open()
        delay = _RETRY_S[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._write_batch()
                    delay = _RETRY_S[0]
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("history store write failed; retrying", extra={"in_s": delay})
                    await asyncio.sleep(delay)  # backoff before retrying the same batch
                    delay = min(delay * 2, _RETRY_S[1])

    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True

    async def _write_batch(self) -> None:
        batch = []
        for rec in self._pending.values():
            batch.append(rec)
            if len(batch) >= self.batch_size:
                break
        await self.store.add(batch)
        for rec in batch:
            if self._pending.get(rec.job_id) is rec:
                del self._pending[rec.job_id]

    async def aclose(self) -> None:
        """Write out everything pending, then stop the writer task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._ensure_open()
        while self._pending:
            await self._write_batch()
