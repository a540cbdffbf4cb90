"""Records, filters and cursors on their own (the oracle the contract relies on)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from stores.contract import BASE, record

from trunkline.core import Job, JobState, TraceEvent
from trunkline.stores import (
    BadCursor,
    InvalidQuery,
    JobFilter,
    JobRecord,
    MemoryHistory,
    SipCallRecord,
    TraceRecord,
    cursor_after,
    decode_cursor,
    order_key,
)

SIP = SipCallRecord("c1@edge", "+4930111", "+49800", "carrier-a", 200)


def test_from_job_converts_times_and_copies_everything() -> None:
    """from_job turns every scheduler time into wall time (t + offset) and copies
    each field, trace and attributes into immutable form."""
    job = Job("AJ_1", "support", "room-1", '{"x": 1}', 10.0, 5.0, "AD_1", {"b": "2", "a": "1"})
    job.state = JobState.SUCCEEDED
    job.reason = "done"
    job.worker_id = "AW_1"
    job.placed_at, job.running_at, job.ended_at = 10.5, 11.0, 70.0
    job.queue_wait_s = 0.5
    job.trace.append(TraceEvent(70.0, "succeeded", "AW_1", "done"))
    r = JobRecord.from_job(job, 1_000.0, replica_id="rep-1", sip=SIP)
    assert r == JobRecord(
        job_id="AJ_1",
        dispatch_id="AD_1",
        agent_name="support",
        room="room-1",
        metadata='{"x": 1}',
        attributes=(("a", "1"), ("b", "2")),
        state="succeeded",
        reason="done",
        worker_id="AW_1",
        replica_id="rep-1",
        created_at=1_010.0,
        placed_at=1_010.5,
        running_at=1_011.0,
        ended_at=1_070.0,
        queue_wait_s=0.5,
        max_wait_s=5.0,
        trace=(
            TraceRecord(1_010.0, "requested"),
            TraceRecord(1_070.0, "succeeded", "AW_1", "done"),
        ),
        sip=SIP,
    )
    job.attributes["c"] = "3"
    job.trace.append(TraceEvent(71.0, "late"))
    assert len(r.trace) == 2
    assert r.attributes_dict == {"a": "1", "b": "2"}


def test_from_job_snapshots_a_live_job() -> None:
    """A live job becomes a record with the steps not reached yet as None."""
    job = Job("AJ_2", "support", "room-1", "", 10.0, 5.0)
    r = JobRecord.from_job(job, 100.0)
    assert (r.state, r.created_at, r.placed_at, r.ended_at) == ("queued", 110.0, None, None)
    assert r.sip is None
    assert r.replica_id is None
    with pytest.raises(ValueError, match="not ended"):
        order_key(r)


def test_record_normalises_mutable_inputs() -> None:
    """A list trace or dict attributes passed in are frozen into sorted tuples."""
    r = JobRecord(
        job_id="J",
        agent_name="p",
        room="r",
        state="failed",
        created_at=1.0,
        max_wait_s=1.0,
        attributes={"z": "1", "a": "2"},  # type: ignore[arg-type]
        trace=[TraceRecord(1.0, "requested")],  # type: ignore[arg-type]
    )
    assert r.attributes == (("a", "2"), ("z", "1"))
    assert r.trace == (TraceRecord(1.0, "requested"),)
    hash(r)


@pytest.mark.parametrize(
    ("flt", "hit", "miss"),
    [
        (JobFilter(states=frozenset({"failed"})), {"state": "failed"}, {"state": "succeeded"}),
        (JobFilter(agent_name="sales"), {"agent_name": "sales"}, {"agent_name": "support"}),
        (JobFilter(room="r1"), {"room": "r1"}, {"room": "r2"}),
        (JobFilter(worker_id="W1"), {"worker_id": "W1"}, {"worker_id": None}),
        (JobFilter(dispatch_id="D1"), {"dispatch_id": "D1"}, {"dispatch_id": "D2"}),
        (JobFilter(trunk="carrier-a"), {"sip": SIP}, {"sip": None}),
        (
            JobFilter(trunk="carrier-a"),
            {"sip": SIP},
            {"sip": dataclasses.replace(SIP, trunk="carrier-b")},
        ),
        (JobFilter(caller="+4930111"), {"sip": SIP}, {"sip": None}),
        (
            JobFilter(caller="+4930111"),
            {"sip": SIP},
            {"sip": dataclasses.replace(SIP, from_number="+1")},
        ),
        (JobFilter(since=BASE), {"created_at": BASE}, {"created_at": BASE - 0.001}),
        (JobFilter(until=BASE), {"created_at": BASE - 0.001}, {"created_at": BASE}),
        (
            JobFilter(agent_name="sales", room="r1"),
            {"agent_name": "sales", "room": "r1"},
            {"agent_name": "sales", "room": "r2"},
        ),
    ],
)
def test_filter_matches(flt: JobFilter, hit: dict[str, object], miss: dict[str, object]) -> None:
    """Each filter field matches on its own field only; since is inclusive,
    until exclusive, trunk and caller need a SIP call; fields AND together."""
    assert flt.matches(record(1, **hit))
    assert not flt.matches(record(1, **miss))
    assert JobFilter().matches(record(1, **miss))


def test_filter_validates() -> None:
    """Unknown or empty states and non-finite times are refused up front;
    a set of states given as a list is frozen."""
    with pytest.raises(InvalidQuery, match="unknown state"):
        JobFilter(states=frozenset({"done"}))
    with pytest.raises(InvalidQuery, match="empty"):
        JobFilter(states=frozenset())
    with pytest.raises(InvalidQuery, match="since"):
        JobFilter(since=math.nan)
    flt = JobFilter(states=["failed", "failed"])  # type: ignore[arg-type]
    assert flt.states == frozenset({"failed"})


def test_cursor_round_trips_exactly() -> None:
    """A cursor decodes to the exact (ended_at, job_id) of its record, is
    URL-safe, and anything else is BadCursor."""
    r = record(7, ended_at=BASE + 1 / 3, job_id="AJ_ü/+=")
    c = cursor_after(r)
    assert decode_cursor(c) == (BASE + 1 / 3, "AJ_ü/+=")
    assert all(ch.isalnum() or ch in "-_" for ch in c)
    with pytest.raises(BadCursor):
        decode_cursor(c[1:])


def test_memory_refuses_negative_capacity() -> None:
    """MemoryHistory(-1) is a configuration error, not an empty history."""
    with pytest.raises(ValueError, match="capacity"):
        MemoryHistory(-1)


async def test_memory_capacity_zero_keeps_nothing() -> None:
    """history_size = 0 turns the history off: records are dropped at once."""
    store = MemoryHistory(0)
    await store.add([record(1)])
    assert await store.get("J0001") is None
    assert len(store) == 0
