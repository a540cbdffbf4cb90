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
touches them, so a second server, a new store or a new intake changes this
module only. Queries hand out the core's records (`Job`, `Worker`, `Pool`)
for reading only; changing one outside a command is a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import ParamSpec, Protocol

from livekit.protocol import agent, models

from trunkline import auth
from trunkline.config import Config
from trunkline.core import (
    TERMINAL,
    AcceptInfo,
    DuplicateJob,
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
from trunkline.core.autoscale import Demand, ScaleEvent
from trunkline.core.pool import Pool
from trunkline.runtime import job_query
from trunkline.runtime.history import HistoryCollector, HistoryStatus, HistoryWriter
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.retention import Retention
from trunkline.stores import HistoryStore, JobFilter, JobRecord, MemoryHistory, SipCallRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow

log = logging.getLogger("trunkline.dispatch")

P = ParamSpec("P")

# Timers fire up to this much late so bursts of deadlines share one wake-up.
_TIMER_SLACK_S = 0.001
# Ended job ids remembered for migrate checks (a reconnecting worker must not
# get back a job that already ended here).
_RECENT_ENDED = 10_000


class JobObserver(Protocol):
    """Told about placements and endings as the dispatcher carries them out
    (the SIP edge uses it to forward or refuse calls)."""

    def job_placed(self, job: Job) -> None: ...

    def job_ended(self, job: Job) -> None: ...


class WorkerObserver(Protocol):
    """Told when a worker registers (with the `worker_token` it sent, "" if
    none) and when its connection is gone (the autoscaler ties replicas to
    workers this way)."""

    def worker_registered(self, worker_id: str, agent_name: str, token: str) -> None: ...

    def worker_gone(self, worker_id: str) -> None: ...


class WorkerLink(Protocol):
    """A registered worker's connection, as the dispatcher uses it."""

    def send(self, frame: bytes) -> None:
        """Queue one encoded `ServerMessage`; never blocks, keeps order."""

    async def close(self, message: bytes) -> None:
        """Close the connection (server shutdown)."""


class Fence(Protocol):
    """Cluster mode (runtime/cluster.py): may this server act for a pool now?
    Requests of a pool it may not act for are refused with `refusal(pool)`;
    frames to that pool's workers are not sent (a stale owner sends nothing)."""

    def may_act(self, pool: str) -> bool: ...

    def refusal(self, pool: str) -> Exception: ...

    def admitted(self, job: Job) -> None:
        """A request was let in (called after it was carried out)."""


class BridgeLink(Protocol):
    """The upstream side of bridged jobs (runtime/bridge): told when a bridged
    job's worker accepted (answer the upstream now: the worker's assignment is
    held until `Dispatcher.bridge_assigned`), when it runs and when it ended."""

    def job_accepted(self, job: Job) -> None: ...

    def job_running(self, job: Job) -> None: ...

    def job_ended(self, job: Job) -> None: ...


@dataclasses.dataclass(slots=True)
class _Bridged:
    """A live job offered by an upstream LiveKit server: its job as the
    upstream sent it (the worker runs the job from the offer), and the URL and
    token of the upstream's assignment once it came."""

    proto: agent.Job
    link: BridgeLink
    url: str = ""
    token: str = ""
    held: bool = False  # the worker accepted; its assignment waits for the token


def job_proto(job: Job) -> agent.Job:
    """The job as the LiveKit protocol describes it (offers, assignments, Twirp)."""
    pb = agent.Job(
        id=job.id,
        dispatch_id=job.dispatch_id,
        type=agent.JobType.JT_ROOM,
        room=models.Room(name=job.room),
        metadata=job.metadata,
        agent_name=job.agent_name,
    )
    if job.attributes:
        pb.attributes.update(job.attributes)
    return pb


def _not_started() -> float:
    raise AssertionError("Dispatcher.start() was not called")


def _declined(job_pb: agent.Job, why: str, now: float) -> Job:
    """An upstream offer another path serves: a job record ended `rejected`
    with `why`, never filed in the scheduler nor the history."""
    job = Job(job_pb.id, job_pb.agent_name, job_pb.room.name, job_pb.metadata, now, 0.0)
    job.state, job.reason, job.ended_at = JobState.REJECTED, why, now
    return job


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(9)


def _request_ids(job_id: str, room: str) -> tuple[str, str, str]:
    """A request's job id, room and dispatch id: `job_id` and `room` when given,
    else `new_id` ones, from one draw of random bytes for all three (each
    12-character slice encodes 9 bytes, as `new_id` does)."""
    raw = secrets.token_urlsafe(27)
    return (job_id or "AJ_" + raw[:12], room or "room-" + raw[12:24], "AD_" + raw[24:])


class Dispatcher:
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
        self._bridged: dict[str, _Bridged] = {}
        self._claims: list[Callable[[agent.Job], str | None]] = []
        self._sip: dict[str, SipCallRecord] = {}  # live jobs of SIP calls
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_armed = -1  # the scheduler's `timers.armed` when `_timer` was checked
        self._clock: Callable[[], float] = _not_started
        self._wall_offset = time.time() - time.monotonic()
        self.closing = False
        self._job_observers: list[JobObserver] = []
        self._worker_observers: list[WorkerObserver] = []
        self._flush_listeners: list[Callable[[], None]] = []
        self._fence: Fence | None = None  # None: single process, every pool is ours
        self._adopter: Callable[[Job], BridgeLink | None] | None = None
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

    def now(self) -> float:
        return self._clock()

    def wall(self, t: float | None) -> float | None:
        """A scheduler time as a Unix timestamp."""
        return None if t is None else t + self._wall_offset

    @property
    def wall_offset(self) -> float:
        return self._wall_offset

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

    def set_adopter(self, adopt: Callable[[Job], BridgeLink | None] | None) -> None:
        """`adopt(job)` sees each job a migrate adopts (this server had no record
        of it: it restarted), once, before its first action; a link returned
        makes it a bridged job of that link from then on (the bridge names it
        upstream and reports its end there)."""
        self._adopter = adopt

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
        job_id, room, dispatch_id = _request_ids(job_id, room)
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

    def request_bridged(self, job_pb: agent.Job, link: BridgeLink, max_wait_s: float) -> Job:
        """A job an upstream LiveKit server offered to the bridge, placed under
        every rule `request` follows, with the upstream's job id; the worker is
        offered `job_pb` as it came (room, participant, type). When the worker
        accepts, `link.job_accepted(job)` is called and its assignment is held
        until `bridge_assigned` brings the upstream's URL and token; `link`
        also hears `job_running` and `job_ended`. Raises `DuplicateJob`."""
        if self._fence is not None and not self._fence.may_act(job_pb.agent_name):
            raise self._fence.refusal(job_pb.agent_name)
        job_id = job_pb.id
        if job_id in self._sched.jobs:
            raise DuplicateJob(f"job {job_id} is already live")
        for claim in self._claims:
            why = self.notify_value(claim, job_pb)
            if why:
                return _declined(job_pb, why, self.now())
        self._bridged[job_id] = _Bridged(job_pb, link)
        try:
            job = self._sched.request(
                self.now(),
                job_id,
                job_pb.agent_name,
                room=job_pb.room.name or f"room-{new_id('')}",
                metadata=job_pb.metadata,
                max_wait_s=max_wait_s,
                dispatch_id=job_pb.dispatch_id,
                attributes=dict(job_pb.attributes) or None,
            )
        except Exception:
            self._bridged.pop(job_id, None)
            raise
        self.flush()
        return job

    def bridge_assigned(self, job_id: str, url: str, token: str) -> bool:
        """The upstream's `JobAssignment` for a bridged job: the worker's held
        assignment goes out carrying that URL and token. False (nothing sent)
        if the job is not live, not bridged, already assigned, or no longer
        waiting for it (cancelled meanwhile)."""
        b = self._bridged.get(job_id)
        job = self._sched.jobs.get(job_id)
        if b is None or job is None or b.token or not b.held:
            return False
        b.url, b.token, b.held = url, token, False
        if job.state is not JobState.ASSIGNED or job.worker_id is None:
            return False
        self._send_assignment(job.worker_id, job)
        return True

    def add_upstream_claim(self, claim: Callable[[agent.Job], str | None]) -> None:
        """`claim(job_pb)` sees each upstream offer first: a reason returned
        means the offer is served otherwise (the SIP room binder: the call's
        held job), and `request_bridged` returns a job ended `rejected` with
        it, never filed (the bridge answers `terminate=true`)."""
        self._claims.append(claim)

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
            self.notify(obs.worker_registered, worker_id, agent_name, token)
        return w

    def worker_disconnected(self, worker_id: str, why: str) -> None:
        """The worker's connection is gone (it may reconnect and migrate)."""
        self._links.pop(worker_id, None)
        self._sched.worker_left(self.now(), worker_id, why)
        self.flush()
        for obs in list(self._worker_observers):
            self.notify(obs.worker_gone, worker_id)

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

    def _adopted(self, job_ids: list[str]) -> None:
        assert self._adopter is not None
        for job_id in job_ids:
            job = self._sched.jobs.get(job_id)
            if job is None or job_id in self._bridged:
                continue  # not adopted (over capacity or quota: terminated)
            try:
                link = self._adopter(job)
            except Exception:
                log.exception("adopter failed", extra={"job_id": job_id})
                continue
            if link is not None:
                self._bridged[job_id] = _Bridged(job_proto(job), link)

    # ----------------------------------------------------------- carrying out

    def flush(self) -> None:
        # The four actions of every job cycle first, in the order they come.
        for action in self._sched.take_actions():
            if isinstance(action, SendOffer):
                self._send(action.worker_id, self._offer_frame(action.job))
            elif isinstance(action, SendAssignment):
                b = self._bridged.get(action.job.id)
                if b is not None and not b.token:
                    b.held = True
                    self.notify(b.link.job_accepted, action.job)
                else:
                    self._send_assignment(action.worker_id, action.job)
            elif isinstance(action, JobRunning):
                self._wake(action.job)
                b = self._bridged.get(action.job.id)
                if b is not None:
                    self.notify(b.link.job_running, action.job)
            elif isinstance(action, JobEnded):
                self._ended(action.job)
            elif isinstance(action, SlotHeld):
                for obs in self._job_observers:
                    self.notify(obs.job_placed, action.job)
            elif isinstance(action, SendTermination):
                msg = agent.ServerMessage(termination=agent.JobTermination(job_id=action.job_id))
                self._send(action.worker_id, msg.SerializeToString())
            else:
                self._forget_pool(action.agent_name)
        self._arm_timer()
        for listener in self._flush_listeners:
            self.notify(listener)

    @staticmethod
    def notify(callback: Callable[P, object], *args: P.args, **kw: P.kwargs) -> None:
        """Call an observer; its failure is logged, never allowed to stop the
        dispatcher from carrying out the remaining actions."""
        try:
            callback(*args, **kw)
        except Exception:
            log.exception(
                "observer failed", extra={"observer": getattr(callback, "__qualname__", "?")}
            )

    @staticmethod
    def notify_value(callback: Callable[[agent.Job], str | None], job_pb: agent.Job) -> str | None:
        """`notify` for a claim: its failure is logged and counts as no claim."""
        try:
            return callback(job_pb)
        except Exception:
            log.exception("upstream claim failed")
            return None

    def _forget_pool(self, name: str) -> None:
        """A pool of an agent name nobody configured went idle and the scheduler
        dropped it: drop its latency series too, so made-up names do not grow
        /metrics (the scheduler folds its counters into `(unconfigured)`)."""
        for histogram in (self.metrics.queue_wait, self.metrics.placement_latency):
            histogram.remove(name)

    def _send_assignment(self, worker_id: str, job: Job) -> None:
        self._send(worker_id, self._assignment_frame(job))
        self.metrics.placed(job)
        for obs in self._job_observers:
            self.notify(obs.job_placed, job)

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
        recent = self._recent_ended
        recent[job.id] = None
        if len(recent) > _RECENT_ENDED:
            recent.popitem(last=False)
        self.metrics.ended(job)
        self._wake(job)
        for obs in self._job_observers:
            self.notify(obs.job_ended, job)
        # After the observers: the SIP edge sends a refusal's final from there.
        sip = self._sip.pop(job.id, None) if self._sip else None
        self._writer.put(JobRecord.from_job(job, self._wall_offset, sip=sip))
        b = self._bridged.pop(job.id, None)
        if b is not None:
            self.notify(b.link.job_ended, job)
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
        """`job_proto(job)`, built once per live job (dropped when it ends)."""
        pb = job.wire
        if pb is None:
            b = self._bridged.get(job.id)
            pb = job.wire = b.proto if b is not None else job_proto(job)
        assert isinstance(pb, agent.Job)
        return pb

    def _offer_frame(self, job: Job) -> bytes:
        msg = agent.ServerMessage(availability=agent.AvailabilityRequest(job=self._job_proto(job)))
        return msg.SerializeToString()

    def _assignment_frame(self, job: Job) -> bytes:
        assignment = agent.JobAssignment(job=self._job_proto(job))
        media = self.config.livekit
        b = self._bridged.get(job.id)
        if b is not None:
            # Bridged: the agent joins the upstream's room with its token.
            assignment.url, assignment.token = b.url, b.token
        elif media is not None:
            accept = job.accept
            assignment.url = media.url
            assignment.token = auth.room_token(
                media.api_key,
                media.api_secret,
                job.room,
                identity=(accept.identity if accept and accept.identity else f"agent-{job.id}"),
                name=accept.name if accept else "",
                metadata=accept.metadata if accept else "",
                attributes=accept.attributes if accept else None,
            )
        return agent.ServerMessage(assignment=assignment).SerializeToString()

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

    # ---------------------------------------------------------------- queries

    def record(self, job: Job) -> JobRecord:
        """An immutable snapshot of `job` (live or ended) in wall-clock time."""
        return JobRecord.from_job(job, self._wall_offset, sip=self._sip.get(job.id))

    def live_job(self, job_id: str) -> Job | None:
        return self._sched.jobs.get(job_id)

    def live_jobs(self) -> Iterable[Job]:
        """Live jobs, oldest first."""
        return self._sched.jobs.values()

    def live_job_count(self) -> int:
        return len(self._sched.jobs)

    def live_jobs_in_room(self, room: str) -> list[Job]:
        """Live jobs whose room is `room` (the webhook intake ends them)."""
        return list(self._sched.by_room.get(room, {}).values())

    def live_dispatches(self, room: str = "", dispatch_id: str = "") -> list[Job]:
        """Live jobs created by a dispatch, in `room` and/or of `dispatch_id`."""
        if dispatch_id:
            job = self._sched.by_dispatch.get(dispatch_id)
            found = [job] if job is not None else []
        elif room:
            found = list(self._sched.by_room.get(room, {}).values())
        else:
            found = list(self._sched.jobs.values())
        return [j for j in found if j.dispatch_id and (not room or j.room == room)]

    async def find_job(self, job_id: str) -> JobRecord | None:
        """The job live or ended (as a snapshot), or None."""
        job = self._sched.jobs.get(job_id)
        if job is not None:
            return self.record(job)
        return await self._writer.get(job_id)

    async def list_jobs(self, flt: JobFilter, limit: int) -> list[JobRecord]:
        """Up to `limit` jobs matching `flt`: live ones (oldest first), then
        ended ones, newest first."""
        out: list[JobRecord] = []
        live: Iterable[Job]
        if flt.room is not None:
            live = self._sched.by_room.get(flt.room, {}).values()
        else:
            live = self._sched.jobs.values()
        for job in live:
            rec = self.record(job)
            if flt.matches(rec):
                out.append(rec)
                if len(out) >= limit:
                    return out
        async for rec in self._writer.query(flt, limit - len(out)):
            out.append(rec)
        return out

    async def query_jobs(
        self, flt: JobFilter, *, limit: int, cursor: str | None = None
    ) -> job_query.JobPage:
        """A page of up to `limit` jobs matching `flt`: live ones first (oldest
        first), then ended ones (newest first) from the history, starting at
        `cursor` (a `next_cursor` handed out before; see `runtime.job_query`).
        Raises `InvalidQuery` (limit) or `BadCursor`."""
        return await job_query.page(self._live_records(flt), self._writer.page, flt, limit, cursor)

    def _live_records(self, flt: JobFilter) -> Iterable[JobRecord]:
        """Snapshots of the live jobs that may match `flt` (the caller checks
        `flt.matches`); the cheap fields are checked before a snapshot is made."""
        jobs: Iterable[Job]
        if flt.room is not None:
            jobs = self._sched.by_room.get(flt.room, {}).values()
        else:
            jobs = self._sched.jobs.values()
        if (flt.trunk is not None or flt.caller is not None) and not self._sip:
            return
        for job in list(jobs):
            if (
                (flt.states is None or job.state.value in flt.states)
                and (flt.agent_name is None or job.agent_name == flt.agent_name)
                and (flt.worker_id is None or job.worker_id == flt.worker_id)
                and (flt.dispatch_id is None or job.dispatch_id == flt.dispatch_id)
            ):
                yield self.record(job)

    def record_scale_event(self, ev: ScaleEvent) -> None:
        """Keep the autoscaler's event `ev` in the history (through the
        writer: never blocks; shed and counted when the writer is full)."""
        self._writer.put_scale_event(
            ScaleEventRecord.from_event(ev, self._wall_offset, new_id("SE_"))
        )

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[ScaleEventRecord]:
        """Scale events from the history, newest first (see
        `HistoryStore.scale_events`). Raises `InvalidQuery`."""
        return await self._writer.scale_events(pool=pool, since=since, until=until, limit=limit)

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        """The usage report from the history (see `HistoryStore.usage`).
        Raises `InvalidQuery`, or `StoreError` while the store fails."""
        return await self._writer.usage(since=since, until=until, bucket=bucket, pool=pool)

    def recent_ended(self, limit: int) -> list[JobRecord]:
        """The newest ended jobs still held in memory, newest first (the
        dashboard's list; may be fewer than the store holds)."""
        return self._writer.recent(limit)

    def worker(self, worker_id: str) -> Worker | None:
        return self._sched.workers.get(worker_id)

    def workers(self) -> Iterable[Worker]:
        return self._sched.workers.values()

    def worker_count(self) -> int:
        return len(self._sched.workers)

    def pools(self) -> Iterable[Pool]:
        return self._sched.pools.values()

    def pool(self, name: str) -> Pool | None:
        """The pool of an agent name, None if none was configured or seen."""
        return self._sched.pools.get(name)

    def pool_has_capacity(self, name: str) -> bool:
        """Could a job of this pool be offered right now?"""
        p = self._sched.pools.get(name)
        return p is not None and not p.quota_full() and p.free_slots() > 0

    def demand(self, pool: str, refused_window_s: float) -> Demand:
        """The pool's demand for the autoscaler (each caller counted once)."""
        return self._sched.demand(self.now(), pool, refused_window_s)

    def slots_used(self, worker_id: str) -> int | None:
        """Slots the worker holds (offers + jobs); None if not connected."""
        w = self._sched.workers.get(worker_id)
        return w.used if w is not None else None

    def counters(self) -> tuple[Iterable[tuple[str, int]], Iterable[tuple[tuple[str, str], int]]]:
        """(requests per pool, ended jobs per (pool, outcome)) since start."""
        return self._sched.requested.items(), self._sched.ended.items()

    def offer_answers(self) -> Iterable[tuple[tuple[str, str], int]]:
        """Offers per (pool, how they were answered) since start."""
        return self._sched.offer_answers.items()

    def history_status(self) -> HistoryStatus:
        """The history's health: backend, degraded or not (and why), records
        pending, written, shed, pruned (/healthz, /metrics)."""
        st = self._writer.status()
        return dataclasses.replace(
            st, pruned=self._retention.pruned, prune_errors=self._retention.errors
        )

    @property
    def history_dropped(self) -> int:
        """Ended records the history writer had to shed (store too slow)."""
        return self._writer.dropped
