"""The history writer's pages: records still in memory and records in the
store are merged in store order, each once, with cursors that page on as
records move from memory to the store; while the store fails, memory answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from stores.contract import dataset, newest_first
from stores.test_history_writer import Flaky

from trunkline.runtime.history import HistoryWriter
from trunkline.stores import BadCursor, InvalidQuery, JobFilter, JobRecord
from trunkline.stores.sqlite import SqliteHistory


async def pages(w: HistoryWriter, flt: JobFilter, limit: int) -> list[list[str]]:
    out: list[list[str]] = []
    cursor = None
    while True:
        page = await w.page(flt, limit, cursor)
        out.append([r.job_id for r in page.records])
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_pending_and_stored_merge_in_order(backend: str, tmp_path: Path) -> None:
    """Half the records stored, half pending (one in both, as during a
    write): every filter pages through each matching record once, newest
    first, with no empty last page."""
    records = dataset(40)
    store = Flaky() if backend == "memory" else SqliteHistory(tmp_path / "h.sqlite3")
    await store.open()
    await store.add(records[:21])
    w = HistoryWriter(store)  # not started: what is put stays pending
    for r in records[20:]:
        w.put(r)
    for flt in (JobFilter(), JobFilter(agent_name="support"), JobFilter(caller="+4930222")):
        want = newest_first([r for r in records if flt.matches(r)])
        for limit in (1, 3, 7, 1000):
            got = await pages(w, flt, limit)
            assert [i for p in got for i in p] == want, (flt, limit)
            assert all(got[:-1])
            assert got[-1] or want == []
    await store.close()


async def test_cursor_pages_on_after_records_are_written() -> None:
    """A cursor taken while its records were pending continues once they are
    in the store: nothing repeated, nothing skipped."""
    records = dataset(12)
    store = Flaky()
    w = HistoryWriter(store)
    for r in records:
        w.put(r)
    first = await w.page(JobFilter(), 5)
    assert first.next_cursor is not None
    await w.aclose()  # writes out the pending records
    assert w.pending == 0
    rest = await pages_from(w, first.next_cursor)
    assert [r.job_id for r in first.records] + rest == newest_first(records)


async def pages_from(w: HistoryWriter, cursor: str) -> list[str]:
    out: list[str] = []
    c: str | None = cursor
    while c is not None:
        page = await w.page(JobFilter(), 4, c)
        out += [r.job_id for r in page.records]
        c = page.next_cursor
    return out


async def test_failing_store_pages_from_memory() -> None:
    """A store that fails on reads: the page holds the pending records, the
    writer is degraded; a bad cursor or limit is still refused."""
    records: list[JobRecord] = dataset(6)
    store = Flaky()
    await store.add(records[:3])
    w = HistoryWriter(store)
    for r in records[3:]:
        w.put(r)
    store.broken = True
    got = await pages(w, JobFilter(), 2)
    assert [i for p in got for i in p] == newest_first(records[3:])
    assert w.degraded
    with pytest.raises(BadCursor):
        await w.page(JobFilter(), 2, "nonsense")
    with pytest.raises(InvalidQuery):
        await w.page(JobFilter(), 0)
