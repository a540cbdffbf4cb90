"""The history writer's wake-up: a put while the writer's turn is already due
files the record only, and every record still reaches the store, whether put
during a batch window, between turns, or before the writer started."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stores.contract import record
from support import wait_until

from trunkline.runtime.history import HistoryWriter
from trunkline.stores import JobRecord, MemoryHistory


async def test_every_put_is_written_across_turns() -> None:
    """Records put in a burst, one by one after each write, and before start are all stored."""
    store = MemoryHistory(100)
    w = HistoryWriter(store, batch_window_s=0.01)
    w.put(record(0))  # before start: start() gives the writer its turn
    await w.open()
    w.start(asyncio.get_running_loop())
    await wait_until(lambda: len(store) == 1, 5, 0.005, "the record put before start")
    for n in range(1, 6):  # a burst: one turn already due for all of them
        w.put(record(n))
    await wait_until(lambda: len(store) == 6, 5, 0.005, "the burst")
    for n in range(6, 9):  # one at a time: each needs a fresh turn
        w.put(record(n))
        await wait_until(lambda n=n: len(store) == n + 1, 5, 0.005, f"record {n}")
    assert w.pending == 0
    assert w.written == 9
    await w.aclose()


async def test_a_write_going_on_does_not_lose_a_put() -> None:
    """A record put while a batch is being stored is written in a later turn."""
    entered, gate = asyncio.Event(), asyncio.Event()

    class Slow(MemoryHistory):
        async def add(self, records: Sequence[JobRecord]) -> None:
            entered.set()
            await gate.wait()
            await super().add(records)

    store = Slow(100)
    w = HistoryWriter(store, batch_window_s=0)
    await w.open()
    w.start(asyncio.get_running_loop())
    w.put(record(0))
    await asyncio.wait_for(entered.wait(), 5)
    w.put(record(1))  # the writer is inside add(): this needs a new turn
    gate.set()
    await wait_until(lambda: len(store) == 2, 5, 0.005, "both records")
    await w.aclose()
