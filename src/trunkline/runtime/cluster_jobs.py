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
keeps what it must place).

The writes run in the background, off the dispatch path, batched per pool
(`RecordBatches`): one fenced script call carries every put and delete that
came in while the previous call was in flight (at most `BATCH_MAX`), so a
burst costs one round trip per batch, not two per job. A job that ends
before its put was sent is neither put nor deleted (nothing would be left
for a successor to place). A put that failed (store unreachable) is tried
again while this member owns the pool. `recorded(job_id)` is the awaitable
of a job's put: True once it landed (or the job ended first), False if the
store refused it or this member stopped owning the pool. A job acknowledged
before its put landed and whose owner then died is not recorded: callers
that must not lose it wait on `recorded`.

Take-over: when this member becomes a pool's owner it reads the pool's
records and waits up to `settle_s` for the workers of the previous owner
to reconnect and migrate their running jobs (they are adopted,
docs/semantics.md rule 7); the wait ends early once every recorded job is
live or ended here. Then it requests again, with the same job id and what
is left of its max wait, every recorded job that is neither live here
(adopted) nor ended here. So a job that was queued, or offered but not yet
assigned, at the old owner is placed by the new one; a job that was
assigned is running on a worker that migrates it and is never placed
twice, provided that worker reconnects within `settle_s` of the take-over.

A job that ended on its worker while the worker reconnected is not migrated
(it no longer runs); the worker reports its end (`UpdateJobStatus`) on the
new session instead, for a job this member does not know
(`Dispatcher.set_unknown_end_hook`). If the job is among the records being
carried over and not yet requested again, it is not placed: its record is
deleted and its end written to this member's history with the worker's
outcome. If it was requested again but not yet assigned, that request is
cancelled. An end reported before the records were read is kept until they
are (at most `EARLY_ENDS_MAX` per pool).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from trunkline.cluster import ClusterUnavailable, Coordinator
from trunkline.core import TERMINAL, Job, JobState, TraceEvent
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.dispatcher import Dispatcher

log = logging.getLogger("trunkline.cluster")

__all__ = ["ClusterFence", "RecordBatches"]

SETTLE_POLL_S = 0.01  # how often a take-over's wait looks at what migrated


EARLY_ENDS_MAX = 10_000  # ends kept per pool while its take-over reads the records
BATCH_MAX = 200  # records per script call (Lua's unpack has a stack limit)
RETRY_S = 0.1  # after a failed batch, before the next one


class RecordBatches:
    """The pool records' writer: puts and deletes queued per pool and sent
    as one fenced call per batch, one call in flight per pool (see the
    module docstring). `errors` counts failed calls, `refused` the batches
    the store refused (this member no longer held the pool)."""

    def __init__(self, node: ClusterNode, coord: Coordinator) -> None:
        self._node = node
        self._coord = coord
        self._puts: dict[str, dict[str, str]] = {}  # pool -> job id -> record
        self._deletes: dict[str, dict[str, None]] = {}  # pool -> job ids (ordered)
        self._sending: dict[str, set[str]] = {}  # pool -> job ids of the put in flight
        self._waiters: dict[str, asyncio.Future[bool]] = {}
        # job id -> called with the outcome of its next put (`put(then=...)`)
        self._then: dict[str, list[Callable[[bool], None]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.errors = 0
        self.refused = 0
        self.calls = 0

    def put(
        self, pool: str, job_id: str, record: str, then: Callable[[bool], None] | None = None
    ) -> None:
        """Queue `record` (it replaces one of `job_id` not yet sent); `then`
        is called with True once it landed, False if it will not."""
        self._puts.setdefault(pool, {})[job_id] = record
        if then is not None:
            self._then.setdefault(job_id, []).append(then)
        self._kick(pool)

    def delete(self, pool: str, job_id: str) -> None:
        pending = self._puts.get(pool)
        if pending is not None and pending.pop(job_id, None) is not None:
            self._resolve(job_id, True)  # ended before it was written: nothing to keep
            self._call(self._then.pop(job_id, None), False)
            return
        self._deletes.setdefault(pool, {})[job_id] = None
        self._kick(pool)

    def recorded(self, pool: str, job_id: str) -> asyncio.Future[bool]:
        fut = self._waiters.get(job_id)
        if fut is not None:
            return fut
        fut = asyncio.get_running_loop().create_future()
        if job_id in self._puts.get(pool, {}) or job_id in self._sending.get(pool, ()):
            self._waiters[job_id] = fut
        else:
            fut.set_result(False)  # not queued: never recorded here (or long since)
        return fut

    @staticmethod
    def _call(thens: list[Callable[[bool], None]] | None, ok: bool) -> None:
        for then in thens or ():
            try:
                then(ok)
            except Exception:
                log.exception("record callback failed")

    def _resolve(self, job_id: str, ok: bool) -> None:
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def _kick(self, pool: str) -> None:
        if pool not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._drain(pool))
            self._tasks[pool] = task
            task.add_done_callback(functools.partial(self._drained, pool))

    def _drained(self, pool: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(pool) is task:
            del self._tasks[pool]
        if not task.cancelled() and task.exception() is not None:
            log.error("record writer failed", exc_info=task.exception())
        if self._puts.get(pool) or self._deletes.get(pool):
            self._kick(pool)  # arrived as it finished

    async def _drain(self, pool: str) -> None:
        node = self._node
        while self._puts.get(pool) or self._deletes.get(pool):
            epoch = node.epoch(pool)
            puts = self._take(self._puts, pool)
            deletes = list(self._take(self._deletes, pool, BATCH_MAX - len(puts)))
            if not epoch:
                # Not ours (any more): the store would refuse these; the next
                # owner reads what was written while we held it.
                for job_id in puts:
                    self._resolve(job_id, False)
                    self._call(self._then.pop(job_id, None), False)
                continue
            sending = self._sending[pool] = set(puts)
            thens = {j: t for j in puts if (t := self._then.pop(j, None)) is not None}
            try:
                self.calls += 1
                ok = await self._coord.write_fenced(pool, node.member, epoch, puts, deletes)
            except ClusterUnavailable:
                self.errors += 1
                self._sending.pop(pool, None)
                # Try again while we own the pool: the records stay needed.
                for job_id, rec in puts.items():
                    if job_id in sending:
                        self._puts.setdefault(pool, {}).setdefault(job_id, rec)
                for job_id, waiting in thens.items():
                    self._then[job_id] = waiting + self._then.get(job_id, [])
                again = self._deletes.setdefault(pool, {})
                for job_id in deletes:
                    again[job_id] = None
                await asyncio.sleep(RETRY_S)
                continue
            self._sending.pop(pool, None)
            if not ok:
                self.refused += 1
            for job_id in puts:
                self._resolve(job_id, ok)
                self._call(thens.get(job_id), ok)

    @staticmethod
    def _take(queue: dict[str, dict[str, Any]], pool: str, n: int = BATCH_MAX) -> dict[str, Any]:
        pending = queue.get(pool)
        if not pending:
            return {}
        if len(pending) <= n:
            del queue[pool]
            return pending
        taken = dict(itertools.islice(pending.items(), n))
        for key in taken:
            del pending[key]
        return taken

    def cancel(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        for job_id in list(self._waiters):
            self._resolve(job_id, False)
        thens, self._then = self._then, {}
        for waiting in thens.values():
            self._call(waiting, False)


class ClusterFence:
    """See the module docstring. `carried` counts jobs placed again after a
    take-over; `record_errors` the record writes that could not be made;
    `ends_adopted` the carried-over jobs whose end a worker reported during
    the take-over (not placed, or their new request cancelled)."""

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
        self.batches = RecordBatches(node, self._coord)
        self._d = dispatcher
        self.settle_s = settle_s
        self.carried = 0
        self.settled_early = 0  # take-overs whose wait ended before settle_s
        self.ends_adopted = 0
        self.lost = 0  # assigned records whose worker never came back
        # pool -> the records being carried over (None: not read yet); after
        # the take-over, only those requested again and not yet placed.
        self._carry: dict[str, dict[str, str] | None] = {}
        # pool -> job id -> (worker, status, error): ends reported before the
        # take-over had read the records.
        self._early: dict[str, dict[str, tuple[str, JobState, str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        dispatcher.add_job_observer(self)
        dispatcher.set_unknown_end_hook(self._unknown_end)
        node.on_gained(self._gained)

    @property
    def record_errors(self) -> int:
        return self.batches.errors

    # ------------------------------------------------------------ the fence

    def may_act(self, pool: str) -> bool:
        return self._node.may_act(pool)

    def refusal(self, pool: str) -> Exception:
        return self._node.refusal(pool)

    def admitted(self, job: Job) -> None:
        """A job the owner let in: record it (in the background, batched)."""
        if job.state in TERMINAL or not self._node.epoch(job.agent_name):
            return
        self.batches.put(job.agent_name, job.id, self._record(job, ""))

    def assigning(self, job: Job, worker_id: str, send: Callable[[bool], None]) -> None:
        """`job` is assigned to `worker_id`: its record is rewritten to name
        that worker's identity (what its migrate will carry after a take-over)
        and `send(True)` is called once that landed (the assignment frame goes
        out then), `send(False)` if it will not (refused: not ours)."""
        if not self._node.epoch(job.agent_name):
            send(False)
            return
        w = self._d.worker(worker_id)
        rec = self._record(job, w.identity if w is not None else worker_id)
        self.batches.put(job.agent_name, job.id, rec, then=send)

    def _record(self, job: Job, worker: str) -> str:
        """The record of `job`; `worker`: the identity of the worker it was
        assigned to ("" if none yet)."""
        return json.dumps(
            {
                "agent_name": job.agent_name,
                "room": job.room,
                "metadata": job.metadata,
                "attributes": job.attributes,
                "deadline": self._d.wall(job.deadline),
                "worker": worker,
            },
            separators=(",", ":"),
        )

    def recorded(self, job: Job) -> Awaitable[bool]:
        """Resolves True once `job`'s record is in the store (or it ended
        before it had to be), False if it will not be (refused, not ours,
        or it was never admitted here). Call right after `admitted`."""
        return self.batches.recorded(job.agent_name, job.id)

    # --------------------------------------------------------- job observer

    def job_placed(self, job: Job) -> None:
        carry = self._carry.get(job.agent_name)
        if carry:
            carry.pop(job.id, None)  # placed: a later end report is its worker's

    def job_ended(self, job: Job) -> None:
        carry = self._carry.get(job.agent_name)
        if carry:
            carry.pop(job.id, None)
        if self._node.epoch(job.agent_name):
            self.batches.delete(job.agent_name, job.id)

    # ------------------------------------------- ends during a take-over

    def _unknown_end(self, worker_id: str, job_id: str, status: JobState, error: str) -> None:
        w = self._d.worker(worker_id)
        if w is None or not self._node.epoch(w.agent_name) or w.agent_name not in self._carry:
            return
        pool = w.agent_name
        carry = self._carry[pool]
        if carry is None:
            early = self._early.setdefault(pool, {})
            if len(early) < EARLY_ENDS_MAX:
                early[job_id] = (worker_id, status, error)
            return
        if job_id in carry:
            self._end_carried(pool, carry, job_id, worker_id, status, error)

    def _end_carried(
        self,
        pool: str,
        carry: dict[str, str],
        job_id: str,
        worker_id: str,
        status: JobState,
        error: str,
    ) -> None:
        """`job_id`, a record being carried over, ended on `worker_id`: do
        not place it (or cancel its new request if not yet assigned)."""
        d = self._d
        raw = carry.pop(job_id)
        detail = f"{worker_id} reported it {status.value} during the take-over"
        live = d.live_job(job_id)
        if live is not None:
            if live.state in (JobState.QUEUED, JobState.OFFERED):
                d.annotate(job_id, "ended_in_take_over", detail)
                d.cancel(job_id, f"job ended on its worker during the take-over ({status.value})")
                self._adopted_end(pool, job_id, worker_id, status)
            return  # assigned or running here already: that worker's
        self.batches.delete(pool, job_id)
        d.record_ended(self._ended_job(pool, job_id, raw, worker_id, status, error, detail))
        self._adopted_end(pool, job_id, worker_id, status)

    def _adopted_end(self, pool: str, job_id: str, worker_id: str, status: JobState) -> None:
        self.ends_adopted += 1
        log.info(
            "job ended during take-over",
            extra={"pool": pool, "job_id": job_id, "worker_id": worker_id, "state": status.value},
        )

    def _ended_job(
        self,
        pool: str,
        job_id: str,
        raw: str,
        worker_id: str,
        status: JobState,
        error: str,
        detail: str,
    ) -> Job:
        """The ended job for the history, from its record (what it lacks, such
        as when it was created, is the time of the report)."""
        try:
            rec = json.loads(raw)
            attributes = rec.get("attributes")
            room, metadata = str(rec.get("room", "")), str(rec.get("metadata", ""))
        except (ValueError, TypeError, AttributeError):
            attributes, room, metadata = None, "", ""
        now = self._d.now()
        job = Job(
            job_id,
            pool,
            room,
            metadata,
            now,
            0.0,
            attributes={str(k): str(v) for k, v in attributes.items()}
            if isinstance(attributes, dict)
            else None,
        )
        job.state = status
        job.reason = (
            "job finished"
            if status is JobState.SUCCEEDED
            else error or "job failed (no error given)"
        )
        job.worker_id = worker_id
        job.ended_at = now
        job.trace = [TraceEvent(now, "ended_in_take_over", worker_id, detail)]
        return job

    # ------------------------------------------------------------ take-over

    def _gained(self, pool: str, epoch: int) -> None:
        self._carry[pool] = None
        self._early[pool] = {}
        self._spawn(self._take_over(pool, epoch), pool)

    async def _take_over(self, pool: str, epoch: int) -> None:
        node = self._node
        try:
            # Read at once: the previous owner can write nothing more (fenced),
            # and what we write ourselves is live here.
            records = await self._coord.records(pool)
        except ClusterUnavailable as exc:
            log.warning("take-over could not read jobs", extra={"pool": pool, "reason": str(exc)})
            if self._carry.get(pool, {}) is None:
                del self._carry[pool]
                self._early.pop(pool, None)
            return
        self._carry[pool] = records
        for job_id, (worker_id, status, error) in self._early.pop(pool, {}).items():
            if job_id in records:
                self._end_carried(pool, records, job_id, worker_id, status, error)
        # A record names the worker its job was assigned to ("" if none): such
        # a job is waited for (migrate or end report), never placed again. The
        # others are placed after the settle wait, which is only for workers
        # that may still migrate (their slots look free until then): with no
        # assigned record (nor one written before the field existed) at once.
        started = node.clock()
        assigned: dict[str, str] = {}
        unknown: list[str] = []
        for job_id, raw in records.items():
            worker = _worker_of(raw)
            if worker is None:
                unknown.append(job_id)
            elif worker:
                assigned[job_id] = worker
        if unknown or assigned:
            # Not a test's sleep: the previous owner's workers get up to this
            # long to reconnect and migrate what they run before anything is
            # placed again; over as soon as every such job is live or ended here.
            until = started + self.settle_s
            if await self._wait_for(pool, epoch, records, {*unknown, *assigned}, until):
                self.settled_early += 1
        if node.epoch(pool) != epoch:
            if self._carry.get(pool) is records:
                del self._carry[pool]
            return  # lost it again meanwhile
        requested: set[str] = set()
        try:
            await self._place_again(pool, records, requested, assigned)
            self.carried += len(requested)
            if requested:
                log.info(
                    "jobs carried over",
                    extra={"pool": pool, "jobs": len(requested), "epoch": epoch},
                )
            if assigned:
                await self._await_assigned(pool, epoch, records, assigned, started)
        finally:
            for job_id in [j for j in records if j not in requested]:
                del records[job_id]  # adopted, ended, unreadable: nothing to watch
            if not records and self._carry.get(pool) is records:
                del self._carry[pool]

    async def _wait_for(
        self, pool: str, epoch: int, records: dict[str, str], jobs: set[str], until: float
    ) -> bool:
        """Wait until each of `jobs` is live here or gone from `records` (its
        end reported), or `until`: True if that happened before `until`."""
        node = self._node
        d = self._d
        left = set(jobs)
        while node.epoch(pool) == epoch:
            left = {j for j in left if j in records and d.live_job(j) is None}
            if not left:
                return True
            if node.clock() >= until:
                return False
            await asyncio.sleep(min(SETTLE_POLL_S, max(0.0, until - node.clock())))
        return False

    async def _await_assigned(
        self,
        pool: str,
        epoch: int,
        records: dict[str, str],
        assigned: dict[str, str],
        started: float,
    ) -> None:
        """Records of jobs assigned at the old owner: wait for their worker's
        migrate (adopted) or end report up to the pool's `reconnect_grace_s`
        after the take-over `started`, as one process waits for a lost
        worker; then end them `worker_lost`."""
        d = self._d
        cfg = d.config.pools.get(pool)
        grace = (cfg if cfg is not None else d.config.defaults).reconnect_grace_s
        # Not a test's sleep: the lost worker's grace, as in one process.
        await self._wait_for(pool, epoch, records, set(assigned), started + grace)
        if self._node.epoch(pool) != epoch:
            return
        for job_id, worker in assigned.items():
            raw = records.get(job_id)
            if raw is None or d.live_job(job_id) is not None:
                continue  # adopted, or its end was reported
            del records[job_id]
            if await d.find_job(job_id) is not None:
                self.batches.delete(pool, job_id)
                continue  # it ended here
            why = f"worker {worker} did not migrate it within {grace:g} s of the take-over"
            self.batches.delete(pool, job_id)
            d.record_ended(
                self._ended_job(pool, job_id, raw, worker, JobState.WORKER_LOST, why, why)
            )
            self.lost += 1
            log.info(
                "assigned job lost in take-over",
                extra={"pool": pool, "job_id": job_id, "worker_id": worker},
            )

    async def _place_again(
        self, pool: str, records: dict[str, str], requested: set[str], assigned: dict[str, str]
    ) -> None:
        """Request again every record in `records` that is neither live nor
        ended here nor `assigned` (adding its id to `requested`)."""
        d = self._d
        for job_id, raw in sorted(records.items(), key=lambda kv: _deadline(kv[1])):
            if job_id in assigned:
                continue  # its worker migrates it or reports its end
            if job_id not in records:
                continue  # its worker reported its end meanwhile
            if d.live_job(job_id) is not None:
                continue  # adopted from a migrating worker, or ours already
            if await d.find_job(job_id) is not None:
                self.batches.delete(pool, job_id)
                continue  # it ended here
            if job_id not in records:
                continue  # its worker reported its end meanwhile
            try:
                rec = json.loads(raw)
                left_s = max(0.0, float(rec.get("deadline") or 0.0) - time.time())
                attributes = rec.get("attributes") or None
                d.request(
                    pool,
                    room=str(rec.get("room", "")),
                    metadata=str(rec.get("metadata", "")),
                    max_wait_s=left_s,
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
            requested.add(job_id)

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
        if exc is not None and not isinstance(exc, ClusterUnavailable):
            log.error("cluster job task failed", exc_info=exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        self.batches.cancel()
        if self._coord is not self._node.coordinator:
            await self._coord.close()


def _deadline(raw: str) -> float:
    try:
        return float(json.loads(raw).get("deadline") or 0.0)
    except (ValueError, TypeError, AttributeError):
        return 0.0


def _worker_of(raw: str) -> str | None:
    """The identity of the worker a record's job was assigned to ("" if
    none), None if the record does not say (written before it could)."""
    try:
        worker = json.loads(raw).get("worker")
    except (ValueError, TypeError, AttributeError):
        return None
    return worker if isinstance(worker, str) else None
