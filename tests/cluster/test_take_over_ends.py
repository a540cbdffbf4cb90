"""A job that ended on its worker while the worker reconnected to a new owner
(runtime/cluster_jobs.ClusterFence on a real Dispatcher, in process): the
worker's end report for a carried-over record is taken as the job's end, so
the new owner never places it again."""

from __future__ import annotations

import asyncio

import pytest
from cluster.takeover import POOL, Link, ended, left_by_a_dead_owner, new_owner
from support import wait_until

from trunkline.cluster import MemoryCoordinator
from trunkline.config import parse_config
from trunkline.core import Job, JobState
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics


class _GatedStore(MemoryCoordinator):
    """The in-memory store whose `records` read waits until `gate` is set."""

    def __init__(self, now: asyncio.AbstractEventLoop) -> None:
        super().__init__(now.time)
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()

    async def records(self, pool: str) -> dict[str, str]:
        self.reading.set()
        await self.gate.wait()
        return await super().records(pool)


async def test_an_end_reported_during_the_settle_is_the_jobs_end_and_it_is_never_placed() -> None:
    """X recorded at the take-over, its worker reports it succeeded before the
    settle is over (Y migrates): X is not offered again, its record is deleted,
    its end is in the history with the worker's outcome, and the wait ends early."""
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await left_by_a_dead_owner(store, dict.fromkeys(["AJ_X", "AJ_Y"]))
    d, node, fence = await new_owner(store, settle_s=30.0)
    try:
        link = Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        await d.jobs_migrated("AW_1", ["AJ_Y"])
        d.job_reported("AW_1", "AJ_X", JobState.SUCCEEDED, "")
        await wait_until(lambda: fence.settled_early == 1, 5.0, what="the wait ended early")
        assert d.live_job("AJ_X") is None
        assert "AJ_X" not in link.offered
        assert fence.carried == 0
        assert fence.ends_adopted == 1
        rec = await ended(d, "AJ_X")
        assert (rec.state, rec.reason, rec.worker_id) == ("succeeded", "job finished", "AW_1")
        assert (rec.agent_name, rec.room, rec.metadata) == (POOL, "room-AJ_X", "m")
        assert [t.event for t in rec.trace] == ["ended_in_take_over"]

        async def deleted() -> bool:
            return set(await store.records(POOL)) == {"AJ_Y"}

        await wait_until(deleted, 5.0, what="X's record deleted, Y's kept")
    finally:
        await fence.aclose()
        await node.close()


async def test_an_end_reported_before_the_records_are_read_is_kept_until_they_are() -> None:
    """The worker's failure report for X comes while the take-over still reads
    the records: X is not placed (settle 0), and it ends failed with its error."""
    store = _GatedStore(asyncio.get_running_loop())
    await left_by_a_dead_owner(store, {"AJ_X": None})
    store.gate.clear()
    d, node, fence = await new_owner(store, settle_s=0.0)
    try:
        link = Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        await asyncio.wait_for(store.reading.wait(), 5.0)
        d.job_reported("AW_1", "AJ_X", JobState.FAILED, "agent crashed")
        store.gate.set()
        rec = await ended(d, "AJ_X")
        assert (rec.state, rec.reason) == ("failed", "agent crashed")
        assert d.live_job("AJ_X") is None
        assert link.offered == []
        assert fence.carried == 0
    finally:
        await fence.aclose()
        await node.close()


async def test_an_end_reported_after_the_job_was_requested_again_cancels_that_request() -> None:
    """X was requested again (settle 0, no worker then) and offered to the worker
    that reconnects; its report that X succeeded cancels X before it is accepted."""
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await left_by_a_dead_owner(store, {"AJ_X": None})
    d, node, fence = await new_owner(store, settle_s=0.0)
    try:
        await wait_until(lambda: fence.carried == 1, 5.0, what="X requested again")
        link = Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        assert link.offered == ["AJ_X"]
        d.job_reported("AW_1", "AJ_X", JobState.SUCCEEDED, "")
        assert d.live_job("AJ_X") is None
        rec = await ended(d, "AJ_X")
        assert rec.state == "cancelled"
        assert rec.reason == "job ended on its worker during the take-over (succeeded)"
        assert "ended_in_take_over" in [t.event for t in rec.trace]
        assert fence.ends_adopted == 1

        async def deleted() -> bool:
            return not await store.records(POOL)

        await wait_until(deleted, 5.0, what="X's record deleted")
    finally:
        await fence.aclose()
        await node.close()


async def test_an_end_for_a_job_that_was_not_recorded_is_still_ignored() -> None:
    """A final status for an id that is neither live nor among the carried-over
    records changes nothing (no history record, no count)."""
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await left_by_a_dead_owner(store, {"AJ_X": None})
    d, node, fence = await new_owner(store, settle_s=0.0)
    try:
        await wait_until(lambda: fence.carried == 1, 5.0, what="X requested again")
        d.worker_connected(Link(), "AW_1", POOL, 2)
        d.job_reported("AW_1", "AJ_OTHER", JobState.SUCCEEDED, "")
        assert fence.ends_adopted == 0
        assert await d.find_job("AJ_OTHER") is None
    finally:
        await fence.aclose()
        await node.close()


async def test_record_ended_refuses_a_job_that_has_not_ended_or_is_live() -> None:
    """`Dispatcher.record_ended` writes only an ended job the scheduler does not hold."""
    config = parse_config({"keys": {"k": "s" * 32}, "pools": {POOL: {"queue_max_wait_s": 60}}})
    d = Dispatcher(config, Metrics())
    d.start(asyncio.get_running_loop())
    with pytest.raises(ValueError, match="has not ended"):
        d.record_ended(Job("AJ_1", POOL, "r", "", d.now(), 0.0))
    live = d.request(POOL, room="r", metadata="", max_wait_s=30.0)
    ended = Job(live.id, POOL, "r", "", d.now(), 0.0)
    ended.state, ended.ended_at = JobState.SUCCEEDED, d.now()
    with pytest.raises(ValueError, match="is live here"):
        d.record_ended(ended)
