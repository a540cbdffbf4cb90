"""Cluster mode: the jobs a pool's owner holds, kept in the coordination
store so the next owner can carry them over (docs/cluster.md).

Theory of operation
-------------------
`ClusterFence` is what the Dispatcher is fenced with: `may_act` and
`refusal` are the `ClusterNode`'s, and `admitted(job)` is called for every
job the owner lets in. For each one still live, a *record* (agent name,
room, metadata, attributes, its deadline in Unix time) is written to the
pool's fenced records at the owner's epoch; when the job ends, the record
is deleted the same way. Both writes are fenced: a member that has lost
the pool cannot touch them (its late deletes are refused, so the new owner
keeps what it must place). The writes run in the background, off the
dispatch path: a job acknowledged less than one Redis round trip before
its owner died may not be recorded.

Take-over: when this member becomes a pool's owner it waits `settle_s`
for the workers of the previous owner to reconnect and migrate their
running jobs (they are adopted, docs/semantics.md rule 7), then reads the
pool's records and requests again, with the same job id and what is left
of its max wait, every job that is neither live here (adopted) nor ended
here. So a job that was queued, or offered but not yet assigned, at the
old owner is placed by the new one; a job that was assigned is running on
a worker that migrates it and is never placed twice, provided that worker
reconnects within `settle_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from trunkline.cluster import ClusterUnavailable, Coordinator
from trunkline.core import TERMINAL, Job
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.dispatcher import Dispatcher

log = logging.getLogger("trunkline.cluster")

__all__ = ["ClusterFence"]


class ClusterFence:
    """See the module docstring. `carried` counts jobs placed again after a
    take-over; `record_errors` the record writes that could not be made."""

    def __init__(
        self,
        node: ClusterNode,
        dispatcher: Dispatcher,
        settle_s: float,
        records: Coordinator | None = None,
    ) -> None:
        self._node = node
        # Its own connection(s) to the store: a burst of record writes must
        # not hold up the node's lease renewals (they would time out and the
        # pool change hands under load).
        self._coord = records if records is not None else node.coordinator
        self._d = dispatcher
        self.settle_s = settle_s
        self.carried = 0
        self.record_errors = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        dispatcher.add_job_observer(self)
        node.on_gained(self._gained)

    # ------------------------------------------------------------ the fence

    def may_act(self, pool: str) -> bool:
        return self._node.may_act(pool)

    def refusal(self, pool: str) -> Exception:
        return self._node.refusal(pool)

    def admitted(self, job: Job) -> None:
        """A job the owner let in: record it (in the background)."""
        if job.state in TERMINAL:
            return
        epoch = self._node.epoch(job.agent_name)
        if not epoch:
            return
        rec = json.dumps(
            {
                "agent_name": job.agent_name,
                "room": job.room,
                "metadata": job.metadata,
                "attributes": job.attributes,
                "deadline": self._d.wall(job.deadline),
            },
            separators=(",", ":"),
        )
        coord = self._coord
        self._spawn(coord.put_fenced(job.agent_name, self._node.member, epoch, job.id, rec), job.id)

    # --------------------------------------------------------- job observer

    def job_placed(self, job: Job) -> None:
        return None

    def job_ended(self, job: Job) -> None:
        epoch = self._node.epoch(job.agent_name)
        if epoch:
            coord = self._coord
            self._spawn(
                coord.delete_fenced(job.agent_name, self._node.member, epoch, job.id), job.id
            )

    # ------------------------------------------------------------ take-over

    def _gained(self, pool: str, epoch: int) -> None:
        self._spawn(self._take_over(pool, epoch), pool)

    async def _take_over(self, pool: str, epoch: int) -> None:
        # Not a test's sleep: the previous owner's workers need this long to
        # reconnect and migrate what they run before anything is placed again.
        await asyncio.sleep(self.settle_s)
        node = self._node
        if node.epoch(pool) != epoch:
            return  # lost it again meanwhile
        try:
            records = await self._coord.records(pool)
        except ClusterUnavailable as exc:
            log.warning("take-over could not read jobs", extra={"pool": pool, "reason": str(exc)})
            return
        d = self._d
        placed = 0
        for job_id, raw in sorted(records.items(), key=lambda kv: _deadline(kv[1])):
            if d.live_job(job_id) is not None:
                continue  # adopted from a migrating worker, or ours already
            if await d.find_job(job_id) is not None:
                self._spawn(self._coord.delete_fenced(pool, node.member, epoch, job_id), job_id)
                continue  # it ended here
            try:
                rec = json.loads(raw)
                left = max(0.0, float(rec.get("deadline") or 0.0) - time.time())
                attributes = rec.get("attributes") or None
                d.request(
                    pool,
                    room=str(rec.get("room", "")),
                    metadata=str(rec.get("metadata", "")),
                    max_wait_s=left,
                    attributes={str(k): str(v) for k, v in attributes.items()}
                    if isinstance(attributes, dict)
                    else None,
                    job_id=job_id,
                )
            except ClusterRefusal:
                return  # not ours any more
            except (ValueError, TypeError, AttributeError):
                log.warning("job record unreadable", extra={"pool": pool, "job_id": job_id})
                continue
            placed += 1
        self.carried += placed
        if placed:
            log.info("jobs carried over", extra={"pool": pool, "jobs": placed, "epoch": epoch})

    # ---------------------------------------------------------------- tasks

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ClusterUnavailable):
            self.record_errors += 1
        elif exc is not None:
            log.error("cluster job task failed", exc_info=exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        if self._coord is not self._node.coordinator:
            await self._coord.close()


def _deadline(raw: str) -> float:
    try:
        return float(json.loads(raw).get("deadline") or 0.0)
    except (ValueError, TypeError, AttributeError):
        return 0.0
