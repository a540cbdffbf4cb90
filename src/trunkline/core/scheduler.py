"""The dispatch scheduler: events and the time in, actions out.

Theory of operation
-------------------
Every input is a method call carrying `now` (seconds on any monotonic clock the
adapter chooses). The scheduler updates its tables and appends actions (send
an offer, send an assignment, wake a waiter) that the adapter drains with
`take_actions()`. Time-driven work (offer timeouts, queue deadlines, refusal
backoffs, reconnect grace) sits in a deadline queue: the adapter calls
`advance(now)` when `next_deadline()` passes. Nothing here reads a clock or
touches a socket, so every behaviour is testable with a fake clock and is
deterministic for a given event sequence.

Slot accounting (the capacity contract): a worker's used slots are its
unanswered offers plus its assigned, running and terminating jobs. An offer is
sent only to a worker whose used < capacity (`Pool.pick` only sees workers with
free slots), so no burst can overshoot: the reservation is taken when the offer
is sent, not when the worker reports load 2.5 s later.

Job state changes go through `_set_state`, which checks the transition table
and keeps the pool's `queued` and `active` counters, so counters cannot leak.

Bounds (`Limits`, and per pool `max_queued`): nothing a worker or a client
sends grows a table without limit. A new request finding its pool's queue (or
all queues together) full ends `no_capacity` at once with code `queue_full`;
a job's trace keeps at most `max_trace_events`; answers for jobs never offered
to that worker change nothing; a migrate brings back only the jobs its
identity lost, and adopts unknown ones (after a restart) only up to the
worker's capacity and the pool's quota; a pool made for an agent name nobody
configured is forgotten once it has no worker and no job (`PoolForgotten`),
and past the last `FORGOTTEN_KEPT` such names its counters are folded into
`FORGOTTEN_POOL`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Iterable

from trunkline.common.timers import TimerQueue
from trunkline.core import reasons
from trunkline.core.actions import (
    Action,
    JobEnded,
    JobRunning,
    PoolForgotten,
    SendAssignment,
    SendOffer,
    SendTermination,
    SlotHeld,
)
from trunkline.core.autoscale import Demand
from trunkline.core.config import Limits, PoolConfig
from trunkline.core.counters import Counters
from trunkline.core.demand import pool_demand
from trunkline.core.entities import (
    AcceptInfo,
    Job,
    TraceEvent,
    Worker,
    WorkerStatus,
    add_trace,
)
from trunkline.core.pool import Pool
from trunkline.core.states import JobState, check_transition

S = JobState

_new_event = tuple.__new__

_OFFER = "offer"
_DEADLINE = "deadline"
_COOLDOWN = "cooldown"
_GRACE = "grace"
_TERMINATE = "terminate"


class UnknownWorker(KeyError):
    """An event named a worker the scheduler does not know."""


class DuplicateJob(ValueError):
    """A job id that is already live was requested again."""


class Scheduler:
    """Owns pools, workers and live jobs; see the module docstring."""

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

    # ------------------------------------------------------------------- events

    def request(
        self,
        now: float,
        job_id: str,
        agent_name: str,
        *,
        room: str = "",
        metadata: str = "",
        max_wait_s: float | None = None,
        dispatch_id: str = "",
        attributes: dict[str, str] | None = None,
        hold: bool = False,
    ) -> Job:
        """A new session request. The job is offered at once, queued, or (when
        nothing can be had and `max_wait_s` is 0) ended `no_capacity` at once;
        the returned job's state says which. With `hold`, placing it reserves
        the slot without an offer (`SlotHeld`; the job stays OFFERED, traced
        `held`, with no offer timeout) until `bind` names its room."""
        if job_id in self.jobs:
            raise DuplicateJob(f"job {job_id} is already live")
        pool = self.pool(agent_name)
        wait = pool.config.queue_max_wait_s if max_wait_s is None else max(0.0, max_wait_s)
        job = Job(job_id, agent_name, room, metadata, now, wait, dispatch_id, attributes)
        job.held = hold
        self._file_job(job)
        self.requested[agent_name] += 1
        if pool.queued or not self._try_place(pool, job, now):
            full = reasons.queue_full(pool, self.queued_total, self.limits.max_queued)
            if full and now < job.deadline:
                job.code = "queue_full"
                self._end(job, S.NO_CAPACITY, full, now)
            else:
                self._enqueue(pool, job, now, front=False)
        return job

    def worker_joined(
        self,
        now: float,
        worker_id: str,
        agent_name: str,
        max_jobs: int | None = None,
        identity: str = "",
    ) -> Worker:
        """A worker registered. Its capacity is the smaller of what it declared
        and the pool's `max_jobs_per_worker` (either may be absent). `identity`
        is who the adapter says it is across reconnects: only a worker with the
        identity of the one that lost a job may migrate it back."""
        if worker_id in self.workers:
            raise ValueError(f"worker {worker_id} is already registered")
        pool = self.pool(agent_name)
        caps = [c for c in (max_jobs, pool.config.max_jobs_per_worker) if c is not None]
        w = Worker(worker_id, agent_name, min(caps) if caps else None, now, identity)
        self.workers[worker_id] = w
        pool.workers[worker_id] = w
        if pool.orphaned:
            # This may be a lost worker coming back: it will say which jobs it
            # still runs (MigrateJobRequest) right after registering. Offering
            # before that could overfill it, so it waits for its first migrate
            # or status report (or the backoff) before it gets offers.
            self._bench(pool, w, now)
        else:
            pool.refile(w)
            self._drain(pool, now)
        return w

    def worker_left(self, now: float, worker_id: str, why: str = "disconnected") -> None:
        """The worker's connection is gone. Its offers are re-placed at once;
        its jobs wait `reconnect_grace_s` for a migrate, then end
        `worker_lost` (or are re-dispatched when the pool says so)."""
        w = self.workers.pop(worker_id, None)
        if w is None:
            return
        pool = self.pools[w.agent_name]
        del pool.workers[worker_id]
        pool.groups.pop(worker_id, None)
        pool.unfile(w)
        cfg = pool.config
        for job in list(w.offers.values()):
            del w.offers[job.id]
            self._trace(job, now, "offer_withdrawn", w.id, f"worker {why}")
            self.offer_answers[(pool.name, "withdrawn")] += 1
            self._replace(pool, job, now)
        for job in list(w.jobs.values()):
            del w.jobs[job.id]
            if job.state is S.TERMINATING:
                self._end(job, S.CANCELLED, f"{job.reason}; worker {why} while terminating", now)
                continue
            self._set_state(job, S.ORPHANED)
            job.offer_seq += 1
            job.orphan_of = w.identity
            self._trace(job, now, "orphaned", w.id, f"worker {why}")
            if cfg.reconnect_grace_s > 0:
                self.timers.arm((_GRACE, job.id), now + cfg.reconnect_grace_s, job.offer_seq)
            else:
                self._grace_over(pool, job, now)
        self._drain(pool, now)
        self._forget_if_idle(pool)

    def worker_status(
        self,
        now: float,
        worker_id: str,
        *,
        available: bool,
        load: float = 0.0,
        draining: bool = False,
        job_count: int = 0,
    ) -> None:
        """A status report (`UpdateWorkerStatus`). It changes the worker's
        state, so a worker benched after a refusal may be offered again."""
        w = self._worker(worker_id)
        w.status = WorkerStatus.AVAILABLE if available else WorkerStatus.FULL
        w.load = load
        w.draining = w.draining or draining
        w.reported_jobs = job_count
        self._state_changed(w, now)

    def configure(
        self, now: float, pools: Iterable[PoolConfig], default: PoolConfig, limits: Limits
    ) -> None:
        """New settings (a config reload): every pool takes its new config (one
        no longer configured takes the new defaults), the limits change for
        what comes next. Workers keep the capacity they joined with; live jobs
        keep their deadlines; queued jobs are tried again."""
        self._default = default
        self.limits = limits
        self._trace_cap = max(4, limits.max_trace_events)
        configured = {p.agent_name: p for p in pools}
        for name, pool in self.pools.items():
            pool.config = configured.get(name) or dataclasses.replace(default, agent_name=name)
        for name, cfg in configured.items():
            if name not in self.pools:
                self.pools[name] = Pool(cfg)
                self.counters.revived(name)
        self._configured = frozenset(configured)
        for pool in list(self.pools.values()):
            for w in pool.workers.values():
                pool.refile(w)
            self._drain(pool, now)

    def set_worker_group(self, worker_id: str, group: str) -> None:
        """Tag a worker with its group (its replica's version) for routes and
        traces; "" removes the tag. Unknown workers are ignored."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        groups = self.pools[w.agent_name].groups
        if group:
            groups[worker_id] = group
        else:
            groups.pop(worker_id, None)

    def set_route(self, now: float, agent_name: str, group: str | None, share: float = 1.0) -> None:
        """New placements in the pool: `share` (0..1) of jobs prefer workers of
        `group`, the others the rest; None clears the preference
        (core/pool.py). Queued jobs are tried again under the new order."""
        pool = self.pool(agent_name)
        pool.route_group = group
        pool.route_share = min(1.0, max(0.0, share))
        self._drain(pool, now)

    def drain_worker(self, now: float, worker_id: str) -> None:
        """Stop offering to this worker; its running jobs are left alone."""
        w = self._worker(worker_id)
        w.draining = True
        self.pools[w.agent_name].refile(w)

    def answer(
        self,
        now: float,
        worker_id: str,
        job_id: str,
        *,
        available: bool,
        terminate: bool = False,
        accept: AcceptInfo | None = None,
    ) -> None:
        """The worker answered an offer (`AvailabilityResponse`)."""
        w = self._worker(worker_id)
        pool = self.pools[w.agent_name]
        w.strikes = 0
        if w.suspended:
            w.suspended = False
            pool.refile(w)
        job = w.offers.pop(job_id, None)
        if job is not None and job.held:
            w.offers[job_id] = job  # never offered: the worker cannot answer it
            job = None
        if job is None:
            # Withdrawn (timed out, cancelled) or never offered: a late accept
            # gets no assignment; the worker's own assignment timeout cleans up.
            self.offer_answers[(pool.name, "late")] += 1
            live = self.jobs.get(job_id)
            # Traced only if the job was once offered here (the worker refused
            # it or let it time out): an answer for a job never offered to
            # this worker grows nothing.
            if live is not None and live.refused is not None and w.id in live.refused:
                what = "accept" if available else "refusal"
                self._trace(live, now, "late_answer_ignored", w.id, what)
            # The answer may have lifted a suspension: let the queue at the worker.
            self._drain(pool, now)
            return
        if available:
            self.offer_answers[(pool.name, "accept")] += 1
            self._set_state(job, S.ASSIGNED)
            job.placed_at = now
            job.accept = accept
            w.jobs[job.id] = job
            self._trace(job, now, "accepted", w.id, None)
            group = pool.groups.get(w.id)
            if group:
                self._trace(job, now, "version", w.id, group)
            self._actions.append(SendAssignment(w.id, job))
            if w.capacity is None:
                # One offer at a time: answered, it frees the worker for the
                # next. (With a capacity, an offer became a job: same free slots.)
                pool.refile(w)
            self._drain(pool, now)
        elif terminate:
            self.offer_answers[(pool.name, "reject_terminate")] += 1
            self._trace(job, now, "rejected", w.id, "terminate=true")
            self._end(job, S.REJECTED, f"worker {w.id} rejected the job (terminate=true)", now)
            pool.refile(w)
            self._drain(pool, now)
        else:
            self.offer_answers[(pool.name, "reject")] += 1
            # Not noted as refused demand: the job is re-placed or queued, and
            # counted there (core/demand.py: each caller once).
            self._trace(job, now, "refused", w.id, "terminate=false")
            self._remember_refusal(job, w)
            self._bench(pool, w, now)
            self._replace(pool, job, now)

    def job_status(
        self, now: float, worker_id: str, job_id: str, status: JobState, error: str = ""
    ) -> None:
        """The worker reported a job's status (`UpdateJobStatus`): RUNNING,
        SUCCEEDED or FAILED. Reports for jobs not on this worker are ignored."""
        w = self.workers.get(worker_id)
        job = w.jobs.get(job_id) if w is not None else None
        if w is None or job is None:
            return
        if status is S.RUNNING:
            if job.state is S.ASSIGNED:
                self._set_state(job, S.RUNNING)
                job.running_at = now
                self._trace(job, now, "running", w.id, None)
                self._actions.append(JobRunning(job))
            return
        if status not in (S.SUCCEEDED, S.FAILED):
            raise ValueError(f"a worker cannot report {status.value}")
        del w.jobs[job_id]
        if job.state is S.TERMINATING:
            self._end(job, S.CANCELLED, job.reason, now)
        elif status is S.SUCCEEDED:
            self._end(job, S.SUCCEEDED, "job finished", now)
        else:
            self._end(job, S.FAILED, error or "job failed (no error given)", now)
        self._state_changed(w, now)

    def migrate(
        self, now: float, worker_id: str, job_ids: Iterable[str], ended: Container[str] = ()
    ) -> None:
        """A reconnected worker says these jobs still run on it.

        An orphaned job of its pool is re-attached only if this worker has the
        identity of the worker that lost it (`worker_joined(identity=)`): a
        worker cannot take over another's lost job while that one may still
        come back. A job this scheduler has no record of (the server
        restarted) is adopted as running on the worker, so its slot is counted
        and its end recorded instead of a live call being cut, while the pool
        is under its quota. Either way only while the worker holds fewer jobs
        than its capacity (`Limits.max_worker_jobs` when unknown). Every other
        id (a job the adapter knows has `ended`, one live elsewhere or
        another's orphan, one over those limits) gets a termination: it must
        not run twice, nor run uncounted. A job brought back or adopted
        withdraws one of the worker's unanswered offers if it would otherwise
        overfill it."""
        w = self._worker(worker_id)
        pool = self.pools[w.agent_name]
        budget = w.capacity if w.capacity is not None else self.limits.max_worker_jobs
        for job_id in dict.fromkeys(job_ids):
            job = self.jobs.get(job_id)
            if job is not None and w.jobs.get(job_id) is job:
                continue
            if job is not None and job.state is S.ORPHANED and job.agent_name == w.agent_name:
                if job.orphan_of != w.identity:
                    self._trace(job, now, "migrate_refused", w.id, "lost by another worker")
                elif len(w.jobs) >= budget:
                    self._trace(job, now, "migrate_refused", w.id, "worker is at its capacity")
                else:
                    self._make_room(pool, w, now)
                    self._set_state(job, S.RUNNING)
                    job.worker_id = w.id
                    job.orphan_of = None
                    w.jobs[job_id] = job
                    self._trace(job, now, "migrated", w.id, None)
                    continue
            elif job is None and job_id not in ended:
                if len(w.jobs) < budget and not pool.quota_full():
                    self._make_room(pool, w, now)
                    self._adopt(now, w, job_id)
                    continue
            elif job is not None:
                self._trace(job, now, "duplicate_terminated", w.id, "job lives elsewhere")
            self._actions.append(SendTermination(w.id, job_id))
        # The worker has told us what it runs: lift the join bench, re-file it
        # with its real used slots, and let the queue at it.
        self._state_changed(w, now)

    def _make_room(self, pool: Pool, w: Worker, now: float) -> None:
        """A job the worker already runs is coming back onto it: if that would
        overfill it, withdraw its newest unanswered offer (a job really running
        comes before one merely offered) and re-place that job."""
        if w.capacity is None or w.used < w.capacity or not w.offers:
            return
        job = w.offers.pop(next(reversed(w.offers)))
        self._trace(job, now, "offer_withdrawn", w.id, "worker migrated its running jobs")
        self.offer_answers[(pool.name, "withdrawn")] += 1
        self._replace(pool, job, now)

    def _adopt(self, now: float, w: Worker, job_id: str) -> None:
        job = Job(job_id, w.agent_name, "", "", now, 0.0)
        self._file_job(job)
        self.requested[w.agent_name] += 1
        # Through the legal states, so every counter stays right.
        self._set_state(job, S.OFFERED)
        self._set_state(job, S.ASSIGNED)
        self._set_state(job, S.RUNNING)
        job.worker_id = w.id
        job.placed_at = job.running_at = now
        w.jobs[job_id] = job
        detail = "worker reported it running; this server had no record of it (restart?)"
        self._trace(job, now, "adopted", w.id, detail)

    def cancel(self, now: float, job_id: str, reason: str = "terminated by request") -> bool:
        """End a job on request. A placed job is asked to terminate and keeps
        its slot until the worker confirms. Returns False if no such live job."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        pool = self.pools[job.agent_name]
        if job.state is S.OFFERED:
            w = self.workers[job.worker_id or ""]
            del w.offers[job.id]
            self.offer_answers[(pool.name, "withdrawn")] += 1
            self._end(job, S.CANCELLED, reason, now)
            pool.refile(w)
            self._drain(pool, now)
        elif job.state in (S.ASSIGNED, S.RUNNING):
            self._set_state(job, S.TERMINATING)
            job.reason = reason
            self._trace(job, now, "terminating", job.worker_id, reason)
            self._actions.append(SendTermination(job.worker_id or "", job.id))
            limit = pool.config.terminate_timeout_s
            self.timers.arm((_TERMINATE, job.id), now + limit, job.offer_seq)
        elif job.state in (S.QUEUED, S.ORPHANED):
            self._end(job, S.CANCELLED, reason, now)
            self._drain(pool, now)
        return True

    def worker_gone(self, now: float, worker_id: str, why: str = "worker process exited") -> None:
        """The worker's process is known to be gone for good (the autoscaler saw
        its replica exit): it cannot reconnect and migrate, so its jobs skip the
        reconnect grace and end `worker_lost` now (or are re-dispatched when the
        pool says so)."""
        if worker_id in self.workers:
            self.worker_left(now, worker_id, why)
        lost = [j for j in self.jobs.values() if j.state is S.ORPHANED and j.worker_id == worker_id]
        for job in lost:
            self._grace_over(
                self.pools[job.agent_name], job, now, f"worker {worker_id} is gone: {why}"
            )

    def bind(self, now: float, job_id: str, room: str, detail: str | None = None) -> bool:
        """A held job's room is known: it moves to `room` and is offered now on
        the slot it holds (or, if it is queued again because its worker left,
        when a slot frees), under the usual offer timeout. False (nothing
        changes) if the job is not live or not held."""
        job = self.jobs.get(job_id)
        if job is None or not job.held:
            return False
        job.held = False
        if room and room != job.room:
            in_room = self.by_room.get(job.room)
            if in_room is not None:
                in_room.pop(job.id, None)
                if not in_room:
                    del self.by_room[job.room]
            job.room = room
            self.by_room.setdefault(room, {})[job.id] = job
        self._trace(job, now, "bound", job.worker_id, detail or room)
        if job.state is S.OFFERED and job.worker_id is not None:
            timeout = self.pools[job.agent_name].config.availability_timeout_s
            self.timers.arm((_OFFER, job.id), now + timeout, job.offer_seq)
            job.offered_at = now
            self._trace(job, now, "offered", job.worker_id, None)
            self._actions.append(SendOffer(job.worker_id, job))
        return True

    def annotate(self, now: float, job_id: str, event: str, detail: str | None = None) -> bool:
        """Add an adapter's event (e.g. the SIP outcome) to a live job's trace."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        self._trace(job, now, event, job.worker_id, detail)
        return True

    def advance(self, now: float) -> None:
        """Run every timer due at `now`."""
        while (due := self.timers.pop(now)) is not None:
            (kind, key), token = due
            if kind == _OFFER:
                self._offer_timeout(key, token, now)
            elif kind == _DEADLINE:
                self._deadline(key, now)
            elif kind == _COOLDOWN:
                w = self.workers.get(key)
                if w is not None and w.cooldown_until is not None and w.version == token:
                    self._state_changed(w, now)
            elif kind == _GRACE:
                job = self.jobs.get(key)
                if job is not None and job.state is S.ORPHANED and job.offer_seq == token:
                    self._grace_over(self.pools[job.agent_name], job, now)
            elif kind == _TERMINATE:
                self._terminate_timeout(key, token, now)

    def _terminate_timeout(self, job_id: str, token: int, now: float) -> None:
        """The worker never confirmed a termination: end the job `cancelled` and
        free its slot, treating the worker as lost for that job (a JS_SUCCESS
        arriving later is ignored; if the job does still run there, that worker
        is one slot fuller than counted until it ends)."""
        job = self.jobs.get(job_id)
        if job is None or job.state is not S.TERMINATING or job.offer_seq != token:
            return
        w = self.workers.get(job.worker_id or "")
        limit = self.pools[job.agent_name].config.terminate_timeout_s
        why = f"worker did not confirm the termination within {limit:g} s; its slot is freed"
        self._trace(job, now, "terminate_timeout", job.worker_id, why)
        if w is not None:
            del w.jobs[job_id]
        self._end(job, S.CANCELLED, f"{job.reason}; {why}", now)
        if w is not None:
            # A freed slot, not a change of the worker's state (rule 3): a
            # bench it is on stays.
            pool = self.pools[w.agent_name]
            pool.refile(w)
            self._drain(pool, now)

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
        self.timers.arm((_COOLDOWN, w.id), w.cooldown_until, w.version)
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
        self.timers.arm((_OFFER, job.id), now + pool.config.availability_timeout_s, job.offer_seq)
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
        self.timers.arm((_DEADLINE, job.id), job.deadline)
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
