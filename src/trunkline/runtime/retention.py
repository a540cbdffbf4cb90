"""History retention: the store kept within its age and size bounds.

Theory of operation: one background task calls `HistoryStore.prune` at start
and then every `interval_s`, with `before = now - retention_days` and
`keep = max_records` (a bound of 0 is off). The stores delete in chunks,
each its own short transaction, so a large backlog (retention just turned on,
or a server that was down for weeks) is worked off without holding up the
writer. A failed run is logged and counted and tried again at the next
interval; it never stops the task. Between runs the store may exceed
`max_records` by what one interval adds: that is the bound's slack.

The same task keeps the usage report's cache warm (`warm_usage`): at start
it asks the store for each day of the kept window, newest first, one day per
call (each fills that day's hour and day buckets from the records, so a
history written before schema 3, or one retention cut into, is reported fast
from the first dashboard view on); then every interval the last two days.
Stores without a usage cache (memory: `caches_usage` unset) are not warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from trunkline.stores import HistoryStore

log = logging.getLogger("trunkline.history")

INTERVAL_S = 60.0
DAY_S = 86_400.0
WARM_DAYS = 31  # days of usage warmed at start when retention_days keeps more (or all)


class Retention:
    """Prunes `store` by age (`retention_days`) and size (`max_records`);
    0 turns a bound off. `clock` gives Unix seconds (tests pass a fake)."""

    def __init__(
        self,
        store: HistoryStore,
        *,
        retention_days: float,
        max_records: int,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        self.max_records = max_records
        self.interval_s = interval_s
        self.clock = clock
        self.pruned = 0
        self.errors = 0
        self.runs = 0
        self._task: asyncio.Task[None] | None = None
        self._ran = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0 or self.max_records > 0

    async def run_once(self) -> int:
        """One pruning pass; returns how many records it removed. Raises what
        the store raises."""
        before = self.clock() - self.retention_days * DAY_S if self.retention_days > 0 else None
        keep = self.max_records if self.max_records > 0 else None
        n = await self.store.prune(before=before, keep=keep)
        self.pruned += n
        if n:
            log.info(
                "history pruned",
                extra={"removed": n, "retention_days": self.retention_days, "keep": keep},
            )
        return n

    async def warm_usage(self, days: float) -> int:
        """Ask the store for the usage of each of the last `days` days, newest
        first (filling its cache); returns how many days were asked for (0
        for a store that keeps no usage cache)."""
        if not getattr(self.store, "caches_usage", False):
            return 0
        now = self.clock()
        today = now // DAY_S * DAY_S
        n = 0
        while n < days:
            day = today - n * DAY_S
            await self.store.usage(since=day, until=day + DAY_S, bucket="day")
            n += 1
            await asyncio.sleep(0)  # between days, others get the loop (and the store)
        return n

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run a pass now and then every `interval_s`."""
        if self._task is None:
            self._task = loop.create_task(self._run(), name="trunkline-history-retention")

    async def wait_run(self) -> None:
        """Return after the next pass has finished (tests)."""
        self._ran.clear()
        await self._ran.wait()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                if self.enabled:
                    await self.run_once()
                kept = self.retention_days if self.retention_days > 0 else WARM_DAYS
                await self.warm_usage(min(kept, WARM_DAYS) if first else 2)
                first = False
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("history retention failed; trying again at the next interval")
            self.runs += 1
            self._ran.set()
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
