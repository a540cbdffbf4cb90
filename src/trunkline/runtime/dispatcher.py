"""The Dispatcher: the one spine between the adapters and the core scheduler.

Theory of operation
-------------------
Adapters (the `/agent` endpoint, REST, Twirp, SIP admission, the dashboard,
the autoscaler) feed the Dispatcher named commands (`request`, `cancel`,
`worker_connected`, `offer_answered`, ...) and read through queries (`job`,
`live_jobs`, `pools`, `workers`, `demand`, ...). Each command calls one
scheduler event with `now` and then carries out the actions it produced, in
order: frames go to the worker's link (`WorkerLink.send`, which must not
block), waiting callers are woken, ended jobs become immutable `JobRecord`s
handed to the history writer, metrics are observed, observers are told. One
asyncio timer is kept armed at the scheduler's next deadline.

The scheduler, the history and the worker links are private: nothing else
touches them, so a second server, a new store or a new intake changes the
Dispatcher only. This module holds its commands and how they are carried
out; its queries (`DispatcherQueries`, which it inherits) are in
runtime/dispatch_queries.py, its commands for the LiveKit bridge's jobs
(`BridgeCommands`, inherited too) in runtime/dispatch_bridge.py, and the
protocols its adapters implement, with the frames and ids it makes, in
runtime/dispatch_ports.py (re-exported here).
Queries hand out the core's records (`Job`, `Worker`, `Pool`) for reading
only; changing one outside a command is a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from livekit.protocol import agent

from trunkline.config import Config
from trunkline.core import (
    TERMINAL,
    AcceptInfo,
    Job,
    JobEnded,
    JobRunning,
    JobState,
    Limits,
    Scheduler,
    SendAssignment,
    SendOffer,
    SendTermination,
    Worker,
)
from trunkline.core.actions import SlotHeld
from trunkline.runtime.dispatch_bridge import BridgeCommands
from trunkline.runtime.dispatch_ports import (
    Bridged,
    BridgeLink,
    Fence,
    JobObserver,
    WorkerLink,
    WorkerObserver,
    assignment_frame,
    job_proto,
    new_id,
    notify,
    offer_frame,
    request_ids,
)
from trunkline.runtime.dispatch_queries import DispatcherQueries, not_started
from trunkline.runtime.history import HistoryCollector, HistoryWriter
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.retention import Retention
from trunkline.stores import HistoryStore, JobRecord, MemoryHistory, SipCallRecord

__all__ = [
    "BridgeLink",
    "Dispatcher",
    "Fence",
    "JobObserver",
    "WorkerLink",
    "WorkerObserver",
    "job_proto",
    "new_id",
]

log = logging.getLogger("trunkline.dispatch")

# Timers fire up to this much late so bursts of deadlines share one wake-up.
_TIMER_SLACK_S = 0.001
# Ended job ids remembered for migrate checks (a reconnecting worker must not
# get back a job that already ended here).
_RECENT_ENDED = 10_000


class Dispatcher(DispatcherQueries, BridgeCommands):
    """See the module docstring. Call `start(loop)` before any command and
    `close()` / `aclose()` at shutdown."""

    def __init__(
        self, config: Config, metrics: Metrics, history: HistoryStore | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        srv = config.server
        limits = Limits(
            max_worker_jobs=srv.max_worker_jobs,
            max_trace_events=srv.max_trace_events,
            max_queued=srv.max_queued,
        )
        self._sched = Scheduler(config.pools.values(), config.defaults, limits)
        self._store: HistoryStore = (
            history if history is not None else MemoryHistory(config.server.history_size)
        )
        self._writer = HistoryWriter(self._store)
        self._retention = Retention(
            self._store,
            retention_days=config.store.retention_days,
            max_records=config.store.max_records,
        )
        self._links: dict[str, WorkerLink] = {}
        self._recent_ended: OrderedDict[str, None] = OrderedDict()
        self._bridged: dict[str, Bridged] = {}
        self._claims: list[Callable[[agent.Job], str | None]] = []
        self._sip: dict[str, SipCallRecord] = {}  # live jobs of SIP calls
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_armed = -1  # the scheduler's `timers.armed` when `_timer` was checked
        self._clock = not_started
        self._wall_offset = time.time() - time.monotonic()
        self.closing = False
        self._job_observers: list[JobObserver] = []
        self._worker_observers: list[WorkerObserver] = []
        self._flush_listeners: list[Callable[[], None]] = []
        self._fence: Fence | None = None  # None: single process, every pool is ours
        self._adopter: Callable[[Job], BridgeLink | None] | None = None
        self._unknown_end: Callable[[str, str, JobState, str], None] | None = None
        self.fenced = 0  # frames not sent because this server did not own their pool
        metrics.bind(self)
        metrics.registry.register(HistoryCollector(self.history_status))

    # ------------------------------------------------------------- lifecycle

    async def open_history(self) -> None:
        """Open the history store (at server start, before `start`). Raises
        `StoreError` naming the store and the fix if it cannot be used; a
        store that fails later only degrades the history (`history_status`)."""
        await self._writer.open()
        where = getattr(self._store, "describe", None)
        log.info(
            "job history open",
            extra={"store": where() if callable(where) else type(self._store).__name__},
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clock = loop.time
        self._wall_offset = time.time() - loop.time()
        self._writer.start(loop)
        self._retention.start(loop)

    def close(self) -> None:
        """Stop the timer and cancel every waiter (new commands still work but
        no timer is armed again)."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    async def close_links(self, message: bytes) -> None:
        """Close every worker connection (server shutdown)."""
        for link in list(self._links.values()):
            await link.close(message)

    async def close_pool_links(self, pool: str, message: bytes) -> int:
        """Close the connections of `pool`'s workers (cluster mode: this
        member lost the pool; they reconnect and reach its owner). Returns
        how many were closed."""
        closing = [
            link
            for wid, link in list(self._links.items())
            if (w := self._sched.workers.get(wid)) is not None and w.agent_name == pool
        ]
        for link in closing:
            await link.close(message)
        return len(closing)

    async def aclose(self) -> None:
        """Write out the history and close the store."""
        await self._retention.aclose()
        await self._writer.aclose()
        await self._store.close()

    # ------------------------------------------------------------- observers

    def set_fence(self, fence: Fence | None) -> None:
        """Cluster mode: act for a pool only while `fence.may_act(pool)`."""
        self._fence = fence

    def set_unknown_end_hook(self, hook: Callable[[str, str, JobState, str], None] | None) -> None:
        """Cluster mode: `hook(worker_id, job_id, status, error)` sees each final
        status (succeeded, failed) a worker reports for a job it does not hold
        here (e.g. one that ended while the worker reconnected to a new owner),
        before the scheduler ignores the report."""
        self._unknown_end = hook

    def record_ended(self, job: Job) -> None:
        """Write `job`, ended but never live in this scheduler (the cluster
        layer's record of a job that ended on its worker during a take-over),
        to the history, as a job ended here would be. Raises `ValueError` for
        a job that has not ended or that is live here."""
        if job.state not in TERMINAL or job.ended_at is None:
            raise ValueError(f"job {job.id} has not ended ({job.state.value})")
        if job.id in self._sched.jobs:
            raise ValueError(f"job {job.id} is live here: end it through the scheduler")
        self._remember_ended(job.id)
        self._writer.put(JobRecord.from_job(job, self._wall_offset))

    def add_job_observer(self, obs: JobObserver) -> None:
        self._job_observers.append(obs)

    def add_worker_observer(self, obs: WorkerObserver) -> None:
        self._worker_observers.append(obs)

    def remove_worker_observer(self, obs: WorkerObserver) -> None:
        if obs in self._worker_observers:
            self._worker_observers.remove(obs)

    def add_flush_listener(self, fn: Callable[[], None]) -> None:
        """`fn` is called after every command has been carried out (the
        autoscaler re-reads demand, coalesced)."""
        self._flush_listeners.append(fn)

    def remove_flush_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._flush_listeners:
            self._flush_listeners.remove(fn)

    # ------------------------------------------------------ commands: jobs

    def request(
        self,
        agent_name: str,
        *,
        room: str = "",
        metadata: str = "",
        max_wait_s: float | None = None,
        attributes: dict[str, str] | None = None,
        job_id: str = "",
        sip: SipCallRecord | None = None,
        hold: bool = False,
    ) -> Job:
        """A new session request, with fresh job and dispatch ids (`job_id` when
        the caller must know it before the job can be placed) and a room of its
        own when none is named. The returned job is offered, queued or ended.
        `sip` names the SIP call it serves: kept on its snapshots and record
        (`sip_final` adds the final response sent). With `hold` its slot is
        held without an offer (observers hear `job_placed` with `job.held`)
        until `bind_held` names its room."""
        if self._fence is not None and not self._fence.may_act(agent_name):
            raise self._fence.refusal(agent_name)
        job_id, room, dispatch_id = request_ids(job_id, room)
        if sip is not None:
            self._sip[job_id] = sip  # before: the job may end inside request()
        try:
            job = self._sched.request(
                self.now(),
                job_id,
                agent_name,
                room=room,
                metadata=metadata,
                max_wait_s=max_wait_s,
                dispatch_id=dispatch_id,
                attributes=attributes,
                hold=hold,
            )
        except Exception:
            if sip is not None and self._sched.jobs.get(job_id) is None:
                self._sip.pop(job_id, None)
            raise
        self.flush()
        if self._fence is not None:
            self._fence.admitted(job)
        return job

    def bind_held(self, job_id: str, room: str, detail: str | None = None) -> bool:
        """A held job's room is known: offer it there on the slot it holds
        (`Scheduler.bind`). False if it is not live or not held."""
        done = self._sched.bind(self.now(), job_id, room, detail)
        self.flush()
        return done

    def cancel(self, job_id: str, reason: str) -> bool:
        """End a live job (a placed one is asked to terminate and keeps its slot
        until the worker confirms). False if no such live job."""
        done = self._sched.cancel(self.now(), job_id, reason)
        self.flush()
        return done

    def cancel_dispatch(self, dispatch_id: str, room: str = "", reason: str = "") -> Job | None:
        """Cancel the live job of a dispatch (in `room`, when given); None if
        there is none."""
        job = self._sched.by_dispatch.get(dispatch_id)
        if job is None or (room and job.room != room):
            return None
        self.cancel(job.id, reason or "dispatch deleted")
        return job

    def sip_final(self, job_id: str, status: int) -> bool:
        """The SIP edge sent `status` as the final response to the call of
        `job_id`: it goes on the job's record (the job may be ending: observers
        told `job_ended` may still call this). False if the job is not a
        live SIP call."""
        sip = self._sip.get(job_id)
        if sip is None:
            return False
        self._sip[job_id] = dataclasses.replace(sip, final_status=status)
        return True

    def annotate(self, job_id: str, event: str, detail: str | None = None) -> bool:
        """Add an adapter's event (e.g. the SIP outcome) to a live job's trace."""
        return self._sched.annotate(self.now(), job_id, event, detail)

    # --------------------------------------------------- commands: workers

    def worker_connected(
        self,
        link: WorkerLink,
        worker_id: str,
        agent_name: str,
        max_jobs: int | None,
        token: str = "",
        identity: str = "",
    ) -> Worker:
        """A worker registered on `link`; observers hear `worker_registered`.
        `identity` says who it is across reconnects (a new connection gets a
        new worker id): only the identity that lost an orphaned job may
        migrate it back (docs/semantics.md, rule 7)."""
        self._links[worker_id] = link
        w = self._sched.worker_joined(self.now(), worker_id, agent_name, max_jobs, identity)
        self.flush()
        for obs in list(self._worker_observers):
            notify(obs.worker_registered, worker_id, agent_name, token)
        return w

    def worker_disconnected(self, worker_id: str, why: str) -> None:
        """The worker's connection is gone (it may reconnect and migrate)."""
        self._links.pop(worker_id, None)
        self._sched.worker_left(self.now(), worker_id, why)
        self.flush()
        for obs in list(self._worker_observers):
            notify(obs.worker_gone, worker_id)

    def worker_gone(self, worker_id: str, why: str) -> None:
        """The worker's process is gone for good (its replica exited)."""
        self._sched.worker_gone(self.now(), worker_id, why)
        self.flush()

    def drain(self, worker_id: str) -> bool:
        """No new offers to this worker; False if it is not connected."""
        if worker_id not in self._sched.workers:
            return False
        self._sched.drain_worker(self.now(), worker_id)
        self.flush()
        return True

    def reconfigure(self, config: Config) -> None:
        """A reloaded config's pools, defaults and `[server]` limits apply from
        now on (`Scheduler.configure`); the rest of `config` is not read."""
        srv = config.server
        limits = Limits(
            max_worker_jobs=srv.max_worker_jobs,
            max_trace_events=srv.max_trace_events,
            max_queued=srv.max_queued,
        )
        self._sched.configure(self.now(), config.pools.values(), config.defaults, limits)
        self.flush()

    def tag_worker(self, worker_id: str, version: str) -> None:
        """Record the version of the replica this worker runs (routes, traces)."""
        self._sched.set_worker_group(worker_id, version)

    def route(self, pool: str, version: str | None, share: float = 1.0) -> None:
        """New calls of `pool`: `share` of them prefer workers of `version`
        (a rollout); None clears the preference."""
        self._sched.set_route(self.now(), pool, version, share)
        self.flush()

    def worker_status(
        self,
        worker_id: str,
        *,
        available: bool | None,
        load: float,
        draining: bool,
        job_count: int,
    ) -> None:
        """A status report; `available` None keeps the last reported status."""
        w = self._sched.workers.get(worker_id)
        if w is None:
            return
        if available is None:
            available = w.status.value == "available"
        self._sched.worker_status(
            self.now(),
            worker_id,
            available=available,
            load=load,
            draining=draining,
            job_count=job_count,
        )
        self.flush()

    def offer_answered(
        self,
        worker_id: str,
        job_id: str,
        *,
        available: bool,
        terminate: bool,
        accept: AcceptInfo | None,
    ) -> None:
        """The worker answered an offer. Raises `UnknownWorker`."""
        self._sched.answer(
            self.now(), worker_id, job_id, available=available, terminate=terminate, accept=accept
        )
        self.flush()

    def job_reported(self, worker_id: str, job_id: str, status: JobState, error: str) -> None:
        """The worker reported a job's status (running, succeeded, failed)."""
        if self._unknown_end is not None and status in (JobState.SUCCEEDED, JobState.FAILED):
            w = self._sched.workers.get(worker_id)
            if w is not None and job_id not in w.jobs:
                notify(self._unknown_end, worker_id, job_id, status, error)
        self._sched.job_status(self.now(), worker_id, job_id, status, error)
        self.flush()

    async def jobs_migrated(self, worker_id: str, job_ids: list[str]) -> None:
        """A reconnected worker says these jobs still run on it. Ids of jobs
        that ended here are terminated, never run twice. Raises `UnknownWorker`."""
        ended = set()
        unknown = []
        for job_id in job_ids:
            if job_id in self._sched.jobs:
                continue
            if job_id in self._recent_ended or await self._writer.get(job_id) is not None:
                ended.add(job_id)
            else:
                unknown.append(job_id)
        self._sched.migrate(self.now(), worker_id, job_ids, ended)
        if self._adopter is not None:
            self._adopted(unknown)
        self.flush()

    # ----------------------------------------------------------- carrying out

    def flush(self) -> None:
        # The four actions of every job cycle first, in the order they come.
        for action in self._sched.take_actions():
            if isinstance(action, SendOffer):
                self._send(action.worker_id, offer_frame(self._job_proto(action.job)))
            elif isinstance(action, SendAssignment):
                b = self._bridged.get(action.job.id)
                if b is not None and not b.token:
                    b.held = True
                    notify(b.link.job_accepted, action.job)
                else:
                    self._send_assignment(action.worker_id, action.job)
            elif isinstance(action, JobRunning):
                self._wake(action.job)
                b = self._bridged.get(action.job.id)
                if b is not None:
                    notify(b.link.job_running, action.job)
            elif isinstance(action, JobEnded):
                self._ended(action.job)
            elif isinstance(action, SlotHeld):
                for obs in self._job_observers:
                    notify(obs.job_placed, action.job)
            elif isinstance(action, SendTermination):
                msg = agent.ServerMessage(termination=agent.JobTermination(job_id=action.job_id))
                self._send(action.worker_id, msg.SerializeToString())
            else:
                self._forget_pool(action.agent_name)
        self._arm_timer()
        for listener in self._flush_listeners:
            notify(listener)

    def _forget_pool(self, name: str) -> None:
        """A pool of an agent name nobody configured went idle and the scheduler
        dropped it: drop its latency series too, so made-up names do not grow
        /metrics (the scheduler folds its counters into `(unconfigured)`)."""
        for histogram in (self.metrics.queue_wait, self.metrics.placement_latency):
            histogram.remove(name)

    def _send_assignment(self, worker_id: str, job: Job) -> None:
        if self._fence is not None:
            # Cluster mode: the frame goes out once the job's record says
            # where it runs (a new owner then waits for that worker's migrate).
            self._fence.assigning(
                job, worker_id, functools.partial(self._assignment_recorded, worker_id, job)
            )
            return
        self._assign(worker_id, job)

    def _assignment_recorded(self, worker_id: str, job: Job, ok: bool) -> None:
        live = self._sched.jobs.get(job.id) is job and job.worker_id == worker_id
        if not live or job.state is not JobState.ASSIGNED:
            return  # it ended or is being terminated meanwhile
        if not ok:
            self.fenced += 1  # not recorded (the pool is not ours): nothing sent
            return
        self._assign(worker_id, job)

    def _assign(self, worker_id: str, job: Job) -> None:
        pb = self._job_proto(job)
        frame = assignment_frame(job, pb, self.config.livekit, self._bridged.get(job.id))
        self._send(worker_id, frame)
        self.metrics.placed(job)
        for obs in self._job_observers:
            notify(obs.job_placed, job)

    def _send(self, worker_id: str, frame: bytes) -> None:
        link = self._links.get(worker_id)
        if link is not None:
            if self._fence is not None:
                w = self._sched.workers.get(worker_id)
                if w is not None and not self._fence.may_act(w.agent_name):
                    self.fenced += 1  # the fence: no frame on a lease we may not hold
                    return
            link.send(frame)

    def _ended(self, job: Job) -> None:
        job.wire = None
        self._remember_ended(job.id)
        self.metrics.ended(job)
        self._wake(job)
        for obs in self._job_observers:
            notify(obs.job_ended, job)
        # After the observers: the SIP edge sends a refusal's final from there.
        sip = self._sip.pop(job.id, None) if self._sip else None
        self._writer.put(JobRecord.from_job(job, self._wall_offset, sip=sip))
        b = self._bridged.pop(job.id, None)
        if b is not None:
            notify(b.link.job_ended, job)
        if job.state is JobState.SUCCEEDED:
            log.debug("job ended", extra={"job_id": job.id, "state": "succeeded"})
        else:
            log.info(
                "job ended",
                extra={
                    "job_id": job.id,
                    "agent_name": job.agent_name,
                    "state": job.state.value,
                    "reason": job.reason,
                    "worker_id": job.worker_id,
                },
            )

    def _remember_ended(self, job_id: str) -> None:
        recent = self._recent_ended
        recent[job_id] = None
        if len(recent) > _RECENT_ENDED:
            recent.popitem(last=False)

    # ------------------------------------------------------------------ timer

    def _arm_timer(self) -> None:
        # Deadlines only come earlier by being armed: with our timer pending
        # and nothing armed since it was checked, it is still early enough
        # (at worst early: `advance` then finds nothing and it is re-armed).
        armed = self._sched.timers.armed
        if self._timer is not None and armed == self._timer_armed:
            return
        self._timer_armed = armed
        when = self._sched.next_deadline()
        if when is None or self._loop is None or self.closing:
            return  # after close(), departing workers must not re-arm timers
        when += _TIMER_SLACK_S
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._sched.advance(self.now())
        self.flush()

    # ----------------------------------------------------------------- frames

    def _job_proto(self, job: Job) -> agent.Job:
        """`job_proto(job)`, built once per live job (dropped when it ends); a
        bridged job's is the upstream's."""
        pb = job.wire
        if pb is None:
            b = self._bridged.get(job.id)
            pb = job.wire = b.proto if b is not None else job_proto(job)
        assert isinstance(pb, agent.Job)
        return pb

    # ---------------------------------------------------------------- waiters

    def _wake(self, job: Job) -> None:
        futs = self._waiters.pop(job.id, None)
        if futs:
            for fut in futs:
                if not fut.done():
                    fut.set_result(job)

    async def wait_started(self, job: Job, limit_s: float) -> Job:
        """Return once `job` is running or has ended (or `limit_s` passes)."""
        if job.state is JobState.RUNNING or job.state in TERMINAL:
            return job
        assert self._loop is not None
        fut: asyncio.Future[Job] = self._loop.create_future()
        self._waiters.setdefault(job.id, []).append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), limit_s)
        except TimeoutError:
            return job
        finally:
            futs = self._waiters.get(job.id)
            if futs and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiters[job.id]
