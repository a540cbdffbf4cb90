"""Schema version 6: SQLite writes traces in the compact binary form
(`_sql.pack_trace`); it reads them back exactly, reads the JSON traces of
rows written before the migration, and a file kept at an older version still
gets JSON (an older trunkline can read it)."""

from __future__ import annotations

import math
import sqlite3
import struct
from pathlib import Path

import pytest
from stores.contract import dataset

from trunkline.stores import JobFilter, JobRecord
from trunkline.stores._schema import LATEST
from trunkline.stores._sql import pack_trace, trace_json, unpack_trace
from trunkline.stores.records import TraceRecord
from trunkline.stores.sqlite import SqliteHistory

TRACES = (
    (),
    (TraceRecord(1.7e9, "requested"),),
    (
        TraceRecord(1_700_000_000.000123, "requested", None, None),
        TraceRecord(1_700_000_000.1 + 1e-7, "offered", "AW_1", None),
        TraceRecord(-0.0, "refused", "AW_2", 'load \x00 \ud800 ünï "q" \\'),
        TraceRecord(5e-324, "x", "", ""),
        TraceRecord(1.7976931348623157e308, "y", None, "detail"),
    ),
)


def _bits(trace: tuple[TraceRecord, ...]) -> list[tuple[bytes, str, str | None, str | None]]:
    return [(struct.pack("<d", t.at), t.event, t.worker_id, t.detail) for t in trace]


@pytest.mark.parametrize("trace", TRACES)
def test_pack_trace_round_trips_exactly(trace: tuple[TraceRecord, ...]) -> None:
    """Every time (to the bit, -0.0 included) and string comes back."""
    back = unpack_trace(pack_trace(trace))
    assert back == trace
    assert _bits(back) == _bits(trace)
    assert all(type(t) is TraceRecord for t in back)


def test_pack_trace_keeps_infinities_and_nan() -> None:
    """Non-finite times survive too (JSON would need its NaN extension)."""
    back = unpack_trace(pack_trace((TraceRecord(math.inf, "a"), TraceRecord(math.nan, "b"))))
    assert back[0].at == math.inf
    assert math.isnan(back[1].at)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x01", b"\x02\x00\x00\x00\x00", pack_trace(TRACES[2])[:-3], pack_trace(TRACES[2])[:9]],
)
def test_a_damaged_trace_is_a_clear_error(blob: bytes) -> None:
    """A truncated blob or an unknown format version raises ValueError."""
    with pytest.raises(ValueError, match="stored trace is damaged"):
        unpack_trace(blob)


def _trace_types(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT job_id, typeof(trace) FROM trunkline_jobs"))


async def test_a_version_5_file_keeps_its_json_rows_and_packs_new_ones(tmp_path: Path) -> None:
    """Rows written at version 5 stay JSON text after the migration to 6 and
    read back equal; rows added afterwards are packed; queries mix both."""
    path = tmp_path / "history.sqlite3"
    records = dataset(40)
    old, new = records[:20], records[20:]
    v5 = SqliteHistory(path, schema_version=5)
    await v5.open()
    await v5.add(old)
    await v5.close()
    assert set(_trace_types(path).values()) == {"text"}

    store = SqliteHistory(path)
    await store.open()
    try:
        assert await store.schema() == LATEST == 6
        await store.add(new)
        types = _trace_types(path)
        assert {types[r.job_id] for r in old} == {"text"}
        assert {types[r.job_id] for r in new} == {"blob"}
        for r in records:
            assert await store.get(r.job_id) == r
        page = await store.query(JobFilter(), limit=100)
        assert sorted(page.records, key=lambda r: r.job_id) == sorted(
            records, key=lambda r: r.job_id
        )
    finally:
        await store.close()


async def test_a_file_kept_at_version_5_gets_json_traces(tmp_path: Path) -> None:
    """A store told to stay at version 5 writes what version 5 reads."""
    path = tmp_path / "history.sqlite3"
    records: list[JobRecord] = dataset(10)
    store = SqliteHistory(path, schema_version=5)
    await store.open()
    try:
        await store.add(records)
        assert await store.schema() == 5
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        stored = dict(db.execute("SELECT job_id, trace FROM trunkline_jobs"))
    assert stored == {r.job_id: trace_json(r.trace) for r in records}
