"""A protocol-level worker for tests: an aiohttp websocket client speaking the
LiveKit Agents worker protocol (`livekit.protocol.agent` messages) to `/agent`.

It registers, answers each offer as its `answer` policy says, reports accepted
jobs RUNNING when their assignment arrives, and ends them when the test calls
`finish()` (or when the server terminates them). Everything it saw is kept in
`offers`, `assigned` and `running` for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

import aiohttp
from livekit.protocol import agent

from trunkline.auth import agent_token

Answer = Literal["accept", "reject", "refuse", "ignore"]


class ProtoWorker:
    """One worker connection. `await start()` returns once registered."""

    def __init__(
        self,
        ws_url: str,
        agent_name: str = "",
        *,
        key: str = "devkey",
        secret: str = "secret",
        max_jobs: int | None = None,
        answer: Answer | Callable[[agent.Job], Answer] = "accept",
    ) -> None:
        self.url = ws_url.rstrip("/") + "/agent"
        if max_jobs is not None:
            self.url += f"?max_jobs={max_jobs}"
        self.agent_name = agent_name
        self.token = agent_token(key, secret)
        self.answer = answer
        self.worker_id = ""
        self.offers: list[str] = []
        self.assigned: list[str] = []
        self.running: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> str:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}"}
        )
        reg = agent.RegisterWorkerRequest(
            type=agent.JobType.JT_ROOM, agent_name=self.agent_name, version="protoworker"
        )
        await self._send(agent.WorkerMessage(register=reg))
        msg = await self._ws.receive(timeout=10)
        sm = agent.ServerMessage()
        sm.ParseFromString(msg.data)
        assert sm.WhichOneof("message") == "register", sm
        self.worker_id = sm.register.worker_id
        self._reader = asyncio.create_task(self._read())
        return self.worker_id

    async def _send(self, msg: agent.WorkerMessage) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(msg.SerializeToString())

    def _policy(self, job: agent.Job) -> Answer:
        return self.answer(job) if callable(self.answer) else self.answer

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            sm = agent.ServerMessage()
            sm.ParseFromString(msg.data)
            which = sm.WhichOneof("message")
            if which == "availability":
                job = sm.availability.job
                self.offers.append(job.id)
                decision = self._policy(job)
                if decision == "ignore":
                    continue
                resp = agent.AvailabilityResponse(
                    job_id=job.id,
                    available=decision == "accept",
                    terminate=decision == "reject",
                    participant_identity=f"agent-{job.id}",
                )
                await self._send(agent.WorkerMessage(availability=resp))
            elif which == "assignment":
                job_id = sm.assignment.job.id
                self.assigned.append(job_id)
                self.running.add(job_id)
                await self._status(job_id, agent.JobStatus.JS_RUNNING)
            elif which == "termination":
                await self.finish(sm.termination.job_id)

    async def _status(self, job_id: str, status: agent.JobStatus.ValueType) -> None:
        await self._send(
            agent.WorkerMessage(update_job=agent.UpdateJobStatus(job_id=job_id, status=status))
        )

    async def finish(self, job_id: str, ok: bool = True) -> None:
        """End a running job with success (or failure when `ok` is false)."""
        self.running.discard(job_id)
        status = agent.JobStatus.JS_SUCCESS if ok else agent.JobStatus.JS_FAILED
        await self._status(job_id, status)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None:
            await self._session.close()
