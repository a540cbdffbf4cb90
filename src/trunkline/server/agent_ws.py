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
oversized frame, a register that never comes, an agent name `agent_name_problem`
refuses, a migrate naming more jobs than `[server] max_worker_jobs` or an id
over 128 characters, an accept with oversized participant fields) closes that
worker's connection with a logged reason; its jobs follow the worker-loss rules
and the server and the other workers carry on.

Bounds on what a worker holding a valid token can make the server keep:
`max_jobs` is at most `[server] max_worker_jobs` (else HTTP 400 at the
upgrade); a status report's load must be a finite number (NaN and infinities
are ignored, the last valid load kept; finite values are clamped to [0, 1]);
job errors are cut to 2 KiB; frames queued for a worker that does not read
its socket are limited to `[server] worker_outbound_limit_bytes`, past which
the connection is dropped (its jobs follow the worker-loss rules).

Identity across reconnects (`_identity`): a reconnecting worker gets a new
worker id, so what ties it to the jobs it lost is what it authenticated and
declared: the API key that signed its token plus the token's identity, its
`worker_token` and the register's `instance_id`; a worker that declares none
of those is told apart by its remote address. Only that identity may migrate
an orphaned job back (docs/semantics.md, rule 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from typing import Protocol

import jwt
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError
from livekit.api.access_token import Claims
from livekit.protocol import agent, models

from trunkline import __version__
from trunkline.auth import Authenticator, AuthError
from trunkline.core import AcceptInfo, JobState, UnknownWorker, agent_name_problem
from trunkline.runtime.dispatcher import Dispatcher, new_id
from trunkline.server.keys import AUTH, DISPATCHER
from trunkline.server.rest import MAX_ROOM_BYTES, dispatch_problem, error_response, over_utf8

log = logging.getLogger("trunkline.agent")

MAX_FRAME_BYTES = 1 << 20
REGISTER_TIMEOUT_S = 10.0
HEARTBEAT_S = 15.0
MAX_JOB_ID_CHARS = 128  # ids are ours ("AJ_" + 12) or LiveKit's; nothing longer is a job
MAX_ERROR_CHARS = 2048  # a failed job's error, as kept in its reason
# Per queued frame, on top of its bytes: the deque slot and the bytes object.
_FRAME_OVERHEAD = 64

_JOB_STATUS = {
    agent.JobStatus.JS_RUNNING: JobState.RUNNING,
    agent.JobStatus.JS_SUCCESS: JobState.SUCCEEDED,
    agent.JobStatus.JS_FAILED: JobState.FAILED,
}


class ProtocolError(Exception):
    """The worker broke the protocol; the message says how."""


class WorkerRelay(Protocol):
    """Cluster mode (server/relay.py): a worker whose pool another member
    owns is piped to that member instead of registering here."""

    def wants(self, agent_name: str) -> bool: ...

    async def pipe(
        self, request: web.Request, conn: WorkerConn, agent_name: str, register: bytes
    ) -> str: ...


WORKER_RELAY = web.AppKey("worker_relay", WorkerRelay)


class _Relayed(Exception):
    """Raised by `_register` when the worker goes to the pool's owner."""

    def __init__(self, agent_name: str, register: bytes) -> None:
        super().__init__(agent_name)
        self.agent_name = agent_name
        self.register = register


class WorkerConn:
    """One worker's websocket (the dispatcher's `WorkerLink`): frames are sent
    in order by a single writer task. At most `limit` bytes wait in `out`: a
    worker that stops reading its socket is cut off (`why` says so), not
    buffered for without end."""

    __slots__ = (
        "_wake",
        "agent_name",
        "limit",
        "max_jobs",
        "out",
        "out_bytes",
        "remote",
        "transport",
        "warned_load",
        "why",
        "worker_id",
        "worker_token",
        "ws",
    )

    def __init__(
        self, ws: web.WebSocketResponse, worker_id: str, remote: str, limit: int = 4 << 20
    ) -> None:
        self.ws = ws
        self.worker_id = worker_id
        self.remote = remote
        self.agent_name = ""
        self.max_jobs: int | None = None
        self.worker_token = ""  # `worker_token` query parameter (replica identity)
        self.out: deque[bytes] = deque()
        self.out_bytes = 0  # queued in `out`, with `_FRAME_OVERHEAD` per frame
        self.limit = limit
        self.transport: asyncio.Transport | None = None  # dropped on overflow
        self.why = ""  # why the server cut the connection, if it did
        self.warned_load = False
        self._wake: asyncio.Future[None] | None = None

    def send(self, frame: bytes) -> None:
        if self.why:
            return  # cut off: nothing more goes out
        self.out_bytes += len(frame) + _FRAME_OVERHEAD
        if self.out_bytes > self.limit:
            self._cut_off()
            return
        self.out.append(frame)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _cut_off(self) -> None:
        """The worker is not reading: drop what is queued and the connection
        (no close frame: it could not get through either). The reader sees
        the socket go and the worker-loss rules apply."""
        self.why = f"not reading its socket: over {self.limit} bytes queued for it"
        log.warning(
            "worker connection cut off",
            extra={"worker_id": self.worker_id, "remote": self.remote, "reason": self.why},
        )
        self.out.clear()
        self.out_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    async def close(self, message: bytes) -> None:
        await self.ws.close(message=message)

    async def run_writer(self) -> None:
        """Send queued frames until the socket closes (cancel to stop)."""
        loop = asyncio.get_running_loop()
        ws = self.ws
        out = self.out
        try:
            while not ws.closed:
                while out:
                    frame = out.popleft()
                    self.out_bytes -= len(frame) + _FRAME_OVERHEAD
                    await ws.send_bytes(frame)
                self._wake = loop.create_future()
                await self._wake
        except ConnectionError:
            return  # the connection went; the reader sees it too


async def agent_handler(request: web.Request) -> web.StreamResponse:
    dispatcher: Dispatcher = request.app[DISPATCHER]
    authn: Authenticator = request.app[AUTH]
    remote = request.remote or "?"
    try:
        claims = authn.require_agent(request.headers.get("Authorization"))
    except AuthError as exc:
        # Logged (rate-limited, with the reason) by the app's response hook.
        return error_response(exc.http_status, exc.code, exc.message)
    server = dispatcher.config.server
    max_jobs: int | None = None
    raw = request.query.get("max_jobs")
    if raw is not None:
        ceiling = server.max_worker_jobs
        try:
            max_jobs = int(raw)
            if not 1 <= max_jobs <= ceiling:
                raise ValueError
        except ValueError:
            return error_response(
                400,
                "invalid_argument",
                f"max_jobs must be an integer from 1 to {ceiling} (got {raw[:20]!r}); "
                "the ceiling is the server's [server] max_worker_jobs",
            )
    worker_token = request.match_info.get("token") or request.query.get("worker_token", "")
    if len(worker_token) > MAX_ROOM_BYTES:
        return error_response(
            400, "invalid_argument", f"worker_token exceeds {MAX_ROOM_BYTES} characters"
        )
    if dispatcher.closing:
        return error_response(503, "unavailable", "server is shutting down")

    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_S, max_msg_size=MAX_FRAME_BYTES, compress=False, autoping=True
    )
    await ws.prepare(request)
    conn = WorkerConn(ws, new_id("AW_"), remote, server.worker_outbound_limit_bytes)
    conn.transport = request.transport
    conn.max_jobs = max_jobs
    conn.worker_token = worker_token
    writer = asyncio.create_task(conn.run_writer())
    registered = False
    why = "disconnected"
    relay = request.app.get(WORKER_RELAY)
    try:
        try:
            await _register(dispatcher, conn, _signer(request), claims, relay)
        except _Relayed as r:
            assert relay is not None
            why = await relay.pipe(request, conn, r.agent_name, r.register)
            return ws
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
        why = conn.why or why
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


def _signer(request: web.Request) -> str:
    """The API key that signed the (already verified) token: its `iss`."""
    _, _, token = request.headers.get("Authorization", "").partition(" ")
    try:
        iss = jwt.decode(token.strip(), options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return ""
    return iss if isinstance(iss, str) else ""


def _identity(key: str, claims: Claims, conn: WorkerConn, instance_id: str) -> str:
    """Who this worker is across reconnects (see the module docstring)."""
    declared = (claims.identity or "", conn.worker_token, instance_id)
    if any(declared):
        return "\x1f".join(("key", key, *declared))
    return "\x1f".join(("addr", key, conn.remote))


async def _register(
    dispatcher: Dispatcher,
    conn: WorkerConn,
    key: str,
    claims: Claims,
    relay: WorkerRelay | None = None,
) -> None:
    try:
        msg = await conn.ws.receive(timeout=REGISTER_TIMEOUT_S)
    except TimeoutError:
        raise ProtocolError(f"no register message within {REGISTER_TIMEOUT_S:g} s") from None
    wm = _decode(msg.type, msg.data)
    if wm is None or wm.WhichOneof("message") != "register":
        raise ProtocolError("first message must be WorkerMessage.register")
    reg = wm.register
    problem = agent_name_problem(reg.agent_name)
    if problem is not None:
        raise ProtocolError(problem)
    if len(reg.instance_id) > MAX_ROOM_BYTES:
        raise ProtocolError(f"instance_id exceeds {MAX_ROOM_BYTES} characters")
    conn.agent_name = reg.agent_name
    if relay is not None and relay.wants(reg.agent_name):
        raise _Relayed(reg.agent_name, msg.data)  # the owner answers the register
    reply = agent.ServerMessage(
        register=agent.RegisterWorkerResponse(
            worker_id=conn.worker_id,
            server_info=_server_info(),
        )
    )
    conn.send(reply.SerializeToString())
    w = dispatcher.worker_connected(
        conn,
        conn.worker_id,
        reg.agent_name,
        conn.max_jobs,
        conn.worker_token,
        _identity(key, claims, conn, reg.instance_id),
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
                _answer(dispatcher, wid, wm.availability)
            elif which == "update_job":
                u = wm.update_job
                state = _JOB_STATUS.get(u.status)
                if state is not None:
                    dispatcher.job_reported(wid, u.job_id, state, u.error[:MAX_ERROR_CHARS])
            elif which == "update_worker":
                _status(dispatcher, conn, wm.update_worker)
            elif which == "migrate_job":
                await dispatcher.jobs_migrated(wid, _migrate_ids(dispatcher, wm.migrate_job))
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


def _answer(dispatcher: Dispatcher, wid: str, a: agent.AvailabilityResponse) -> None:
    accept = None
    if a.available:
        attributes = dict(a.participant_attributes)
        # The participant fields go into the job's room token: REST's bounds.
        problem = dispatch_problem("", "", a.participant_metadata, attributes)
        for what, value in (("identity", a.participant_identity), ("name", a.participant_name)):
            if over_utf8(value, MAX_ROOM_BYTES):
                problem = f"{what} exceeds {MAX_ROOM_BYTES} bytes"
        if problem is not None:
            raise ProtocolError(f"AvailabilityResponse participant: {problem}")
        accept = AcceptInfo(
            a.participant_identity, a.participant_name, a.participant_metadata, attributes
        )
    dispatcher.offer_answered(
        wid, a.job_id, available=a.available, terminate=a.terminate, accept=accept
    )


def _status(dispatcher: Dispatcher, conn: WorkerConn, u: agent.UpdateWorkerStatus) -> None:
    """A status report. The load must be a number: NaN or an infinity is not
    one and is ignored (the last valid load stays; logged once per
    connection); a finite load outside [0, 1] is clamped (a custom load
    function's 1.3 means overloaded, as LiveKit reads it)."""
    load = u.load
    if not math.isfinite(load):
        if not conn.warned_load:
            conn.warned_load = True
            log.warning(
                "worker load ignored",
                extra={"worker_id": conn.worker_id, "load": str(load), "why": "not finite"},
            )
        w = dispatcher.worker(conn.worker_id)
        load = w.load if w is not None else 0.0
    load = min(1.0, max(0.0, load))
    dispatcher.worker_status(
        conn.worker_id,
        available=u.status == agent.WorkerStatus.WS_AVAILABLE if u.HasField("status") else None,
        load=load,
        draining=u.draining,
        job_count=u.job_count,
    )


def _migrate_ids(dispatcher: Dispatcher, m: agent.MigrateJobRequest) -> list[str]:
    """The ids a migrate names, within bounds (else ProtocolError): a worker
    runs at most `[server] max_worker_jobs` jobs, and no id is that long."""
    ids = list(m.job_ids)
    limit = dispatcher.config.server.max_worker_jobs
    if len(ids) > limit:
        raise ProtocolError(f"MigrateJobRequest names {len(ids)} jobs; at most {limit} allowed")
    if any(len(i) > MAX_JOB_ID_CHARS for i in ids):
        raise ProtocolError(f"MigrateJobRequest names a job id over {MAX_JOB_ID_CHARS} characters")
    return ids
