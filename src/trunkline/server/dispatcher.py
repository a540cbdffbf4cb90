"""The runtime around the core scheduler: clock, timer, connections, waiters.

Every event from a websocket, an HTTP request or the timer goes through
`Dispatcher.apply(method, ...)`, which calls the scheduler with `now` and then
carries out the actions it produced, in order: frames are queued on the
worker's connection (one writer task per connection keeps them in order),
waiting HTTP requests are woken, ended jobs are filed in the history, metrics
are observed. One asyncio timer is kept armed at the scheduler's next deadline.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from aiohttp import web
from livekit.protocol import agent, models

from trunkline import auth
from trunkline.config import Config
from trunkline.core import (
    TERMINAL,
    Job,
    JobRunning,
    JobState,
    Scheduler,
    SendAssignment,
    SendOffer,
    SendTermination,
)
from trunkline.server.metrics import Metrics
from trunkline.store import JobHistory

log = logging.getLogger("trunkline.dispatch")

P = ParamSpec("P")
R = TypeVar("R")

# Timers fire up to this much late so bursts of deadlines share one wake-up.
_TIMER_SLACK_S = 0.001


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


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(9)


class WorkerConn:
    """One worker's websocket: frames are sent in order by a single writer."""

    __slots__ = (
        "_wake",
        "agent_name",
        "max_jobs",
        "out",
        "remote",
        "worker_id",
        "worker_token",
        "ws",
    )

    def __init__(self, ws: web.WebSocketResponse, worker_id: str, remote: str) -> None:
        self.ws = ws
        self.worker_id = worker_id
        self.remote = remote
        self.agent_name = ""
        self.max_jobs: int | None = None
        self.worker_token = ""  # `worker_token` query parameter (replica identity)
        self.out: deque[bytes] = deque()
        self._wake: asyncio.Future[None] | None = None

    def send(self, data: bytes) -> None:
        self.out.append(data)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def run_writer(self) -> None:
        """Send queued frames until the socket closes (cancel to stop)."""
        loop = asyncio.get_running_loop()
        ws = self.ws
        while not ws.closed:
            while self.out:
                await ws.send_bytes(self.out.popleft())
            self._wake = loop.create_future()
            await self._wake


class Dispatcher:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.sched = Scheduler(config.pools.values(), config.defaults)
        self.history = JobHistory(config.server.history_size)
        self.metrics = metrics
        self.conns: dict[str, WorkerConn] = {}
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wall_offset = 0.0
        self.closing = False
        self.observers: list[JobObserver] = []
        self.worker_observers: list[WorkerObserver] = []
        # Called after every flush (the autoscaler re-reads demand, coalesced).
        self.flush_listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ clock

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wall_offset = time.time() - loop.time()

    def now(self) -> float:
        assert self._loop is not None, "Dispatcher.start() was not called"
        return self._loop.time()

    def wall(self, t: float | None) -> float | None:
        """A scheduler time as a Unix timestamp."""
        return None if t is None else t + self._wall_offset

    # ----------------------------------------------------------------- events

    def apply(self, fn: Callable[Concatenate[float, P], R], *args: P.args, **kw: P.kwargs) -> R:
        """Feed one event to the scheduler and carry out what it asks."""
        result = fn(self.now(), *args, **kw)
        self.flush()
        return result

    def request(
        self,
        agent_name: str,
        *,
        room: str = "",
        metadata: str = "",
        max_wait_s: float | None = None,
        attributes: dict[str, str] | None = None,
        job_id: str = "",
    ) -> Job:
        """A new session request, with fresh job and dispatch ids (`job_id` when
        the caller must know it before the job can be placed) and a room of its
        own when none is named. The returned job is offered, queued or ended."""
        return self.apply(
            self.sched.request,
            job_id or new_id("AJ_"),
            agent_name,
            room=room or f"room-{new_id('')}",
            metadata=metadata,
            max_wait_s=max_wait_s,
            dispatch_id=new_id("AD_"),
            attributes=attributes,
        )

    def flush(self) -> None:
        for action in self.sched.take_actions():
            if isinstance(action, SendOffer):
                self._send(action.worker_id, self._offer_frame(action.job))
            elif isinstance(action, SendAssignment):
                self._send(action.worker_id, self._assignment_frame(action.job))
                self.metrics.placed(action.job)
                for obs in self.observers:
                    self.notify(obs.job_placed, action.job)
            elif isinstance(action, SendTermination):
                msg = agent.ServerMessage(termination=agent.JobTermination(job_id=action.job_id))
                self._send(action.worker_id, msg.SerializeToString())
            elif isinstance(action, JobRunning):
                self._wake(action.job)
            else:
                self._ended(action.job)
        self._arm_timer()
        for listener in self.flush_listeners:
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

    def _send(self, worker_id: str, frame: bytes) -> None:
        conn = self.conns.get(worker_id)
        if conn is not None:
            conn.send(frame)

    def _ended(self, job: Job) -> None:
        job.wire = None
        self.history.add(job)
        self.metrics.ended(job)
        self._wake(job)
        for obs in self.observers:
            self.notify(obs.job_ended, job)
        if job.state is JobState.SUCCEEDED:
            log.debug("job ended", extra={"job_id": job.id, "state": job.state.value})
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
        when = self.sched.next_deadline()
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
        self.sched.advance(self.now())
        self.flush()

    def close(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    # ----------------------------------------------------------------- frames

    def _job_proto(self, job: Job) -> agent.Job:
        """`job_proto(job)`, built once per live job (dropped when it ends)."""
        pb = job.wire
        if pb is None:
            pb = job.wire = job_proto(job)
        assert isinstance(pb, agent.Job)
        return pb

    def _offer_frame(self, job: Job) -> bytes:
        msg = agent.ServerMessage(availability=agent.AvailabilityRequest(job=self._job_proto(job)))
        return msg.SerializeToString()

    def _assignment_frame(self, job: Job) -> bytes:
        assignment = agent.JobAssignment(job=self._job_proto(job))
        media = self.config.livekit
        if media is not None:
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

    # ----------------------------------------------------------------- lookup

    def find_job(self, job_id: str) -> Job | None:
        return self.sched.jobs.get(job_id) or self.history.get(job_id)

    def all_jobs(self) -> Iterator[Job]:
        """Live jobs (oldest first), then ended ones (newest first)."""
        yield from self.sched.jobs.values()
        yield from self.history.newest()
