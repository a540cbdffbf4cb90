"""`Session`: the worker's link to the server, one websocket at a time.

Theory of operation: `run()` keeps one registered session up (see `_conn` for
the handshake) and reconnects with jittered, capped exponential backoff
(`_policy.Backoff`) when it is lost. The backoff resets only after a session
stayed up for `_STABLE_SESSION_S`, so a server that accepts and then drops
cannot cause a hot loop, and a refused login (HTTP 401) backs off the same
way. After `max_retry` failed attempts in a row `run()` raises
`ConnectionError`; after `stop_reconnecting()` it returns once the current
session ends (or at once, if none is up).

The session knows nothing of offers or jobs. Its owner gets four callbacks,
all run on the event loop:

- `on_registered()` after each registration, once `worker_id`, `session_no`
  and `connected` describe the new session and before any server frame is
  read or queued message written: the place to queue what must go first
  (`send_first`) and the worker's status.
- `on_message(msg)` for each server frame, in order; a frame that does not
  decode is logged and skipped (one bad frame must not end the session).
- `on_lost()` after a session ended: the websocket is closed, `connected` is
  false and session-bound messages are dropped; runs before any reconnect.
- `on_tick()` every `status_interval` while a session is up.

Messages leave through one `_outbox.Outbox`, in order: worker status and
offer answers are dropped with the session they were queued on, job status
updates wait for the next registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import cast

import aiohttp
from google.protobuf.message import DecodeError
from livekit.protocol import agent

from ._conn import AuthRefused, ProtocolError, agent_url, mint_token, open_session
from ._options import WorkerOptions
from ._outbox import Outbox
from ._policy import Backoff

logger = logging.getLogger("trunkline.worker")

# A session that stayed up this long resets the reconnect backoff.
_STABLE_SESSION_S = 10.0


class Session:
    """The worker's server session; see the module docstring for the contract.

    Satisfies `_types.Link`, the view the admission side uses to send.
    """

    def __init__(
        self,
        opts: WorkerOptions,
        *,
        on_registered: Callable[[], None],
        on_message: Callable[[agent.ServerMessage], None],
        on_lost: Callable[[], None],
        on_tick: Callable[[], None],
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._opts = opts
        self._on_registered = on_registered
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_tick = on_tick
        self._rand = rand
        self._outbox = Outbox()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._worker_id = ""
        self._session_no = 0
        self._connected = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def worker_id(self) -> str:
        """The id the server gave this worker ("" before the first registration)."""
        return self._worker_id

    @property
    def connected(self) -> bool:
        """True while a registered session is up."""
        return self._ws is not None

    @property
    def session_no(self) -> int:
        """Registrations so far; names the current (or last) session."""
        return self._session_no

    async def wait_registered(self) -> str:
        """Wait until registered at least once; returns the worker id."""
        await self._registered.wait()
        return self._worker_id

    def send(self, msg: agent.WorkerMessage) -> None:
        """Queue `msg` behind everything already queued."""
        self._outbox.put(msg)

    def send_first(self, msg: agent.WorkerMessage) -> None:
        """Queue `msg` ahead of everything already queued."""
        self._outbox.put_first(msg)

    def stop_reconnecting(self) -> None:
        """Make `run()` return when the current session ends instead of reconnecting."""
        self._stopping.set()

    async def flush(self, limit: float) -> bool:
        """Wait until every queued message was written on a live session; False on timeout."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._connected.wait()
                    await self._outbox.wait_empty()
                    if self._ws is not None:
                        break
        except TimeoutError:
            logger.warning("unsent messages dropped", extra={"count": len(self._outbox)})
            return False
        return True

    async def run(self) -> None:
        """Keep a session up; see the module docstring for when this returns or raises."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            await self._connection_loop(client)

    async def _connection_loop(self, client: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        opts = self._opts
        backoff = Backoff(base=opts.reconnect_base, cap=opts.reconnect_cap, rand=self._rand)
        failures = 0
        url = agent_url(opts.ws_url, opts.max_jobs)
        version = opts.version or _package_version()
        while not self._stopping.is_set():
            registered_at: float | None = None
            try:
                started = loop.time()
                reg = await open_session(
                    client,
                    url=url,
                    token=mint_token(opts.api_key, opts.api_secret),
                    heartbeat=opts.heartbeat_interval,
                    agent_name=opts.agent_name,
                    version=version,
                )
                registered_at = loop.time()
                self._registered_as(reg.ws, reg.worker_id, registered_at - started)
                await self._serve(reg.ws)
                logger.warning(
                    "worker connection closed by server",
                    extra={"worker_id": self._worker_id, "close_code": reg.ws.close_code},
                )
            except AuthRefused as exc:
                logger.error("worker authentication refused", extra={"error": str(exc)})
            except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as exc:
                logger.warning(
                    "worker connection failed",
                    extra={"url": url, "error": str(exc) or type(exc).__name__},
                )
            finally:
                await self._disconnected()
            if self._stopping.is_set():
                return
            if registered_at is not None and loop.time() - registered_at >= _STABLE_SESSION_S:
                backoff.reset()
                failures = 0
            failures += 1
            if opts.max_retry is not None and failures > opts.max_retry:
                raise ConnectionError(
                    f"worker could not connect to {url} after {failures} attempts; "
                    "check the server is running and the URL/credentials are right"
                )
            delay = backoff.next_delay()
            logger.info(
                "worker reconnecting", extra={"delay_s": round(delay, 3), "attempt": failures}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _registered_as(
        self, ws: aiohttp.ClientWebSocketResponse, worker_id: str, took: float
    ) -> None:
        self._ws = ws
        self._session_no += 1
        self._worker_id = worker_id
        logger.info(
            "worker registered",
            extra={
                "worker_id": worker_id,
                "agent_name": self._opts.agent_name,
                "max_jobs": self._opts.max_jobs,
                "register_s": round(took, 4),
            },
        )
        self._on_registered()
        self._connected.set()
        self._registered.set()

    async def _disconnected(self) -> None:
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        self._outbox.drop_session_bound()
        self._on_lost()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        sender = asyncio.create_task(self._outbox.pump(ws))
        ticker = asyncio.create_task(self._tick_loop())
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY:
                    self._receive(frame.data)
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    raise cast(Exception, ws.exception() or ConnectionError("websocket error"))
                else:
                    logger.warning("ignoring non-binary frame", extra={"type": frame.type.name})
        finally:
            sender.cancel()
            ticker.cancel()
            await asyncio.gather(sender, ticker, return_exceptions=True)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._opts.status_interval)
            self._on_tick()

    def _receive(self, data: bytes) -> None:
        msg = agent.ServerMessage()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            # One bad frame must not take down the session and its jobs.
            logger.warning("ignoring undecodable server frame", extra={"size": len(data)})
            return
        self._on_message(msg)


def _package_version() -> str:
    from trunkline import __version__

    return __version__
