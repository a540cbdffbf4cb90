"""Assigned jobs across a take-over (runtime/cluster_jobs.ClusterFence on a real
Dispatcher, in process, on the in-memory store): the owner sends a job's
assignment only once its record names the worker; a new owner never places
such a job again (it waits for the migrate, or ends it `worker_lost` after the
grace) and places a never-assigned record at once, without the settle wait."""

from __future__ import annotations

import asyncio
import json

from cluster.takeover import POOL, Link, ended, left_by_a_dead_owner, new_owner
from support import wait_until

from trunkline.cluster import MemoryCoordinator
from trunkline.core import JobState


class _GatedWrites(MemoryCoordinator):
    """The in-memory store whose fenced writes wait until `gate` is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop.time)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()

    async def write_fenced(
        self, pool: str, member: str, epoch: int, puts: dict[str, str], deletes: list[str]
    ) -> bool:
        self.writing.set()
        await self.gate.wait()
        return await super().write_fenced(pool, member, epoch, puts, deletes)


async def test_the_assignment_goes_out_only_once_the_record_names_the_worker() -> None:
    store = _GatedWrites(asyncio.get_running_loop())
    d, node, fence = await new_owner(store, settle_s=0.0, grace_s=60.0)
    try:
        link = Link()
        d.worker_connected(link, "AW_1", POOL, 2, identity="W")
        job = d.request(POOL, room="r", metadata="", max_wait_s=30.0)
        assert await fence.recorded(job)
        assert link.offered == [job.id]
        store.gate.clear()
        store.writing.clear()
        d.offer_answered("AW_1", job.id, available=True, terminate=False, accept=None)
        await asyncio.wait_for(store.writing.wait(), 5.0)
        assert link.assigned == []  # the record is not written yet
        store.gate.set()
        await wait_until(lambda: link.assigned == [job.id], 5.0, what="the assignment")
        recs = await store.records(POOL)
        assert json.loads(recs[job.id])["worker"] == "W"
    finally:
        await fence.aclose()
        await node.close()


async def test_a_job_whose_worker_migrates_after_the_settle_is_adopted_not_placed_again() -> None:
    loop = asyncio.get_running_loop()
    store = MemoryCoordinator(loop.time)
    await left_by_a_dead_owner(store, {"AJ_X": "W"})
    d, node, fence = await new_owner(store, settle_s=0.1, grace_s=60.0)
    try:
        other = Link()
        d.worker_connected(other, "AW_2", POOL, 2, identity="V")
        t0 = loop.time()
        # W comes back well after settle_s (its client's second reconnect).
        await wait_until(lambda: loop.time() >= t0 + 0.5, 5.0, what="0.5 s on")
        assert d.live_job("AJ_X") is None
        link = Link()
        d.worker_connected(link, "AW_1", POOL, 2, identity="W")
        await d.jobs_migrated("AW_1", ["AJ_X"])
        job = d.live_job("AJ_X")
        assert job is not None
        assert job.state is JobState.RUNNING
        assert job.worker_id == "AW_1"
        assert other.offered == []
        assert link.offered == []
        assert fence.carried == 0
        assert fence.lost == 0
    finally:
        await fence.aclose()
        await node.close()


async def test_a_job_whose_worker_never_comes_back_ends_worker_lost_after_the_grace() -> None:
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await left_by_a_dead_owner(store, {"AJ_X": "W"})
    d, node, fence = await new_owner(store, settle_s=0.0, grace_s=0.2)
    try:
        other = Link()
        d.worker_connected(other, "AW_2", POOL, 2, identity="V")
        rec = await ended(d, "AJ_X")
        assert rec.state == "worker_lost"
        assert rec.reason == "worker W did not migrate it within 0.2 s of the take-over"
        assert other.offered == []
        assert d.live_job("AJ_X") is None
        assert fence.lost == 1
        assert fence.carried == 0

        async def deleted() -> bool:
            return not await store.records(POOL)

        await wait_until(deleted, 5.0, what="X's record deleted")
    finally:
        await fence.aclose()
        await node.close()


async def test_never_assigned_records_are_requested_at_once() -> None:
    """Settle 30 s and no record names a worker (none may still migrate): the
    take-over requests them without waiting."""
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await left_by_a_dead_owner(store, {"AJ_Q": "", "AJ_R": ""})
    d, node, fence = await new_owner(store, settle_s=30.0, grace_s=60.0)
    try:
        await wait_until(lambda: fence.carried == 2, 5.0, what="Q and R requested again")
        link = Link()
        d.worker_connected(link, "AW_2", POOL, 2, identity="V")
        assert sorted(link.offered) == ["AJ_Q", "AJ_R"]
    finally:
        await fence.aclose()
        await node.close()
