"""A scriptable protocol-level worker for server integration tests.

An aiohttp websocket client speaking the LiveKit Agents worker protocol
(`livekit.protocol.agent` messages) to `/agent`. Unlike a real worker it decides
nothing by itself unless told to: every `ServerMessage` it receives is put on an
asyncio queue (`next()`, `next_offer()`, ...) so a test can await exactly the
step it expects, then answer with `accept()`, `reject()`, `running()`,
`succeed()`, `migrate()`... An `auto` policy ("accept", "reject", "refuse",
"ignore") answers offers on its own, and `auto_run` reports assigned jobs
RUNNING, for tests that only need a well-behaved worker.

`barrier()` sends a `WorkerPing` and waits for its pong: the server handles one
connection's frames in order and sends through one ordered writer, so anything
the server meant to send in reply to earlier frames has arrived by then. It is
how a test shows that something did *not* happen without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import aiohttp
from livekit.protocol import agent

from trunkline.auth import agent_token

Policy = Literal["accept", "reject", "refuse", "ignore"]

KEY, SECRET = "devkey", "secret"
WAIT_S = 5.0  # how long a test waits for a message it expects
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
        auto: Policy | None = None,
        auto_run: bool = False,
    ) -> None:
        self.url = base_url.rstrip("/") + "/agent"
        if max_jobs is not None:
            self.url += f"?max_jobs={max_jobs}"
        self.agent_name = agent_name
        self.token = agent_token(KEY, SECRET) if token is None else token
        self.auto = auto
        self.auto_run = auto_run
        self.worker_id = ""
        self.received: list[agent.ServerMessage] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._queues: dict[str, asyncio.Queue[agent.ServerMessage]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ping = 0

    # ------------------------------------------------------------- connection

    async def open(self) -> None:
        """Open the websocket (no register yet)."""
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}"}, autoping=True
        )
        self._reader = asyncio.create_task(self._read())

    async def connect(self) -> str:
        """Open, register, and wait for the server's `register` reply."""
        await self.open()
        await self.register()
        reply = await self.next("register")
        self.worker_id = reply.register.worker_id
        return self.worker_id

    async def register(self) -> None:
        reg = agent.RegisterWorkerRequest(
            type=agent.JobType.JT_ROOM, agent_name=self.agent_name, version="protoworker"
        )
        await self.send(agent.WorkerMessage(register=reg))

    async def close(self) -> None:
        """Close the socket and the session (idempotent)."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None and not self._session.closed:
            await self._session.close()

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
                self._queue(kind).put_nowait(sm)
                await self._react(kind, sm)
        finally:
            self.close_code = ws.close_code
            self.closed.set()

    async def _react(self, kind: str, sm: agent.ServerMessage) -> None:
        if kind == "availability" and self.auto is not None and self.auto != "ignore":
            job_id = sm.availability.job.id
            if self.auto == "accept":
                await self.accept(job_id)
            else:
                await self.reject(job_id, terminate=self.auto == "reject")
        elif kind == "assignment" and self.auto_run:
            await self.running(sm.assignment.job.id)

    async def next(self, kind: str, within: float = WAIT_S) -> agent.ServerMessage:
        """The next `ServerMessage` of this kind ("availability", "assignment",
        "termination", "register", "pong")."""
        return await asyncio.wait_for(self._queue(kind).get(), within)

    async def next_offer(self, within: float = WAIT_S) -> agent.Job:
        return (await self.next("availability", within)).availability.job

    async def next_assignment(self, within: float = WAIT_S) -> agent.Job:
        return (await self.next("assignment", within)).assignment.job

    async def next_termination(self, within: float = WAIT_S) -> str:
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
        resp = agent.AvailabilityResponse(
            job_id=job_id, available=True, participant_identity=f"agent-{job_id}"
        )
        await self.send(agent.WorkerMessage(availability=resp))

    async def reject(self, job_id: str, *, terminate: bool = True) -> None:
        resp = agent.AvailabilityResponse(job_id=job_id, available=False, terminate=terminate)
        await self.send(agent.WorkerMessage(availability=resp))

    async def job_status(
        self, job_id: str, status: agent.JobStatus.ValueType, error: str = ""
    ) -> None:
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
        ws = agent.WorkerStatus.WS_FULL if full else agent.WorkerStatus.WS_AVAILABLE
        update = agent.UpdateWorkerStatus(
            status=ws, load=load, job_count=job_count, draining=draining
        )
        await self.send(agent.WorkerMessage(update_worker=update))

    async def migrate(self, *job_ids: str) -> None:
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
