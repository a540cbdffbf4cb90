"""The history writer and retention over real stores: a failing store
degrades the history to memory (counted, readable, recovering), never the
caller; retention prunes by age and size in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from stores.contract import BASE, dataset, newest_first, record
from support import wait_until

from trunkline.runtime.history import HistoryWriter
from trunkline.runtime.retention import DAY_S, Retention
from trunkline.stores import JobFilter, JobRecord, MemoryHistory, Page, StoreError
from trunkline.stores.sqlite import SqliteHistory


class Flaky(MemoryHistory):
    """A memory store that fails every call while `broken` is set."""

    def __init__(self) -> None:
        super().__init__(10_000)
        self.broken = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.broken:
            raise StoreError("history database /srv/flaky.sqlite3: disk I/O error")

    async def add(self, records: Sequence[JobRecord]) -> None:
        self._check()
        await super().add(records)

    async def get(self, job_id: str) -> JobRecord | None:
        self._check()
        return await super().get(job_id)

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        self._check()
        return await super().query(flt, limit=limit, cursor=cursor)


async def _started(store: Flaky | SqliteHistory, **kw: int) -> HistoryWriter:
    w = HistoryWriter(store, **kw)
    await w.open()
    w.start(asyncio.get_running_loop())
    return w


async def test_failing_store_degrades_to_memory_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store fails, put never raises, records stay readable from
    memory (get, query), the failure is logged once and counted, status says
    degraded and why; once the store works the records reach it and the
    degradation ends."""
    store = Flaky()
    w = await _started(store)
    w.put(record(1))
    await wait_until(lambda: w.written == 1, what="first record written")
    store.broken = True
    with caplog.at_level(logging.ERROR, logger="trunkline.history"):
        for n in range(2, 12):
            w.put(record(n))  # never raises
        await wait_until(lambda: w.status().degraded, what="writer degraded")
    st = w.status()
    assert st.reason == "writing: StoreError: disk I/O error"  # path left to the log
    assert st.write_errors >= 1
    assert st.pending == 10
    assert [r.message for r in caplog.records].count(
        "history store failing: keeping records in memory"
    ) == 1
    # reads: pending records from memory; the store's own answer is skipped
    assert await w.get("J0005") == record(5)
    assert await w.get("J0001") is None  # only in the failing store
    got = [r.job_id async for r in w.query(JobFilter(), 100)]
    assert got == [f"J{n:04d}" for n in range(11, 1, -1)]
    store.broken = False
    await wait_until(lambda: w.written == 11, within=30.0, what="backlog written after recovery")
    assert not w.status().degraded
    assert [r.job_id async for r in w.query(JobFilter(), 100)] == newest_first(
        [record(n) for n in range(1, 12)]
    )
    await w.aclose()


async def test_writer_sheds_past_max_pending_while_degraded() -> None:
    """A store down for long: memory holds `max_pending` records, newer ones
    are shed and counted (dropped), and nothing raises."""
    store = Flaky()
    store.broken = True
    w = await _started(store, max_pending=5)
    for n in range(8):
        w.put(record(n))
    st = w.status()
    assert (st.pending, st.dropped) == (5, 3)
    store.broken = False
    await wait_until(lambda: w.written == 5, within=30.0, what="kept records written")
    await w.aclose()


async def test_aclose_gives_up_on_a_dead_store(caplog: pytest.LogCaptureFixture) -> None:
    """At shutdown a store that keeps failing does not hold the server
    forever: aclose retries for `give_up_s`, then logs how many were lost."""
    store = Flaky()
    w = await _started(store)
    store.broken = True
    w.put(record(1))
    w.put(record(2))
    with caplog.at_level(logging.ERROR, logger="trunkline.history"):
        await asyncio.wait_for(w.aclose(give_up_s=0.2), 10.0)
    lost = [r for r in caplog.records if r.message.startswith("history store failing at shutdown")]
    assert len(lost) == 1
    assert lost[0].lost == 2  # type: ignore[attr-defined]


async def test_aclose_writes_out_everything_pending(tmp_path: Path) -> None:
    """A clean stop writes every record put, even a burst put just before."""
    store = SqliteHistory(tmp_path / "h.sqlite3")
    w = await _started(store, batch_size=50)
    data = dataset(1000)
    for r in data:
        w.put(r)
    await w.aclose()
    await store.close()
    again = SqliteHistory(tmp_path / "h.sqlite3")
    await again.open()
    assert await again.count(JobFilter()) == 1000
    await again.close()


async def test_writer_degrades_on_a_full_disk_and_recovers(tmp_path: Path) -> None:
    """A SQLite file that cannot grow (disk full: SQLITE_FULL, provoked with
    max_page_count) degrades the writer with that reason; with room again the
    backlog is written and the degradation ends."""
    store = SqliteHistory(tmp_path / "h.sqlite3")
    w = await _started(store)
    w.put(record(1))
    await wait_until(lambda: w.written == 1, what="first record")

    def cap(pages: int | None) -> None:
        db = store._w.conn()
        n = db.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
        db.execute(f"PRAGMA max_page_count = {n}")

    await store._w.run(cap, None)
    for n in range(2, 400):
        w.put(record(n, metadata="x" * 2000))
    await wait_until(lambda: w.status().degraded, what="degraded on a full disk")
    assert "full" in w.status().reason
    assert await w.get("J0100") is not None  # still readable, from memory
    await store._w.run(cap, 1_000_000)
    await wait_until(lambda: w.written == 399, within=30.0, what="backlog written")
    assert not w.status().degraded
    await w.aclose()
    await store.close()


# ----------------------------------------------------------------- retention


async def test_retention_prunes_by_age_and_size(tmp_path: Path) -> None:
    """One pass removes records that ended more than retention_days ago, then
    the oldest past max_records; a bound of 0 is off."""
    store = SqliteHistory(tmp_path / "h.sqlite3")
    await store.open()
    data = dataset(30)  # ended BASE+5 .. BASE+297
    await store.add(data)
    now = [BASE + 100 + 2 * DAY_S]
    ret = Retention(store, retention_days=2, max_records=0, clock=lambda: now[0])
    assert await ret.run_once() == sum(1 for r in data if (r.ended_at or 0) < BASE + 100)
    left = await store.count(JobFilter())
    ret.max_records = 5
    assert await ret.run_once() == left - 5
    assert [r.job_id for r in (await store.query(JobFilter(), limit=10)).records] == (
        newest_first(data)[:5]
    )
    ret.retention_days, ret.max_records = 0, 0
    assert not ret.enabled
    assert ret.pruned == 30 - 5
    await store.close()


async def test_retention_runs_in_the_background(tmp_path: Path) -> None:
    """Started, retention prunes at once and then every interval while new
    records arrive, and keeps going after a failed pass (counted)."""
    store = Flaky()
    await store.add([record(n) for n in range(10)])
    ret = Retention(store, retention_days=0, max_records=3, interval_s=0.01)
    ret.start(asyncio.get_running_loop())
    await wait_until(lambda: len(store) == 3, what="first pass")
    await store.add([record(n) for n in range(100, 104)])
    await wait_until(lambda: len(store) == 3, what="a later pass")
    failing = store.prune

    async def boom(**kw: float | int | None) -> int:
        raise StoreError("locked")

    store.prune = boom  # type: ignore[method-assign]
    runs = ret.runs
    await wait_until(lambda: ret.errors >= 1 and ret.runs > runs + 1, what="failed passes")
    store.prune = failing  # type: ignore[method-assign]
    await store.add([record(n) for n in range(200, 205)])
    await wait_until(lambda: len(store) == 3, what="pruning again after failures")
    await ret.aclose()
