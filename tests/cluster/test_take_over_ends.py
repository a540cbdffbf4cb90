"""A job that ended on its worker while the worker reconnected to a new owner
(runtime/cluster_jobs.ClusterFence on a real Dispatcher, in process): the
worker's end report for a carried-over record is taken as the job's end, so
the new owner never places it again."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from livekit.protocol import agent
from support import wait_until

from trunkline.cluster import MemoryCoordinator
from trunkline.config import parse_config
from trunkline.core import Job, JobState
from trunkline.runtime.cluster import ClusterNode
from trunkline.runtime.cluster_jobs import ClusterFence
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.stores import JobRecord

POOL = "support"


class _Link:
    """A worker connection that keeps the ids of the jobs it is offered."""

    def __init__(self) -> None:
        self.offered: list[str] = []

    def send(self, frame: bytes) -> None:
        msg = agent.ServerMessage.FromString(frame)
        if msg.WhichOneof("message") == "availability":
            self.offered.append(msg.availability.job.id)

    async def close(self, message: bytes) -> None:
        pass


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


def _record(room: str) -> str:
    return json.dumps(
        {
            "agent_name": POOL,
            "room": room,
            "metadata": "m",
            "attributes": {"a": "1"},
            "deadline": time.time() + 60,
        }
    )


async def _left_by_a_dead_owner(store: MemoryCoordinator, jobs: list[str]) -> None:
    """Records written by member m0 at its epoch, which then gave up the pool."""
    epoch = await store.acquire(POOL, "m0", 60_000)
    assert epoch is not None
    for job_id in jobs:
        assert await store.put_fenced(POOL, "m0", epoch, job_id, _record(f"room-{job_id}"))
    assert await store.release(POOL, "m0", epoch)


async def _new_owner(
    store: MemoryCoordinator, settle_s: float
) -> tuple[Dispatcher, ClusterNode, ClusterFence]:
    loop = asyncio.get_running_loop()
    config = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {POOL: {"max_jobs_per_worker": 2, "queue_max_wait_s": 60}},
        }
    )
    d = Dispatcher(config, Metrics())
    d.start(loop)
    node = ClusterNode(
        store, [POOL], url="http://m1", lease_ttl_s=2.0, clock=loop.time, member="m1"
    )
    fence = ClusterFence(node, d, settle_s=settle_s)
    d.set_fence(fence)
    node.start()
    await wait_until(lambda: node.may_act(POOL), 5.0, what="m1 owns the pool")
    return d, node, fence


async def _ended(d: Dispatcher, job_id: str) -> JobRecord:
    async def found() -> JobRecord | None:
        return await d.find_job(job_id)

    rec: JobRecord = await wait_until(found, 5.0, what=f"{job_id} in the history")
    return rec


async def test_an_end_reported_during_the_settle_is_the_jobs_end_and_it_is_never_placed() -> None:
    """X recorded at the take-over, its worker reports it succeeded before the
    settle is over (Y migrates): X is not offered again, its record is deleted,
    its end is in the history with the worker's outcome, and the wait ends early."""
    store = MemoryCoordinator(asyncio.get_running_loop().time)
    await _left_by_a_dead_owner(store, ["AJ_X", "AJ_Y"])
    d, node, fence = await _new_owner(store, settle_s=30.0)
    try:
        link = _Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        await d.jobs_migrated("AW_1", ["AJ_Y"])
        d.job_reported("AW_1", "AJ_X", JobState.SUCCEEDED, "")
        await wait_until(lambda: fence.settled_early == 1, 5.0, what="the wait ended early")
        assert d.live_job("AJ_X") is None
        assert "AJ_X" not in link.offered
        assert fence.carried == 0
        assert fence.ends_adopted == 1
        rec = await _ended(d, "AJ_X")
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
    await _left_by_a_dead_owner(store, ["AJ_X"])
    store.gate.clear()
    d, node, fence = await _new_owner(store, settle_s=0.0)
    try:
        link = _Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        await asyncio.wait_for(store.reading.wait(), 5.0)
        d.job_reported("AW_1", "AJ_X", JobState.FAILED, "agent crashed")
        store.gate.set()
        rec = await _ended(d, "AJ_X")
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
    await _left_by_a_dead_owner(store, ["AJ_X"])
    d, node, fence = await _new_owner(store, settle_s=0.0)
    try:
        await wait_until(lambda: fence.carried == 1, 5.0, what="X requested again")
        link = _Link()
        d.worker_connected(link, "AW_1", POOL, 2)
        assert link.offered == ["AJ_X"]
        d.job_reported("AW_1", "AJ_X", JobState.SUCCEEDED, "")
        assert d.live_job("AJ_X") is None
        rec = await _ended(d, "AJ_X")
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
    await _left_by_a_dead_owner(store, ["AJ_X"])
    d, node, fence = await _new_owner(store, settle_s=0.0)
    try:
        await wait_until(lambda: fence.carried == 1, 5.0, what="X requested again")
        d.worker_connected(_Link(), "AW_1", POOL, 2)
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
