"""The scheduler's tables and the moves every event is made of.

`Ledger` holds what `Scheduler` (core/scheduler.py) owns: pools, workers,
live jobs with their indexes, the deadline queue, the counters and the
actions produced so far; and the moves its events are built from: filing a
job, changing its state (`_set_state`, the one place the pools' `queued`,
`active` and `orphaned` counters change, so they cannot leak), tracing it
(capped at `max_trace_events`), offering it (`_offer` reserves the slot at
once), queueing and draining, re-placing a job that lost its offer, benching
a worker after a refusal, a timed-out offer or a passed deadline, and ending
a job exactly once (`_end`). Every move takes `now`; nothing here reads a
clock. The events themselves (what a worker or a caller did) are the
`Scheduler`'s methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from trunkline.common.timers import TimerQueue
from trunkline.core import reasons
from trunkline.core.actions import Action, JobEnded, PoolForgotten, SendOffer, SlotHeld
from trunkline.core.autoscale import Demand
from trunkline.core.config import Limits, PoolConfig
from trunkline.core.counters import Counters
from trunkline.core.demand import pool_demand
from trunkline.core.entities import Job, TraceEvent, Worker, add_trace
from trunkline.core.pool import Pool
from trunkline.core.states import JobState, check_transition

S = JobState

_new_event = tuple.__new__

# Timer kinds (tokened entries keyed (kind, id); `Scheduler.advance` runs them).
OFFER = "offer"
DEADLINE = "deadline"
COOLDOWN = "cooldown"
GRACE = "grace"
TERMINATE = "terminate"


class UnknownWorker(KeyError):
    """An event named a worker the scheduler does not know."""


class Ledger:
    """The scheduler's tables and moves; see the module docstring."""

    def __init__(
        self,
        pools: Iterable[PoolConfig] = (),
        default: PoolConfig | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._default = default or PoolConfig(agent_name="")
        self.limits = limits or Limits()
        self._trace_cap = max(4, self.limits.max_trace_events)
        self.pools: dict[str, Pool] = {p.agent_name: Pool(p) for p in pools}
        self._configured = frozenset(self.pools)
        self.queued_total = 0  # sum of every pool's `queued`
        self.workers: dict[str, Worker] = {}
        self.jobs: dict[str, Job] = {}  # live jobs only; ended jobs leave via JobEnded
        # Indexes of live jobs for the dispatcher's queries (kept in step with
        # `jobs` by `_file_job` and `_end`).
        self.by_dispatch: dict[str, Job] = {}
        self.by_room: dict[str, dict[str, Job]] = {}
        # Tokened entries keyed (kind, id): handlers drop stale ones by token.
        self.timers: TimerQueue[tuple[str, str]] = TimerQueue()
        self._actions: list[Action] = []
        # Counters for metrics, keyed by agent name (and a label).
        self.counters = Counters()
        self.ended = self.counters.ended
        self.offer_answers = self.counters.offer_answers
        self.requested = self.counters.requested

    # ------------------------------------------------------------------ outputs

    def take_actions(self) -> list[Action]:
        """Return and clear the actions produced since the last call, in order."""
        actions = self._actions
        self._actions = []
        return actions

    def next_deadline(self) -> float | None:
        """When `advance` next has work to do (None: no timer pending)."""
        return self.timers.next_deadline()

    def demand(self, now: float, agent_name: str, refused_window_s: float) -> Demand:
        """The pool's demand for the autoscaler (core/demand.py); an unknown
        pool has none (and is not created by asking)."""
        return pool_demand(self.pools.get(agent_name), now, refused_window_s)

    def pool(self, agent_name: str) -> Pool:
        """The pool for an agent name, created with default settings if new."""
        pool = self.pools.get(agent_name)
        if pool is None:
            pool = Pool(dataclasses.replace(self._default, agent_name=agent_name))
            self.pools[agent_name] = pool
            self.counters.revived(agent_name)
        return pool

    # ---------------------------------------------------------------- internals

    def _worker(self, worker_id: str) -> Worker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise UnknownWorker(worker_id) from None

    def _file_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        if job.dispatch_id:
            self.by_dispatch[job.dispatch_id] = job
        self.by_room.setdefault(job.room, {})[job.id] = job

    def _set_state(self, job: Job, new: JobState) -> None:
        old = job.state
        if new not in old.allowed:
            check_transition(job.id, old, new)  # raises IllegalTransition
        pool = self.pools[job.agent_name]
        if old is S.QUEUED and job.queued_since is not None:
            pool.queued -= 1
            self.queued_total -= 1
        if old.active is not new.active:
            pool.active += 1 if new.active else -1
        if old is S.ORPHANED:
            pool.orphaned -= 1
        elif new is S.ORPHANED:
            pool.orphaned += 1
        job.state = new

    def _trace(
        self, job: Job, now: float, event: str, worker_id: str | None, detail: str | None
    ) -> None:
        trace = job.trace
        if len(trace) < self._trace_cap:
            # `tuple.__new__` skips the named tuple's generated `__new__`, a
            # Python call (five traced events per job).
            trace.append(_new_event(TraceEvent, (now, event, worker_id, detail)))
        else:
            add_trace(job, TraceEvent(now, event, worker_id, detail), self._trace_cap)

    @staticmethod
    def _remember_refusal(job: Job, w: Worker) -> None:
        if job.refused is None:
            job.refused = {}
        job.refused[w.id] = w.version

    def _bench(self, pool: Pool, w: Worker, now: float) -> None:
        """No offers to `w` until its state changes or the backoff passes: a
        LiveKit worker's load guard refuses with the same answer an application
        does, and a silent worker may be stuck. Because every way off the bench
        bumps the worker's version, an offerable worker never has a refusal
        recorded at its current version: refusals order placement, they never
        block the queue."""
        w.cooldown_until = now + pool.config.refusal_backoff_s
        self.timers.arm((COOLDOWN, w.id), w.cooldown_until, w.version)
        pool.refile(w)

    def _state_changed(self, w: Worker, now: float) -> None:
        """Something about the worker changed: lift a refusal bench, re-file it,
        and let the queue at it."""
        w.version += 1
        w.cooldown_until = None
        pool = self.pools[w.agent_name]
        pool.refile(w)
        self._drain(pool, now)

    def _try_place(self, pool: Pool, job: Job, now: float) -> bool:
        if pool.quota_full():
            return False
        w = pool.pick(job)
        if w is None:
            return False
        self._offer(pool, job, w, now)
        return True

    def _offer(self, pool: Pool, job: Job, w: Worker, now: float) -> None:
        if job.queued_since is not None:
            job.queue_wait_s += now - job.queued_since
        self._set_state(job, S.OFFERED)
        job.queued_since = None
        job.worker_id = w.id
        job.offer_seq += 1
        job.offered_at = now
        w.offers[job.id] = job
        pool.refile(w)
        if job.held:
            # The slot is taken, but the worker hears nothing yet: a
            # livekit-agents worker runs a job in the room its offer names.
            self._trace(job, now, "held", w.id, None)
            self._actions.append(SlotHeld(w.id, job))
            return
        self.timers.arm((OFFER, job.id), now + pool.config.availability_timeout_s, job.offer_seq)
        self._trace(job, now, "offered", w.id, None)
        self._actions.append(SendOffer(w.id, job))

    def _enqueue(self, pool: Pool, job: Job, now: float, *, front: bool) -> None:
        if job.state is not S.QUEUED:
            self._set_state(job, S.QUEUED)
        job.worker_id = None
        if now >= job.deadline:
            self._end(job, S.NO_CAPACITY, reasons.no_capacity(pool, job, now), now)
            return
        job.queued_since = now
        pool.queued += 1
        self.queued_total += 1
        if front:
            pool.queue.appendleft(job)
        else:
            pool.queue.append(job)
        self.timers.arm((DEADLINE, job.id), job.deadline)
        why = "pool quota reached" if pool.quota_full() else "no worker with a free slot"
        self._trace(job, now, "queued", None, why)

    def _replace(self, pool: Pool, job: Job, now: float) -> None:
        """Put a job that lost its offer back in play: another worker now, else
        the front of the queue (it has waited longest)."""
        self._set_state(job, S.QUEUED)
        job.worker_id = None
        if not self._try_place(pool, job, now):
            self._enqueue(pool, job, now, front=True)

    def _drain(self, pool: Pool, now: float) -> None:
        """Offer queued jobs, oldest first, while a worker can take them."""
        queue = pool.queue
        while queue:
            head = queue[0]
            if head.state is not S.QUEUED or head.queued_since is None:
                queue.popleft()  # stale: ended or offered since it was queued
                continue
            if pool.quota_full():
                return
            w = pool.pick(head)
            if w is None:
                return
            queue.popleft()
            self._offer(pool, head, w, now)

    def _offer_timeout(self, job_id: str, seq: int, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is not S.OFFERED or job.offer_seq != seq:
            return
        w = self.workers[job.worker_id or ""]
        pool = self.pools[w.agent_name]
        del w.offers[job.id]
        w.strikes += 1
        if w.strikes >= pool.config.max_strikes:
            w.suspended = True
        self.offer_answers[(pool.name, "timeout")] += 1
        timeout = pool.config.availability_timeout_s
        self._trace(job, now, "offer_timeout", w.id, f"no answer in {timeout:g} s")
        self._remember_refusal(job, w)
        self._bench(pool, w, now)
        self._replace(pool, job, now)

    def _deadline(self, job_id: str, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is not S.QUEUED or job.queued_since is None:
            return
        if now < job.deadline:
            return
        pool = self.pools[job.agent_name]
        self._end(job, S.NO_CAPACITY, reasons.no_capacity(pool, job, now), now)

    def _grace_over(self, pool: Pool, job: Job, now: float, why: str = "") -> None:
        """The job's worker is not coming back (`why`; default: the reconnect
        grace passed): re-dispatch it or end it `worker_lost`."""
        why = why or f"worker did not reconnect within {pool.config.reconnect_grace_s:g} s"
        if pool.config.redispatch_on_worker_loss:
            self._trace(job, now, "redispatched", None, why)
            job.deadline = now + job.max_wait_s
            # Refusals are kept: semantics 3 sends the job to workers that have not
            # refused it first, re-dispatch or not (they only order, never block).
            self._replace(pool, job, now)
        else:
            self._end(job, S.WORKER_LOST, why, now)
            self._drain(pool, now)

    def _end(self, job: Job, state: JobState, reason: str, now: float) -> None:
        if job.queued_since is not None:
            job.queue_wait_s += now - job.queued_since
        self._set_state(job, state)
        job.queued_since = None
        job.reason = reason
        job.ended_at = now
        outcome = state.value
        self._trace(job, now, outcome, job.worker_id, reason)
        del self.jobs[job.id]
        if job.dispatch_id and self.by_dispatch.get(job.dispatch_id) is job:
            del self.by_dispatch[job.dispatch_id]
        in_room = self.by_room.get(job.room)
        if in_room is not None:
            in_room.pop(job.id, None)
            if not in_room:
                del self.by_room[job.room]
        self.ended[(job.agent_name, outcome)] += 1
        pool = self.pools[job.agent_name]
        if state is S.NO_CAPACITY:
            pool.note_refusal(now)
        self._actions.append(JobEnded(job))
        if not pool.active and not pool.workers:
            self._forget_if_idle(pool)

    def _forget_if_idle(self, pool: Pool) -> None:
        """Drop a pool nobody configured once it has no worker and no live job,
        so agent names made up by clients do not pile up: the adapter is told
        (`PoolForgotten`) to drop what it keeps per pool, and the counters go
        to `FORGOTTEN_POOL` once the name is not among the last few forgotten
        (core/counters.py)."""
        name = pool.name
        if pool.workers or pool.active or pool.queued or name in self._configured:
            return
        if self.pools.get(name) is not pool:
            return
        del self.pools[name]
        self.counters.forgotten(name)
        self._actions.append(PoolForgotten(name))
