"""The history writer process and its pipe: records cross it unchanged, the
child commits what it received when its parent goes away, ignores the
signals a whole process group gets, and reports its failures by type.

The contract suite runs over `OffloadedStore` too (sqlite-process,
postgresql-process); these tests pin what is particular to the process."""

from __future__ import annotations

import asyncio
import marshal
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from stores.backends import offloaded_sqlite
from stores.contract import dataset, record
from support import wait_until

from trunkline.stores import JobFilter, StoreError
from trunkline.stores import writer_process as wp
from trunkline.stores._schema import LATEST
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.records import from_wire, to_wire
from trunkline.stores.sqlite import SqliteHistory


def test_wire_form_round_trips_every_field() -> None:
    """to_wire/from_wire give back an equal record (same hash), over SIP
    calls, attributes and traces alike; marshal takes the wire form as is."""
    for rec in dataset(40):
        back = from_wire(marshal.loads(marshal.dumps(to_wire(rec))))
        assert back == rec
        assert hash(back) == hash(rec)
        assert type(back.trace[0]) is type(rec.trace[0])
    with pytest.raises(ValueError, match="3 fields"):
        from_wire(("a", "b", "c"))


def frame(op: int, seq: int, payload: bytes) -> bytes:
    return wp.HEADER.pack(op, seq, len(payload)) + payload


def child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "trunkline.stores.writer_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def replies(data: bytes) -> list[tuple[int, int, object]]:
    out = []
    while data:
        status, seq, n = wp.HEADER.unpack_from(data)
        body, data = data[wp.HEADER.size : wp.HEADER.size + n], data[wp.HEADER.size + n :]
        out.append((status, seq, pickle.loads(body)))
    return out


async def stored(path: Path) -> set[str]:
    store = SqliteHistory(path)
    await store.open()
    try:
        page = await store.query(JobFilter(), limit=1000)
        return {r.job_id for r in page.records}
    finally:
        await store.close()


async def test_parent_gone_the_child_commits_what_it_received(tmp_path: Path) -> None:
    """stdin ends (the server exited or was killed) after records were sent
    but before their ADD: the child stores them, then exits 0. Its SIGTERM
    (a service manager stopping the group) changes nothing."""
    path = tmp_path / "h.sqlite3"
    recs = dataset(10)
    with child() as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(frame(wp.OPEN, 1, pickle.dumps(("sqlite", str(path), LATEST))))
        proc.stdin.write(frame(wp.PART, 2, marshal.dumps([to_wire(r) for r in recs[:4]])))
        proc.stdin.write(frame(wp.ADD, 2, b""))
        proc.stdin.write(frame(wp.PART, 3, marshal.dumps([to_wire(r) for r in recs[4:]])))
        proc.stdin.flush()
        await wait_until(lambda: path.exists(), what="the store opened")
        proc.send_signal(signal.SIGTERM)
        proc.stdin.close()  # ...no ADD for seq 3
        out = await asyncio.to_thread(proc.stdout.read)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert replies(out) == [(wp.OK, 1, None), (wp.OK, 2, None)]
    assert await stored(path) == {r.job_id for r in recs}


async def test_failures_come_back_by_type(tmp_path: Path) -> None:
    """A live record is a ValueError (none of the batch stored), an unusable
    store a StoreError carrying the child's message, and the store goes on."""
    store = offloaded_sqlite(tmp_path / "h.sqlite3")
    await store.open()
    try:
        live = record(1, ended_at=None)
        with pytest.raises(ValueError, match="has not ended"):
            await store.add([record(2), live])
        await store.add([record(3)])
        assert await store.count(JobFilter()) == 1
    finally:
        await store.close()
    bad = OffloadedStore(SqliteHistory(tmp_path / "ok.sqlite3"), ("redis", "x", LATEST))
    await bad.open()
    try:
        with pytest.raises(StoreError, match="cannot run a 'redis' store"):
            await bad.add([record(4)])
    finally:
        await bad.close()


async def test_a_killed_child_fails_its_caller_and_the_next_call_starts_another(
    tmp_path: Path,
) -> None:
    """The caller waiting on a child that dies gets a StoreError naming the
    exit; the next write runs in a new child; close ends the child."""
    store = offloaded_sqlite(tmp_path / "h.sqlite3")
    await store.open()
    try:
        await store.add([record(1)])
        pid = store.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        waiting = asyncio.ensure_future(store.add([record(2)]))
        await wait_until(lambda: store.in_flight == 1, what="sent")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(StoreError, match=r"exited \(code -9\)"):
            await waiting
        await store.add([record(2)])
        assert store.pid not in (None, pid)
        assert await store.count(JobFilter()) == 2
        last = store.pid
    finally:
        await store.close()
    assert last is not None
    with pytest.raises(ProcessLookupError):
        os.kill(last, 0)  # exited and reaped
