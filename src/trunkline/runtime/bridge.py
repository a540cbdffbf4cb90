"""The upstream bridge: trunkline registered as a worker of a LiveKit server.

Theory of operation
-------------------
With `[livekit] bridge = true`, trunkline opens `connections` websockets to
the LiveKit server's `/agent` for each agent name and job type it bridges and
speaks the ordinary worker protocol there (register, status, answers, job
status, migrate), reconnecting with capped, jittered exponential backoff as a
worker does. Every path by which that server creates a job (a room's
automatic dispatch, a participant joining, `CreateDispatch`, a token's
`RoomAgentDispatch`, LiveKit SIP's rooms) thus reaches trunkline as an
`AvailabilityRequest`.

Each upstream offer becomes a trunkline job (`Dispatcher.request_bridged`,
with the upstream's job id), placed under every trunkline rule: exact caps,
pack/spread, soft and hard refusals, quota; it may queue, but only within
the answer window (`bridge_answer_window_s`, minus a margin for the worker's
own answer), because the LiveKit server gives up on the whole request about
2.8 s after it sent the offer (psrpc's 3 s client timeout; see
docs/livekit.md). The answer goes up when trunkline's worker has decided:

- accepted -> `available` with the worker's participant identity, name,
  metadata and attributes (the upstream mints the agent's token from them);
- rejected with `terminate` -> `available=false, terminate=true` (the
  upstream records the job as ended, as it would for its own worker);
- anything else (no slot within the window, quota, the worker silent) ->
  `available=false` in time, so the upstream tries its other workers (say, a
  second trunkline) or reports "no worker available".

The worker's assignment is held by the dispatcher until the upstream's
`JobAssignment` arrives; it then goes to the worker with the upstream's token
and URL (the upstream sends none: its own workers use their own URL, which
for a worker behind trunkline is trunkline's, so the bridge fills in
`[livekit] url`). Job status goes up as the worker reports it; the upstream's
`JobTermination` cancels the job here. A lost upstream connection drops only
the offers still being decided there (the upstream has given up on them);
running jobs keep running and are named in a `MigrateJobRequest` on the next
connection, with the statuses that could not be sent. A worker that
reconnects to trunkline migrates its jobs as usual; they stay bridged. After
trunkline itself restarted, its workers migrate jobs it has no record of; the
dispatcher adopts them as running, and those of a bridged pool become bridged
jobs again (`Dispatcher.set_adopter`): named in a `MigrateJobRequest` on one
of the pool's connections, as a livekit-agents worker names its running jobs
after a reconnect, and their end reported there.

Status: a connection reports WS_AVAILABLE while its pool can take a job now
(free slots, replicas starting) or within the window (room in its queue, if a
slot can appear: some worker connected or the pool autoscaled), with load
0.69 x used / (used + free) (always below the upstream's 0.7 target load, so
a multi-node server still bids for it); else WS_FULL with load 1. It is sent
when it changes (coalesced, at most every `STATUS_MIN_INTERVAL_S`) and every
`STATUS_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from livekit.protocol import agent

from trunkline import __version__, auth
from trunkline.config import BRIDGE_JOB_TYPES, BridgeSettings, MediaServer
from trunkline.core import DuplicateJob, Job, JobState
from trunkline.runtime.dispatcher import Dispatcher

log = logging.getLogger("trunkline.bridge")

STATUS_INTERVAL_S = 2.5  # as a livekit-agents worker reports
STATUS_MIN_INTERVAL_S = 0.05  # changes are coalesced to at most one report per this
# A bridged job queues until this long before the window closes: a job placed
# at the last moment still needs its worker's answer in time.
OFFER_MARGIN_S = 0.3
# After answering `available`, the upstream's JobAssignment must come within
# this long (livekit-agents' ASSIGNMENT_TIMEOUT: its worker gives up then too).
ASSIGNMENT_TIMEOUT_S = 7.5
REGISTER_TIMEOUT_S = 10.0
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 10.0
STABLE_SESSION_S = 30.0  # a session this long resets the backoff
_MAX_BACKLOG = 1000  # statuses kept for a connection that is down
_TARGET_LOAD = 0.69  # below the LiveKit server's DefaultTargetLoad (0.7)

_ENDED_STATUS = {JobState.SUCCEEDED: agent.JobStatus.JS_SUCCESS}


def upstream_agent_url(url: str) -> str:
    """`[livekit] url` as the websocket URL of its `/agent` endpoint."""
    base = url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return base + "/agent"


class _Refused(Exception):
    """The upstream refused or broke the handshake."""


class UpstreamConn:
    """One worker connection to the upstream, for one agent name and job type."""

    def __init__(self, bridge: Bridge, agent_name: str, job_type: str, index: int) -> None:
        self.bridge = bridge
        self.agent_name = agent_name
        self.job_type = job_type
        self.index = index
        self.worker_id = ""
        self.sessions = 0  # registered sessions so far
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._backlog: deque[agent.WorkerMessage] = deque(maxlen=_MAX_BACKLOG)
        self._last_status: tuple[int, float, int] | None = None
        self._out: deque[bytes] = deque()  # frames for this session's writer
        self._wake: asyncio.Future[None] | None = None
        self.registered = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    def send(self, msg: agent.WorkerMessage, *, keep: bool = False) -> None:
        """Send now; `keep`: if the connection is down, send after it reconnects."""
        ws = self._ws
        if ws is None or ws.closed:
            if keep:
                self._backlog.append(msg)
            return
        self._out.append(msg.SerializeToString())
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send this session's frames in order (one task, not one per frame)."""
        loop = asyncio.get_running_loop()
        out = self._out
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                while out:
                    await ws.send_bytes(out.popleft())
                self._wake = loop.create_future()
                await self._wake

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff, until cancelled."""
        bridge = self.bridge
        url = upstream_agent_url(bridge.media.url)
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                token = auth.agent_token(bridge.media.api_key, bridge.media.api_secret)
                async with bridge.http.ws_connect(
                    url,
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=30.0,
                    max_msg_size=1 << 20,
                ) as ws:
                    await self._session(ws)
                why = "connection closed"
            except (aiohttp.ClientError, OSError, TimeoutError, _Refused) as exc:
                why = str(exc) or type(exc).__name__
            finally:
                self._ws = None
                self.registered.clear()
                self._last_status = None
                bridge.conn_lost(self)
            if loop.time() - started >= STABLE_SESSION_S:
                attempt = 0
            delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            log.warning(
                "upstream connection lost",
                extra={
                    "agent_name": self.agent_name,
                    "job_type": self.job_type,
                    "why": why,
                    "retry_in_s": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reg = agent.RegisterWorkerRequest(
            type=getattr(agent.JobType, BRIDGE_JOB_TYPES[self.job_type]),
            agent_name=self.agent_name,
            version=f"trunkline-{__version__}",
        )
        await ws.send_bytes(agent.WorkerMessage(register=reg).SerializeToString())
        try:
            msg = await ws.receive(timeout=REGISTER_TIMEOUT_S)
        except TimeoutError:
            raise _Refused(f"no register answer within {REGISTER_TIMEOUT_S:g} s") from None
        sm = _decode(msg)
        if sm is None or sm.WhichOneof("message") != "register":
            raise _Refused("the first message from the upstream was not a register answer")
        self.worker_id = sm.register.worker_id
        self._ws = ws
        self._out.clear()
        writer = asyncio.get_running_loop().create_task(self._writer(ws))
        try:
            await self._serve(ws)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.sessions += 1
        log.info(
            "registered upstream",
            extra={
                "agent_name": self.agent_name,
                "job_type": self.job_type,
                "worker_id": self.worker_id,
            },
        )
        running = self.bridge.running_on(self)
        if running:
            self.send(agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=running)))
        while self._backlog:
            self.send(self._backlog.popleft())
        self.report_status(force=True)
        self.registered.set()
        async for msg in ws:
            sm = _decode(msg)
            if sm is None:
                break
            self._receive(sm)

    def _receive(self, sm: agent.ServerMessage) -> None:
        which = sm.WhichOneof("message")
        bridge = self.bridge
        if which == "availability":
            bridge.spawn(bridge.offer(self, sm.availability.job))
        elif which == "assignment":
            bridge.assigned(self, sm.assignment)
        elif which == "termination":
            bridge.dispatcher.cancel(
                sm.termination.job_id, "terminated by the LiveKit server (JobTermination)"
            )

    def report_status(self, *, force: bool = False) -> None:
        """Send UpdateWorkerStatus if it changed (or `force`)."""
        if not self.connected:
            return
        status = self.bridge.pool_status(self.agent_name)
        if not force and status == self._last_status:
            return
        self._last_status = status
        ws_status, load, jobs = status
        self.send(
            agent.WorkerMessage(
                update_worker=agent.UpdateWorkerStatus(
                    status=ws_status,  # type: ignore[arg-type]
                    load=load,
                    job_count=jobs,
                )
            )
        )


def _window_closed(fut: asyncio.Future[Job | None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _decode(msg: aiohttp.WSMessage) -> agent.ServerMessage | None:
    if msg.type is not aiohttp.WSMsgType.BINARY:
        return None
    sm = agent.ServerMessage()
    try:
        sm.ParseFromString(msg.data)
    except Exception:
        log.warning("undecodable frame from the upstream", extra={"bytes": len(msg.data)})
        return None
    return sm


class Bridge:
    """The bridge (the dispatcher's `BridgeLink` for the jobs it brings in).
    `starting_slots(agent_name)` gives the slots of replicas being started for
    an autoscaled pool (None when the pool is not autoscaled)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        media: MediaServer,
        starting_slots: Callable[[str], int | None] | None = None,
    ) -> None:
        assert media.bridge is not None
        self.dispatcher = dispatcher
        self.media = media
        self.settings: BridgeSettings = media.bridge
        self._starting = starting_slots or (lambda name: None)
        self.conns = [
            UpstreamConn(self, name, jt, i)
            for name in self.settings.agent_names
            for jt in self.settings.job_types.get(name, ("room",))
            for i in range(self.settings.connections)
        ]
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        # job id -> its decision (None: the window closed first)
        self._deciding: dict[str, asyncio.Future[Job | None]] = {}
        self._conn_of: dict[str, UpstreamConn] = {}  # bridged live job -> its connection
        self._awaiting: dict[str, asyncio.TimerHandle] = {}  # answered, no assignment yet
        self._status_due: asyncio.TimerHandle | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._migrating: dict[UpstreamConn, list[str]] = {}  # adopted, to name upstream
        self._adopted = 0
        # Cluster mode: a name's connections run only while this member owns
        # its pool (`gate`), started and stopped by `pool_gained` / `pool_lost`,
        # so the upstream offers a pool's jobs to its owner alone.
        self.gate: Callable[[str], bool] | None = None
        self._runs: dict[UpstreamConn, asyncio.Task[object]] = {}

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "Bridge.start() was not called"
        return self._http

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        for conn in self.conns:
            if self.gate is None or self.gate(conn.agent_name):
                self._run(conn)
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self.dispatcher.add_flush_listener(self._on_flush)
        self.dispatcher.set_adopter(self._adopt)
        log.info(
            "bridging to LiveKit",
            extra={
                "url": self.media.url,
                "agent_names": ",".join(self.settings.agent_names),
                "job_types": ",".join(
                    sorted({t for ts in self.settings.job_types.values() for t in ts})
                ),
                "connections": len(self.conns),
            },
        )

    async def close(self) -> None:
        """Close the upstream connections (running jobs are left to run)."""
        self.dispatcher.remove_flush_listener(self._on_flush)
        self.dispatcher.set_adopter(None)
        if self._status_due is not None:
            self._status_due.cancel()
        for handle in self._awaiting.values():
            handle.cancel()
        tasks = list(self._tasks) + ([self._ticker] if self._ticker else [])
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._http is not None:
            await self._http.close()

    def _run(self, conn: UpstreamConn) -> None:
        if conn in self._runs:
            return
        task = asyncio.get_running_loop().create_task(conn.run())
        self._runs[conn] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def pool_gained(self, agent_name: str) -> None:
        """Cluster mode: this member owns the pool now; register upstream for it."""
        if self._http is None:
            return  # start() opens what the gate allows
        for conn in self.conns:
            if conn.agent_name == agent_name:
                self._run(conn)

    def pool_lost(self, agent_name: str) -> None:
        """Cluster mode: the pool is another member's now; leave upstream for it
        (offers being decided are given up, `conn_lost`; running jobs go on and
        are named upstream by the next owner when their workers migrate)."""
        for conn in self.conns:
            task = self._runs.pop(conn, None) if conn.agent_name == agent_name else None
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------ status

    def pool_status(self, agent_name: str) -> tuple[int, float, int]:
        """(WorkerStatus, load, job count) of a bridged pool, as reported upstream."""
        pool = self.dispatcher.pool(agent_name)
        starting = self._starting(agent_name)
        if pool is None:
            if starting is None:
                return agent.WorkerStatus.WS_FULL, 1.0, 0
            return agent.WorkerStatus.WS_AVAILABLE, 0.0, 0
        used = pool.active
        if pool.quota_full():
            return agent.WorkerStatus.WS_FULL, 1.0, used
        free = pool.free_slots() + (starting or 0)
        can_appear = bool(pool.workers) or starting is not None
        queue_room = 0
        if can_appear and pool.config.queue_max_wait_s > 0:
            queue_room = max(0, pool.config.max_queued - pool.queued)
        if free <= 0 and queue_room <= 0:
            return agent.WorkerStatus.WS_FULL, 1.0, used
        load = _TARGET_LOAD if free <= 0 else _TARGET_LOAD * used / (used + free)
        return agent.WorkerStatus.WS_AVAILABLE, round(load, 3), used

    def _on_flush(self) -> None:
        if self._status_due is None:
            loop = asyncio.get_running_loop()
            self._status_due = loop.call_later(STATUS_MIN_INTERVAL_S, self._report)

    def _report(self) -> None:
        self._status_due = None
        for conn in self.conns:
            conn.report_status()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            for conn in self.conns:
                conn.report_status(force=True)

    # ------------------------------------------------------------ offers

    def _answer(self, conn: UpstreamConn, job_id: str, **fields: object) -> None:
        resp = agent.AvailabilityResponse(job_id=job_id, **fields)  # type: ignore[arg-type]
        conn.send(agent.WorkerMessage(availability=resp))

    async def offer(self, conn: UpstreamConn, job_pb: agent.Job) -> None:
        """Decide one upstream offer within the window and answer it."""
        d = self.dispatcher
        loop = asyncio.get_running_loop()
        window = self.settings.answer_window_s
        deadline = loop.time() + window
        job_id = job_pb.id
        pool = d.pool(job_pb.agent_name)
        queue_wait = pool.config.queue_max_wait_s if pool is not None else window
        fut: asyncio.Future[Job | None] = loop.create_future()
        self._deciding[job_id] = fut
        self._conn_of[job_id] = conn
        try:
            try:
                job = d.request_bridged(
                    job_pb, self, max_wait_s=max(0.0, min(queue_wait, window - OFFER_MARGIN_S))
                )
            except DuplicateJob:
                self._conn_of.pop(job_id, None)
                self._answer(conn, job_id, available=False)
                return
            if (job.state is JobState.ASSIGNED or job.state.terminal) and not fut.done():
                fut.set_result(job)
            # A timer rather than wait_for(shield(...)): one future, no task.
            timer = loop.call_at(deadline, _window_closed, fut)
            try:
                decided = await fut
            finally:
                timer.cancel()
            if decided is None:
                d.cancel(
                    job_id,
                    f"no worker accepted within the LiveKit server's answer window "
                    f"({window:g} s); answered not available",
                )
                self._conn_of.pop(job_id, None)
                self._answer(conn, job_id, available=False)
                return
            job = decided
        finally:
            self._deciding.pop(job_id, None)
        if job.state is JobState.ASSIGNED and job.accept is not None:
            a = job.accept
            self._answer(
                conn,
                job_id,
                available=True,
                participant_identity=a.identity,
                participant_name=a.name,
                participant_metadata=a.metadata,
                participant_attributes=a.attributes,
            )
            self._awaiting[job_id] = loop.call_later(
                ASSIGNMENT_TIMEOUT_S, self._assignment_timeout, job_id
            )
            return
        self._conn_of.pop(job_id, None)
        self._answer(conn, job_id, available=False, terminate=job.state is JobState.REJECTED)

    def assigned(self, conn: UpstreamConn, a: agent.JobAssignment) -> None:
        """The upstream's JobAssignment: relay its token (and URL) to the worker."""
        job_id = a.job.id
        handle = self._awaiting.pop(job_id, None)
        if handle is not None:
            handle.cancel()
        url = a.url or self.media.url
        if not self.dispatcher.bridge_assigned(job_id, url, a.token):
            log.info("upstream assignment for a job no longer here", extra={"job_id": job_id})
            self._conn_of.pop(job_id, None)
            update = agent.UpdateJobStatus(
                job_id=job_id,
                status=agent.JobStatus.JS_FAILED,
                error="the job ended in trunkline before the assignment arrived",
            )
            conn.send(agent.WorkerMessage(update_job=update))

    def _assignment_timeout(self, job_id: str) -> None:
        self._awaiting.pop(job_id, None)
        self.dispatcher.cancel(
            job_id, f"no JobAssignment from the LiveKit server within {ASSIGNMENT_TIMEOUT_S:g} s"
        )

    # ------------------------------------------------------------ BridgeLink

    def job_accepted(self, job: Job) -> None:
        fut = self._deciding.get(job.id)
        if fut is not None and not fut.done():
            fut.set_result(job)
        elif fut is None and job.id not in self._conn_of:
            # Not being decided (its offer was given up): it must not run.
            self.dispatcher.cancel(job.id, "accepted after its upstream offer was given up")

    def job_running(self, job: Job) -> None:
        conn = self._conn_of.get(job.id)
        if conn is not None and job.id not in self._deciding:
            update = agent.UpdateJobStatus(job_id=job.id, status=agent.JobStatus.JS_RUNNING)
            conn.send(agent.WorkerMessage(update_job=update), keep=True)

    def job_ended(self, job: Job) -> None:
        fut = self._deciding.get(job.id)
        if fut is not None:
            if not fut.done():
                fut.set_result(job)
            return
        handle = self._awaiting.pop(job.id, None)
        if handle is not None:
            handle.cancel()
        conn = self._conn_of.pop(job.id, None)
        if conn is not None:
            status = _ENDED_STATUS.get(job.state, agent.JobStatus.JS_FAILED)
            if job.state is JobState.CANCELLED:
                status = agent.JobStatus.JS_SUCCESS  # ended on request, as LiveKit records it
            error = "" if status == agent.JobStatus.JS_SUCCESS else job.reason
            update = agent.UpdateJobStatus(job_id=job.id, status=status, error=error)
            conn.send(agent.WorkerMessage(update_job=update), keep=True)

    # ------------------------------------------------------------ reconnects

    def running_on(self, conn: UpstreamConn) -> list[str]:
        """Bridged jobs of `conn` that are past their upstream decision (to migrate)."""
        return [
            job_id
            for job_id, c in self._conn_of.items()
            if c is conn and job_id not in self._deciding and job_id not in self._awaiting
        ]

    def _adopt(self, job: Job) -> Bridge | None:
        """A job a worker migrated to this (restarted) server, adopted in a
        bridged pool. Nothing says whether it came from upstream, so it is
        treated as if it did: named in a `MigrateJobRequest` on a connection of
        its agent name (its job type is not known either: the first bridged
        type's, connections taken in turn), and its end reported there. An
        upstream that does not know the id ignores both (the open-source server
        ignores every migrate and logs job updates for unknown jobs at debug
        level)."""
        conns = [c for c in self.conns if c.agent_name == job.agent_name]
        if not conns:
            return None
        conns = [c for c in conns if c.job_type == conns[0].job_type]
        conn = conns[self._adopted % len(conns)]
        self._adopted += 1
        self._conn_of[job.id] = conn
        if conn.registered.is_set():  # else its next registration names it (running_on)
            pending = self._migrating.setdefault(conn, [])
            if not pending:
                asyncio.get_running_loop().call_soon(self._send_migrate, conn)
            pending.append(job.id)
        log.info(
            "adopted job bridged again",
            extra={"job_id": job.id, "agent_name": job.agent_name, "worker_id": conn.worker_id},
        )
        return self

    def _send_migrate(self, conn: UpstreamConn) -> None:
        """One `MigrateJobRequest` for the jobs adopted since the last one."""
        job_ids = [j for j in self._migrating.pop(conn, []) if self._conn_of.get(j) is conn]
        if job_ids:
            conn.send(agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=job_ids)))

    def conn_lost(self, conn: UpstreamConn) -> None:
        """`conn` is down: the offers it was deciding, and the jobs it accepted
        but was not yet assigned, are given up (the upstream has moved on);
        running jobs stay, to be migrated on the next connection."""
        for job_id, c in list(self._conn_of.items()):
            if c is not conn:
                continue
            if job_id in self._deciding or job_id in self._awaiting:
                handle = self._awaiting.pop(job_id, None)
                if handle is not None:
                    handle.cancel()
                del self._conn_of[job_id]
                self.dispatcher.cancel(job_id, "the LiveKit server connection was lost")
