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

The tables and the moves every event is made of (`_set_state`, which checks
the transition table and keeps the pool's `queued` and `active` counters, so
counters cannot leak; `_offer`, `_enqueue`, `_drain`, `_end`, ...) are
`Ledger`'s (core/ledger.py); this module holds the events.

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

from trunkline.core import reasons
from trunkline.core.actions import JobRunning, SendAssignment, SendOffer, SendTermination
from trunkline.core.config import Limits, PoolConfig
from trunkline.core.entities import AcceptInfo, Job, Worker, WorkerStatus
from trunkline.core.ledger import (
    COOLDOWN,
    DEADLINE,
    GRACE,
    OFFER,
    TERMINATE,
    Ledger,
    UnknownWorker,
)
from trunkline.core.pool import Pool
from trunkline.core.states import JobState

__all__ = ["DuplicateJob", "Scheduler", "UnknownWorker"]

S = JobState


class DuplicateJob(ValueError):
    """A job id that is already live was requested again."""


class Scheduler(Ledger):
    """Owns pools, workers and live jobs (their tables and the moves events are
    made of are `Ledger`'s, core/ledger.py); see the module docstring."""

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
                self.timers.arm((GRACE, job.id), now + cfg.reconnect_grace_s, job.offer_seq)
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
            self.timers.arm((TERMINATE, job.id), now + limit, job.offer_seq)
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
            self.timers.arm((OFFER, job.id), now + timeout, job.offer_seq)
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
            if kind == OFFER:
                self._offer_timeout(key, token, now)
            elif kind == DEADLINE:
                self._deadline(key, now)
            elif kind == COOLDOWN:
                w = self.workers.get(key)
                if w is not None and w.cooldown_until is not None and w.version == token:
                    self._state_changed(w, now)
            elif kind == GRACE:
                job = self.jobs.get(key)
                if job is not None and job.state is S.ORPHANED and job.offer_seq == token:
                    self._grace_over(self.pools[job.agent_name], job, now)
            elif kind == TERMINATE:
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
