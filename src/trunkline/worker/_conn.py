"""Opening one worker session: URL, credentials, registration handshake.

Theory of operation: a session is one websocket to `<url>/agent` (http→ws
scheme, any path prefix kept) carrying `Authorization: Bearer <JWT>` (HS256,
issuer = API key, grant `video.agent = true`, minted fresh per attempt). The
worker's capacity travels in the URL: query parameter `max_jobs=<N>`. A
trunkline server reads it and treats N as the worker's hard slot cap; a LiveKit
server ignores unknown query parameters, so the same worker runs against both.
The worker sends `WorkerMessage.register` first and the session is usable once
the first server frame, which must be `ServerMessage.register`, has arrived.
Liveness is the websocket's own ping/pong (aiohttp `heartbeat=`): the worker
sends no protocol-level pings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import urllib.parse
import warnings

import aiohttp
from livekit.protocol import agent

# How long the server may take to answer `register` before the attempt counts as failed.
REGISTER_TIMEOUT_S = 10.0


class ProtocolError(Exception):
    """The server broke the worker protocol (e.g. first frame not `register`)."""


class AuthRefused(Exception):
    """The server refused the credentials at the websocket upgrade (HTTP 401/403)."""

    def __init__(self, status: int) -> None:
        super().__init__(
            f"server refused the worker's credentials (HTTP {status}); check "
            "api_key/api_secret (LIVEKIT_API_KEY/LIVEKIT_API_SECRET) match the server's"
        )
        self.status = status


def agent_url(ws_url: str, max_jobs: int) -> str:
    """The `/agent` websocket URL for `ws_url`, declaring `max_jobs` as a query parameter.

    `http(s)://` becomes `ws(s)://`; a path prefix is kept (`https://h/lk` →
    `wss://h/lk/agent`); existing query parameters are kept and `max_jobs`
    replaces any previous value. `$LIVEKIT_WORKER_TOKEN`, when set, is sent as
    `worker_token` (the replica identity trunkline's autoscaler matches).
    """
    parts = urllib.parse.urlsplit(ws_url)
    scheme = parts.scheme
    if scheme in ("http", "https"):
        scheme = "ws" + scheme[4:]
    if scheme not in ("ws", "wss"):
        raise ValueError(f"worker URL must be http(s):// or ws(s)://, got {ws_url!r}")
    path = parts.path.rstrip("/") + "/agent"
    # Replica identity, as livekit-agents sends it: trunkline's autoscaler sets
    # LIVEKIT_WORKER_TOKEN for each replica it starts and matches it on register.
    token = os.environ.get("LIVEKIT_WORKER_TOKEN")
    replaced = ("max_jobs", "worker_token") if token else ("max_jobs",)
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k not in replaced
    ]
    query.append(("max_jobs", str(max_jobs)))
    if token:
        query.append(("worker_token", token))
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))


def mint_token(api_key: str, api_secret: str) -> str:
    """A worker JWT (grant `video.agent = true`) for one connection attempt."""
    from jwt.warnings import InsecureKeyLengthWarning
    from livekit import api  # ~0.1 s of imports on top of aiohttp; only when connecting

    token = api.AccessToken(api_key, api_secret).with_grants(api.VideoGrants(agent=True))
    with warnings.catch_warnings():
        # Short secrets (LiveKit's dev secret is 6 bytes) are the server's policy to
        # judge; the warning would repeat on every reconnect.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return token.to_jwt()


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """A registered session: the websocket and the id the server gave the worker."""

    ws: aiohttp.ClientWebSocketResponse
    worker_id: str


async def open_session(
    session: aiohttp.ClientSession,
    *,
    url: str,
    token: str,
    heartbeat: float,
    agent_name: str,
    version: str,
) -> Registration:
    """Connect and register; raises `AuthRefused`, `ProtocolError`, `aiohttp.ClientError`,
    `OSError` or `TimeoutError`. On error the websocket is closed."""
    try:
        ws = await session.ws_connect(
            url,
            headers={"Authorization": f"Bearer {token}"},
            heartbeat=heartbeat,
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise AuthRefused(exc.status) from None
        raise
    try:
        msg = agent.WorkerMessage()
        msg.register.type = agent.JobType.JT_ROOM
        msg.register.agent_name = agent_name
        msg.register.version = version
        await ws.send_bytes(msg.SerializeToString())
        frame = await asyncio.wait_for(ws.receive(), REGISTER_TIMEOUT_S)
        if frame.type != aiohttp.WSMsgType.BINARY:
            raise ProtocolError(
                f"expected a binary register frame, got {frame.type.name} "
                f"(close code {ws.close_code})"
            )
        reply = agent.ServerMessage()
        reply.ParseFromString(frame.data)
        if reply.WhichOneof("message") != "register":
            raise ProtocolError(
                f"first server message must be register, got {reply.WhichOneof('message')}"
            )
        return Registration(ws=ws, worker_id=reply.register.worker_id)
    except BaseException:
        await ws.close()
        raise
