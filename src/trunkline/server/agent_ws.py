"""`/agent`: the LiveKit Agents worker protocol over a websocket.

Handshake: the token is checked before the upgrade (a bad one gets HTTP 401,
not an accepted-then-closed socket, which would make a livekit-agents worker
reconnect in a hot loop). After the upgrade the worker sends
`WorkerMessage.register`; the first frame we send is `ServerMessage.register`
with its worker id. From then on every binary frame is one protobuf
`WorkerMessage`, fed to the scheduler through the dispatcher.

A worker may declare its slot cap with the query parameter `max_jobs=N` (the
trunkline SDK does); the pool's `max_jobs_per_worker` caps it too. A replica
token, from the route `/replica/{token}/agent` (the autoscaler gives each
replica its own URL) or the `worker_token` query parameter (livekit-agents
sends `LIVEKIT_WORKER_TOKEN` there), is handed to the dispatcher's worker
observers: the autoscaler uses it to tie a worker to the replica it started.

Anything malformed (a text frame, bytes that are not a `WorkerMessage`, an
oversized frame, a register that never comes) closes that worker's connection
with a logged reason; its jobs follow the worker-loss rules and the server and
the other workers carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError
from livekit.protocol import agent, models

from trunkline import __version__
from trunkline.auth import Authenticator, AuthError
from trunkline.core import AcceptInfo, JobState, UnknownWorker
from trunkline.runtime.dispatcher import Dispatcher, new_id
from trunkline.server.keys import AUTH, DISPATCHER
from trunkline.server.rest import error_response

log = logging.getLogger("trunkline.agent")

MAX_FRAME_BYTES = 1 << 20
REGISTER_TIMEOUT_S = 10.0
HEARTBEAT_S = 15.0

_JOB_STATUS = {
    agent.JobStatus.JS_RUNNING: JobState.RUNNING,
    agent.JobStatus.JS_SUCCESS: JobState.SUCCEEDED,
    agent.JobStatus.JS_FAILED: JobState.FAILED,
}


class ProtocolError(Exception):
    """The worker broke the protocol; the message says how."""


class WorkerConn:
    """One worker's websocket (the dispatcher's `WorkerLink`): frames are sent
    in order by a single writer task."""

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

    def send(self, frame: bytes) -> None:
        self.out.append(frame)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def close(self, message: bytes) -> None:
        await self.ws.close(message=message)

    async def run_writer(self) -> None:
        """Send queued frames until the socket closes (cancel to stop)."""
        loop = asyncio.get_running_loop()
        ws = self.ws
        while not ws.closed:
            while self.out:
                await ws.send_bytes(self.out.popleft())
            self._wake = loop.create_future()
            await self._wake


async def agent_handler(request: web.Request) -> web.StreamResponse:
    dispatcher: Dispatcher = request.app[DISPATCHER]
    authn: Authenticator = request.app[AUTH]
    remote = request.remote or "?"
    try:
        authn.require_agent(request.headers.get("Authorization"))
    except AuthError as exc:
        # Logged (rate-limited, with the reason) by the app's response hook.
        return error_response(exc.http_status, exc.code, exc.message)
    max_jobs: int | None = None
    raw = request.query.get("max_jobs")
    if raw is not None:
        try:
            max_jobs = int(raw)
            if max_jobs < 1:
                raise ValueError
        except ValueError:
            return error_response(
                400, "invalid_argument", f"max_jobs must be an integer >= 1 (got {raw!r})"
            )
    if dispatcher.closing:
        return error_response(503, "unavailable", "server is shutting down")

    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_S, max_msg_size=MAX_FRAME_BYTES, compress=False, autoping=True
    )
    await ws.prepare(request)
    conn = WorkerConn(ws, new_id("AW_"), remote)
    conn.max_jobs = max_jobs
    conn.worker_token = request.match_info.get("token") or request.query.get("worker_token", "")
    writer = asyncio.create_task(conn.run_writer())
    registered = False
    why = "disconnected"
    try:
        await _register(dispatcher, conn)
        registered = True
        why = await _serve(dispatcher, conn)
    except ProtocolError as exc:
        why = f"protocol error: {exc}"
        log.warning(
            "worker connection closed",
            extra={"worker_id": conn.worker_id, "remote": remote, "reason": str(exc)},
        )
        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=str(exc)[:120].encode())
    finally:
        if registered:
            dispatcher.worker_disconnected(conn.worker_id, why)
            log.info(
                "worker disconnected",
                extra={"worker_id": conn.worker_id, "agent_name": conn.agent_name, "why": why},
            )
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    return ws


async def _register(dispatcher: Dispatcher, conn: WorkerConn) -> None:
    try:
        msg = await conn.ws.receive(timeout=REGISTER_TIMEOUT_S)
    except TimeoutError:
        raise ProtocolError(f"no register message within {REGISTER_TIMEOUT_S:g} s") from None
    wm = _decode(msg.type, msg.data)
    if wm is None or wm.WhichOneof("message") != "register":
        raise ProtocolError("first message must be WorkerMessage.register")
    reg = wm.register
    conn.agent_name = reg.agent_name
    reply = agent.ServerMessage(
        register=agent.RegisterWorkerResponse(
            worker_id=conn.worker_id,
            server_info=_server_info(),
        )
    )
    conn.send(reply.SerializeToString())
    w = dispatcher.worker_connected(
        conn, conn.worker_id, reg.agent_name, conn.max_jobs, conn.worker_token
    )
    log.info(
        "worker registered",
        extra={
            "worker_id": conn.worker_id,
            "agent_name": reg.agent_name,
            "capacity": w.capacity,
            "version": reg.version,
            "remote": conn.remote,
        },
    )


def _server_info() -> models.ServerInfo:
    return models.ServerInfo(
        edition=models.ServerInfo.Edition.Standard,
        version=f"trunkline-{__version__}",
        protocol=16,
        agent_protocol=1,
    )


def _decode(kind: WSMsgType, data: object) -> agent.WorkerMessage | None:
    """A WorkerMessage from a frame; None for a close; ProtocolError otherwise."""
    if kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    if kind is WSMsgType.ERROR:
        raise ProtocolError(f"websocket error: {data}")
    if kind is not WSMsgType.BINARY or not isinstance(data, bytes):
        raise ProtocolError(f"expected a binary protobuf frame, got {kind.name}")
    wm = agent.WorkerMessage()
    try:
        wm.ParseFromString(data)
    except DecodeError:
        raise ProtocolError(f"frame of {len(data)} bytes is not a WorkerMessage") from None
    return wm


async def _serve(dispatcher: Dispatcher, conn: WorkerConn) -> str:
    """Read frames until the worker goes; returns why it went."""
    ws = conn.ws
    wid = conn.worker_id
    while True:
        msg = await ws.receive()
        wm = _decode(msg.type, msg.data)
        if wm is None:
            return "disconnected"
        which = wm.WhichOneof("message")
        try:
            if which == "availability":
                a = wm.availability
                accept = None
                if a.available:
                    accept = AcceptInfo(
                        a.participant_identity,
                        a.participant_name,
                        a.participant_metadata,
                        dict(a.participant_attributes),
                    )
                dispatcher.offer_answered(
                    wid, a.job_id, available=a.available, terminate=a.terminate, accept=accept
                )
            elif which == "update_job":
                u = wm.update_job
                state = _JOB_STATUS.get(u.status)
                if state is not None:
                    dispatcher.job_reported(wid, u.job_id, state, u.error)
            elif which == "update_worker":
                ws_ = wm.update_worker
                dispatcher.worker_status(
                    wid,
                    available=(
                        ws_.status == agent.WorkerStatus.WS_AVAILABLE
                        if ws_.HasField("status")
                        else None
                    ),
                    load=ws_.load,
                    draining=ws_.draining,
                    job_count=ws_.job_count,
                )
            elif which == "migrate_job":
                await dispatcher.jobs_migrated(wid, list(wm.migrate_job.job_ids))
            elif which == "ping":
                now_ms = int(time.time() * 1000)
                pong = agent.WorkerPong(last_timestamp=wm.ping.timestamp, timestamp=now_ms)
                conn.send(agent.ServerMessage(pong=pong).SerializeToString())
            elif which == "register":
                raise ProtocolError("register sent twice on one connection")
            else:
                log.debug("worker message ignored", extra={"worker_id": wid, "kind": which})
        except UnknownWorker:
            return "unknown worker"
