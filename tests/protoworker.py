"""The protocol-level test worker: one scriptable LiveKit Agents worker.

An aiohttp websocket client speaking the worker protocol (protobuf
`livekit.protocol.agent.WorkerMessage` out, `ServerMessage` in) to a
trunkline server's `/agent`. It is the one worker every server-side test
drives (`tests/server`, `tests/operator_view`, the README demo); the SDK's
own tests use `trunkline.worker` against a fake server instead.

Connecting. `ProtoWorker(url, agent_name, max_jobs=, token=, worker_token=,
prefix=)` builds `{url}{prefix}/agent?max_jobs=..&worker_token=..` (`url` may
be http(s):// or ws(s)://; `prefix` is a path such as `/replica/<token>`) and
sends the dev key's agent token unless `token` is given. `await connect()`
opens, registers and returns the worker id; `open()` and `register()` are
the two halves, for tests of a handshake that goes wrong.

Observing. Every `ServerMessage` is kept in `received` and put on a queue
per kind, so a test awaits exactly the step it expects: `next(kind)`,
`next_offer()`, `next_assignment()`, `next_termination()`; `pending(kind)`
counts what is queued and not taken. The ids of offered, assigned and
terminated jobs are also listed in `offers`, `assigned` and `terminated`;
`active` holds the jobs assigned and not yet ended by this worker.
`barrier()` round-trips a `WorkerPing`: the server handles one connection's
frames in order and sends through one ordered writer, so whatever it meant
to send in reply to earlier frames has arrived once the pong has. It is how
a test shows that something did *not* happen without sleeping.

Answering. By hand: `accept()`, `reject(terminate=True)` (a hard "no"),
`reject(terminate=False)` (a soft refusal), `job_status()` with its
shorthands `running()`, `succeed()`, `fail()`; `status()` sends a worker
status and load report; `migrate()` asks to move jobs; `send()`,
`send_bytes()` and `send_str()` send anything, well-formed or not. Or on
its own: `auto` answers every offer ("accept", "reject" = hard, "refuse" =
soft, "ignore" = never answer; or a function of the offered `Job` returning
one of those), `auto_run` reports each assignment RUNNING, and `auto_end`
reports each terminated job SUCCESS. `ProtoWorker.autonomous()` turns all
three on, for tests that only need a well-behaved worker and end its jobs
with `succeed()`.

Ending. `close()` sends a normal websocket close (idempotent); `abort()`
drops the connection with no close frame, as a crashed worker would;
`wait_closed()` waits for the server to close it and returns the close code
(`close_code`, `close_reason`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlencode

import aiohttp
from livekit.protocol import agent
from support import KEY, SECRET

from trunkline.auth import agent_token

Policy = Literal["accept", "reject", "refuse", "ignore"]

WAIT_S = 5.0  # how long a test waits for a message it expects
REGISTER_WAIT_S = 10.0  # the register reply, from a server that may still be warming up
_ENDS = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.ERROR,
)


class ProtoWorker:
    """One worker connection; `await connect()` returns the worker id."""

    def __init__(
        self,
        base_url: str,
        agent_name: str = "",
        *,
        max_jobs: int | str | None = None,
        token: str | None = None,
        worker_token: str | None = None,
        prefix: str = "",
        auto: Policy | Callable[[agent.Job], Policy] | None = None,
        auto_run: bool = False,
        auto_end: bool = False,
    ) -> None:
        self.url = base_url.rstrip("/") + prefix.rstrip("/") + "/agent"
        query: dict[str, str] = {}
        if max_jobs is not None:
            query["max_jobs"] = str(max_jobs)
        if worker_token is not None:
            query["worker_token"] = worker_token
        if query:
            self.url += "?" + urlencode(query)
        self.agent_name = agent_name
        self.token = agent_token(KEY, SECRET) if token is None else token
        self.auto = auto
        self.auto_run = auto_run
        self.auto_end = auto_end
        self.worker_id = ""
        self.received: list[agent.ServerMessage] = []
        self.offers: list[str] = []
        self.assigned: list[str] = []
        self.terminated: list[str] = []
        self.active: set[str] = set()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._queues: dict[str, asyncio.Queue[agent.ServerMessage]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ping = 0

    @classmethod
    def autonomous(
        cls,
        base_url: str,
        agent_name: str = "",
        *,
        max_jobs: int | None = None,
        auto: Policy | Callable[[agent.Job], Policy] = "accept",
        token: str | None = None,
        worker_token: str | None = None,
        prefix: str = "",
    ) -> ProtoWorker:
        """A worker that behaves like a real agent: answers offers by `auto`,
        reports assignments RUNNING and terminated jobs SUCCESS."""
        return cls(
            base_url,
            agent_name,
            max_jobs=max_jobs,
            token=token,
            worker_token=worker_token,
            prefix=prefix,
            auto=auto,
            auto_run=True,
            auto_end=True,
        )

    # ------------------------------------------------------------- connection

    async def open(self) -> None:
        """Open the websocket (no register yet)."""
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}"}, autoping=True
        )
        self._reader = asyncio.create_task(self._read())

    async def connect(self, within: float = REGISTER_WAIT_S) -> str:
        """Open, register, and wait for the server's `register` reply."""
        await self.open()
        await self.register()
        reply = await self.next("register", within)
        self.worker_id = reply.register.worker_id
        return self.worker_id

    async def register(self) -> None:
        """Send a `RegisterWorkerRequest` for a room-job worker of `agent_name`."""
        reg = agent.RegisterWorkerRequest(
            type=agent.JobType.JT_ROOM, agent_name=self.agent_name, version="protoworker"
        )
        await self.send(agent.WorkerMessage(register=reg))

    async def close(self) -> None:
        """Close the socket normally, then the session (idempotent)."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def abort(self) -> None:
        """Drop the connection without a websocket close frame, as a crashed
        worker would; returns once the reader has seen it go."""
        assert self._ws is not None
        sock = self._ws.get_extra_info("socket")
        if sock is not None and not self.closed.is_set():
            sock.shutdown(socket.SHUT_RDWR)
            await asyncio.wait_for(self.closed.wait(), WAIT_S)
        await self.close()

    async def wait_closed(self, within: float = WAIT_S) -> int | None:
        """Wait for the server to close this connection; returns the close code."""
        await asyncio.wait_for(self.closed.wait(), within)
        return self.close_code

    # ---------------------------------------------------------------- reading

    def _queue(self, kind: str) -> asyncio.Queue[agent.ServerMessage]:
        q = self._queues.get(kind)
        if q is None:
            q = self._queues[kind] = asyncio.Queue()
        return q

    async def _read(self) -> None:
        assert self._ws is not None
        ws = self._ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type in _ENDS:
                    if msg.type is aiohttp.WSMsgType.CLOSE:
                        self.close_reason = str(msg.extra or "")
                    break
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                sm = agent.ServerMessage()
                sm.ParseFromString(msg.data)
                kind = sm.WhichOneof("message") or ""
                self.received.append(sm)
                self._note(kind, sm)
                self._queue(kind).put_nowait(sm)
                await self._react(kind, sm)
        finally:
            self.close_code = ws.close_code
            self.closed.set()

    def _note(self, kind: str, sm: agent.ServerMessage) -> None:
        if kind == "availability":
            self.offers.append(sm.availability.job.id)
        elif kind == "assignment":
            self.assigned.append(sm.assignment.job.id)
            self.active.add(sm.assignment.job.id)
        elif kind == "termination":
            self.terminated.append(sm.termination.job_id)

    async def _react(self, kind: str, sm: agent.ServerMessage) -> None:
        if kind == "availability" and self.auto is not None:
            job = sm.availability.job
            policy = self.auto(job) if callable(self.auto) else self.auto
            if policy == "accept":
                await self.accept(job.id)
            elif policy != "ignore":
                await self.reject(job.id, terminate=policy == "reject")
        elif kind == "assignment" and self.auto_run:
            await self.running(sm.assignment.job.id)
        elif kind == "termination" and self.auto_end:
            await self.succeed(sm.termination.job_id)

    async def next(self, kind: str, within: float = WAIT_S) -> agent.ServerMessage:
        """The next `ServerMessage` of this kind ("availability", "assignment",
        "termination", "register", "pong")."""
        return await asyncio.wait_for(self._queue(kind).get(), within)

    async def next_offer(self, within: float = WAIT_S) -> agent.Job:
        """The job of the next `AvailabilityRequest`."""
        return (await self.next("availability", within)).availability.job

    async def next_assignment(self, within: float = WAIT_S) -> agent.Job:
        """The job of the next `JobAssignment`."""
        return (await self.next("assignment", within)).assignment.job

    async def next_termination(self, within: float = WAIT_S) -> str:
        """The job id of the next `JobTermination`."""
        return (await self.next("termination", within)).termination.job_id

    def pending(self, kind: str) -> int:
        """Messages of this kind received and not yet taken with `next()`."""
        return self._queue(kind).qsize()

    async def barrier(self) -> None:
        """Round-trip a ping: everything the server sent before has arrived."""
        self._ping += 1
        await self.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=self._ping)))
        while True:
            pong = await self.next("pong")
            if pong.pong.last_timestamp == self._ping:
                return

    # ---------------------------------------------------------------- sending

    async def send(self, msg: agent.WorkerMessage) -> None:
        await self.send_bytes(msg.SerializeToString())

    async def send_bytes(self, data: bytes) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(data)

    async def send_str(self, data: str) -> None:
        assert self._ws is not None
        await self._ws.send_str(data)

    async def accept(self, job_id: str) -> None:
        """Answer an offer: available, as participant `agent-<job id>`."""
        resp = agent.AvailabilityResponse(
            job_id=job_id, available=True, participant_identity=f"agent-{job_id}"
        )
        await self.send(agent.WorkerMessage(availability=resp))

    async def reject(self, job_id: str, *, terminate: bool = True) -> None:
        """Answer an offer: not available; `terminate=False` is a soft refusal
        (offer the job elsewhere), `True` a hard one."""
        resp = agent.AvailabilityResponse(job_id=job_id, available=False, terminate=terminate)
        await self.send(agent.WorkerMessage(availability=resp))

    async def job_status(self, job_id: str, status: agent.JobStatus, error: str = "") -> None:
        """Report a job's status; a SUCCESS or FAILED one leaves `active`."""
        if status in (agent.JobStatus.JS_SUCCESS, agent.JobStatus.JS_FAILED):
            self.active.discard(job_id)
        update = agent.UpdateJobStatus(job_id=job_id, status=status, error=error)
        await self.send(agent.WorkerMessage(update_job=update))

    async def running(self, job_id: str) -> None:
        await self.job_status(job_id, agent.JobStatus.JS_RUNNING)

    async def succeed(self, job_id: str) -> None:
        await self.job_status(job_id, agent.JobStatus.JS_SUCCESS)

    async def fail(self, job_id: str, error: str = "boom") -> None:
        await self.job_status(job_id, agent.JobStatus.JS_FAILED, error)

    async def status(
        self, *, full: bool = False, load: float = 0.0, job_count: int = 0, draining: bool = False
    ) -> None:
        """Send an `UpdateWorkerStatus` (available or full, load, jobs, draining)."""
        ws = agent.WorkerStatus.WS_FULL if full else agent.WorkerStatus.WS_AVAILABLE
        update = agent.UpdateWorkerStatus(
            status=ws, load=load, job_count=job_count, draining=draining
        )
        await self.send(agent.WorkerMessage(update_worker=update))

    async def migrate(self, *job_ids: str) -> None:
        """Ask the server to move these jobs to another worker."""
        await self.send(agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=job_ids)))

    async def take_job(self) -> str:
        """Await the next offer, accept it, await its assignment, report it
        running; returns the job id."""
        job = await self.next_offer()
        await self.accept(job.id)
        assigned = await self.next_assignment()
        assert assigned.id == job.id, (assigned.id, job.id)
        await self.running(job.id)
        return job.id
