"""Cluster mode: what a member does with work for a pool another member owns.

Workers (`WorkerPipe`, the `/agent` endpoint's `WorkerRelay`): a worker
registering here for a pool this member does not own is piped, frame for
frame, to the owner's `/agent` (same path and query, same token): the owner
answers its register, and from then on the owner's scheduler drives it
like any worker of its own. Every frame coming back is checked against this
member's view of the pool's lease: once the view shows another owner or
epoch than the one the pipe was opened to, the pipe stops (that frame and
the rest are dropped: a second fence, besides the owner's own clock bound)
and the worker's connection is closed, so it reconnects and migrates its
running jobs to the new owner (docs/semantics.md rule 7). The owner gone
(its socket closed) closes the worker's connection the same way. A worker
registering while no owner can be reached (during a take-over) is held
until there is one (`WorkerPipe.pipe`), not turned away. A
connection that is itself a relay (header `X-Trunkline-Relay`) is never
relayed again (no loops while members' views differ).

API requests (`forward`): a request a member refused with `not_pool_owner`
is sent on once to the owner's URL (method, path, query, body and
`Authorization`, `Content-Type`, `Idempotency-Key` headers) and the owner's
answer is returned as is; an owner that cannot be reached gives `503
cluster_unavailable`. A forwarded request is never forwarded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from trunkline.runtime.cluster import ClusterNode

# agent_ws's frame limit (not imported: agent_ws -> rest -> relay would cycle)
MAX_FRAME_BYTES = 1 << 20


class WorkerConn(Protocol):
    """The part of `agent_ws.WorkerConn` a pipe uses."""

    @property
    def ws(self) -> web.WebSocketResponse: ...

    def send(self, frame: bytes) -> None: ...


log = logging.getLogger("trunkline.cluster")

RELAY_HEADER = "X-Trunkline-Relay"
FORWARD_HEADER = "X-Trunkline-Forwarded"
REPLAYED_HEADER = "Idempotent-Replayed"
_FORWARD_HEADERS = ("Authorization", "Content-Type", "Accept", "Idempotency-Key")
FORWARD_TIMEOUT_S = 30.0
# One client session per app for forwarding (kept-alive connections to the
# owners), made by setup_cluster at startup.
FORWARD_SESSION = web.AppKey("forward_session", aiohttp.ClientSession)

__all__ = ["FORWARD_HEADER", "RELAY_HEADER", "WorkerPipe", "forward"]


def _ws_url(http_url: str) -> str:
    if http_url.startswith("https://"):
        return "wss://" + http_url[len("https://") :]
    if http_url.startswith("http://"):
        return "ws://" + http_url[len("http://") :]
    return http_url


class WorkerPipe:
    """See the module docstring; `fenced` counts frames dropped at the relay."""

    def __init__(self, node: ClusterNode, hold_s: float | None = None) -> None:
        self._node = node
        # Long enough for a dead owner's lease to run out and be taken.
        self.hold_s = 3 * node.ttl_s if hold_s is None else hold_s
        self.fenced = 0
        self.piped = 0  # connections piped so far

    def wants(self, agent_name: str) -> bool:
        if self._node.may_act(agent_name):
            return False
        self._node.want(agent_name)
        return True

    def _target(self, pool: str) -> tuple[str, int, str] | None:
        """The pool's owner now as (member, epoch, url): this member while it
        may act (its view may lag its own take-over), else the view's."""
        node = self._node
        if node.may_act(pool):
            return node.member, node.epoch(pool), node.url
        lease = node.lease_of(pool)
        url = node.owner_url(pool)
        if lease is None or not url or lease.member == node.member:
            return None
        return lease.member, lease.epoch, url

    async def pipe(
        self, request: web.Request, conn: WorkerConn, agent_name: str, register: bytes
    ) -> str:
        """Pipe the worker to the pool's owner until either side goes. With
        no owner reachable (none known, or the known one refuses connections:
        it just died) the register is held, for up to `hold_s`, until an owner
        is there: a worker that reconnects during a take-over is served at
        its first attempt, not after its client's back-off. If this member
        becomes the owner meanwhile it pipes the worker to itself."""
        node = self._node
        if request.headers.get(RELAY_HEADER):
            await conn.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"relayed twice")
            return "relayed twice"
        headers = {
            "Authorization": request.headers.get("Authorization", ""),
            RELAY_HEADER: node.member,
        }
        deadline = node.clock() + self.hold_s
        failed: tuple[str, int] | None = None
        why = "no owner known"
        while True:
            target = self._target(agent_name)
            if target is not None and target[:2] != failed:
                got = await self._pipe_to(request, conn, agent_name, register, target, headers)
                if got is not None:
                    return got
                failed, why = target[:2], "owner unreachable"
            if node.clock() >= deadline or conn.ws.closed:
                await conn.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=why.encode())
                return why
            await asyncio.sleep(node.tick_s)  # not a test's sleep: waiting for a new owner

    async def _pipe_to(
        self,
        request: web.Request,
        conn: WorkerConn,
        agent_name: str,
        register: bytes,
        target: tuple[str, int, str],
        headers: dict[str, str],
    ) -> str | None:
        """Pipe to `target` until either side goes (why), or None if it
        could not be reached."""
        owner, epoch, url = target
        async with aiohttp.ClientSession() as session:
            try:
                up = await session.ws_connect(
                    _ws_url(url) + request.path_qs,
                    headers=headers,
                    max_msg_size=MAX_FRAME_BYTES,
                    heartbeat=15.0,
                    compress=0,
                )
            except (aiohttp.ClientError, OSError):
                return None
            self.piped += 1
            try:
                await up.send_bytes(register)
                down = asyncio.ensure_future(self._down(up, conn, agent_name, owner, epoch))
                upward = asyncio.ensure_future(self._up(conn, up))
                done, pending = await asyncio.wait(
                    {down, upward}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                why: str = next(iter(done)).result()
            finally:
                await up.close()
        if not conn.ws.closed:
            await conn.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=why.encode()[:120])
        log.info(
            "relayed worker gone", extra={"worker_pool": agent_name, "owner": owner, "why": why}
        )
        return why

    async def _down(
        self,
        up: aiohttp.ClientWebSocketResponse,
        conn: WorkerConn,
        pool: str,
        owner: str,
        epoch: int,
    ) -> str:
        """Owner -> worker, each frame fenced by our view of the lease."""
        async for msg in up:
            if msg.type is not WSMsgType.BINARY:
                break
            cur = self._target(pool)
            if cur is None or cur[0] != owner or cur[1] != epoch:
                self.fenced += 1
                return "pool owner changed"
            conn.send(msg.data)
        return "owner connection closed"

    async def _up(self, conn: WorkerConn, up: aiohttp.ClientWebSocketResponse) -> str:
        """Worker -> owner, as they come."""
        while True:
            msg = await conn.ws.receive()
            if msg.type is WSMsgType.BINARY:
                await up.send_bytes(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "disconnected"
            else:
                return f"worker sent {msg.type.name}"


async def forward(request: web.Request, owner_url: str) -> web.StreamResponse | None:
    """The owner's answer to `request`, or None when it must not be
    forwarded (it was forwarded already). Raises nothing: an unreachable
    owner is a 503 `cluster_unavailable`."""
    if request.headers.get(FORWARD_HEADER):
        return None
    body = await request.read()
    headers = {h: request.headers[h] for h in _FORWARD_HEADERS if h in request.headers}
    headers[FORWARD_HEADER] = "1"
    timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)
    session = request.app.get(FORWARD_SESSION)
    try:
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await _send(own, request, owner_url, body, headers, timeout)
        return await _send(session, request, owner_url, body, headers, timeout)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return web.json_response(
            {
                "code": "cluster_unavailable",
                "message": f"the pool's owner at {owner_url} did not answer "
                f"({type(exc).__name__}); retry with the same Idempotency-Key",
            },
            status=503,
        )


async def _send(
    session: aiohttp.ClientSession,
    request: web.Request,
    owner_url: str,
    body: bytes,
    headers: dict[str, str],
    limit: aiohttp.ClientTimeout,
) -> web.Response:
    async with session.request(
        request.method, owner_url + request.path_qs, data=body, headers=headers, timeout=limit
    ) as r:
        payload = await r.read()
        back = {"Content-Type": r.headers.get("Content-Type", "application/json")}
        if REPLAYED_HEADER in r.headers:  # the owner answered a retry (Idempotency-Key)
            back[REPLAYED_HEADER] = r.headers[REPLAYED_HEADER]
        return web.Response(status=r.status, body=payload, headers=back)
