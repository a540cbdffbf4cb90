"""What the in-process take-over tests share (test_take_over_ends.py,
test_take_over_assigned.py): a worker link that keeps what it is sent, the
records a dead owner left, and a new owner (a real Dispatcher with a
ClusterFence) on the in-memory store."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

from livekit.protocol import agent
from support import wait_until

from trunkline.cluster import MemoryCoordinator
from trunkline.config import parse_config
from trunkline.runtime.cluster import ClusterNode
from trunkline.runtime.cluster_jobs import ClusterFence
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.stores import JobRecord

POOL = "support"


class Link:
    """A worker connection that keeps the ids it is offered and assigned."""

    def __init__(self) -> None:
        self.offered: list[str] = []
        self.assigned: list[str] = []

    def send(self, frame: bytes) -> None:
        msg = agent.ServerMessage.FromString(frame)
        kind = msg.WhichOneof("message")
        if kind == "availability":
            self.offered.append(msg.availability.job.id)
        elif kind == "assignment":
            self.assigned.append(msg.assignment.job.id)

    async def close(self, message: bytes) -> None:
        pass


def record(room: str, worker: str | None = None) -> str:
    """A job's record as an owner writes it; `worker` None: as written before
    records named the assigned worker (no such field)."""
    fields: dict[str, object] = {
        "agent_name": POOL,
        "room": room,
        "metadata": "m",
        "attributes": {"a": "1"},
        "deadline": time.time() + 60,
    }
    if worker is not None:
        fields["worker"] = worker
    return json.dumps(fields)


async def left_by_a_dead_owner(store: MemoryCoordinator, jobs: Mapping[str, str | None]) -> None:
    """Records (job id -> worker identity, "" if not assigned, None for the
    older form) written by member m0 at its epoch, which then gave up the pool."""
    epoch = await store.acquire(POOL, "m0", 60_000)
    assert epoch is not None
    for job_id, worker in jobs.items():
        assert await store.put_fenced(POOL, "m0", epoch, job_id, record(f"room-{job_id}", worker))
    assert await store.release(POOL, "m0", epoch)


async def new_owner(
    store: MemoryCoordinator, settle_s: float, grace_s: float | None = None
) -> tuple[Dispatcher, ClusterNode, ClusterFence]:
    """Member m1 owning the pool (cap 2, a 60 s queue wait; `grace_s`:
    the pool's `reconnect_grace_s`, else its default)."""
    loop = asyncio.get_running_loop()
    pool: dict[str, object] = {"max_jobs_per_worker": 2, "queue_max_wait_s": 60}
    if grace_s is not None:
        pool["reconnect_grace_s"] = grace_s
    config = parse_config({"keys": {"k": "s" * 32}, "pools": {POOL: pool}})
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


async def ended(d: Dispatcher, job_id: str) -> JobRecord:
    """`job_id`'s record, once it is in `d`'s history."""

    async def found() -> JobRecord | None:
        return await d.find_job(job_id)

    rec: JobRecord = await wait_until(found, 5.0, what=f"{job_id} in the history")
    return rec
