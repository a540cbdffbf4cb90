"""The server side of the LiveKit worker protocol, just enough to drive the SDK.

Protocol-level tests use it to see every frame the worker sends and to send
offers, assignments and terminations at will; behaviour against trunkline's
real scheduler is tested in test_worker_server.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from livekit import api
from livekit.protocol import agent, models
from support import KEY, SECRET  # the same key as the real servers of tests/support.py


class Session:
    """One registered worker connection."""

    def __init__(self, ws: web.WebSocketResponse, query: dict[str, str], worker_id: str) -> None:
        self.ws = ws
        self.query = query
        self.worker_id = worker_id
        self.register: agent.RegisterWorkerRequest | None = None
        self.received: list[agent.WorkerMessage] = []
        self.closed = False

    def of(self, kind: str) -> list[Any]:
        """Received messages of one kind (`availability`, `update_job`, ...), in order."""
        return [getattr(m, kind) for m in self.received if m.WhichOneof("message") == kind]

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("message")) for m in self.received]

    def answer(self, job_id: str) -> agent.AvailabilityResponse | None:
        return next((a for a in self.of("availability") if a.job_id == job_id), None)

    def job_statuses(self, job_id: str) -> list[agent.UpdateJobStatus]:
        return [u for u in self.of("update_job") if u.job_id == job_id]

    async def send(self, msg: agent.ServerMessage) -> None:
        await self.ws.send_bytes(msg.SerializeToString())

    async def offer(self, job: agent.Job) -> None:
        await self.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))

    async def assign(self, job: agent.Job, url: str = "", token: str = "") -> None:
        await self.send(
            agent.ServerMessage(assignment=agent.JobAssignment(job=job, url=url, token=token))
        )

    async def terminate(self, job_id: str) -> None:
        await self.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job_id)))


class FakeServer:
    """An aiohttp `/agent` endpoint on 127.0.0.1 with a random port."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.attempts: list[tuple[float, int]] = []  # (monotonic time, HTTP status)
        self.refuse_auth = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_get("/agent", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.sessions:
            await s.ws.close()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        try:
            claims = api.TokenVerifier(KEY, SECRET).verify(header.removeprefix("Bearer "))
            ok = bool(claims.video and claims.video.agent) and not self.refuse_auth
        except Exception:
            ok = False
        if not ok:
            self.attempts.append((time.monotonic(), 401))
            return web.Response(status=401, text="unauthorized")
        self.attempts.append((time.monotonic(), 101))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = Session(ws, dict(request.query), f"AW_fake{len(self.sessions)}")
        first = await ws.receive()
        reg = agent.WorkerMessage()
        reg.ParseFromString(first.data)
        session.register = reg.register
        await session.send(
            agent.ServerMessage(
                register=agent.RegisterWorkerResponse(
                    worker_id=session.worker_id, server_info=models.ServerInfo(version="fake")
                )
            )
        )
        self.sessions.append(session)
        async for frame in ws:
            if frame.type == WSMsgType.BINARY:
                msg = agent.WorkerMessage()
                msg.ParseFromString(frame.data)
                session.received.append(msg)
        session.closed = True
        return ws

    @property
    def last(self) -> Session:
        return self.sessions[-1]


async def wait_for(predicate: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    """Poll `predicate` every 10 ms until truthy; TimeoutError after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s: {what or predicate}")
        await asyncio.sleep(0.01)


def make_job(job_id: str, metadata: str = "", room: str = "") -> agent.Job:
    return agent.Job(
        id=job_id,
        type=agent.JobType.JT_ROOM,
        room=models.Room(name=room or f"room-{job_id}"),
        metadata=metadata,
        agent_name="tester",
    )
