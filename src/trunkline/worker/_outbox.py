"""The worker's outgoing messages: one ordered queue across sessions.

Theory of operation: everything the worker says goes through `put()` and is
written, in order, by `pump()` running on the current session. A message
leaves the queue only once written, so one that failed mid-session is retried
on the next. Worker status and offer answers only mean something on the
session they were made for: `drop_session_bound()` discards them on
disconnect, while job status updates (`update_job`) wait for the next session.
`put_first()` lets a new session's `MigrateJobRequest` precede them.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import aiohttp
from livekit.protocol import agent

logger = logging.getLogger("trunkline.worker")

# Messages that stay meaningful after the session they were queued on is lost.
_DURABLE = frozenset({"update_job"})


class Outbox:
    """Ordered messages to the server; see the module docstring."""

    def __init__(self) -> None:
        self._queue: collections.deque[agent.WorkerMessage] = collections.deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, msg: agent.WorkerMessage) -> None:
        self._queue.append(msg)
        self._empty.clear()
        self._ready.set()

    def put_first(self, msg: agent.WorkerMessage) -> None:
        self._queue.appendleft(msg)
        self._empty.clear()
        self._ready.set()

    def drop_session_bound(self) -> None:
        """Forget everything but job status updates (the session they were for is gone)."""
        kept = [m for m in self._queue if m.WhichOneof("message") in _DURABLE]
        self._queue.clear()
        self._queue.extend(kept)
        if not kept:
            self._empty.set()

    async def pump(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Write queued messages to `ws` until cancelled; on a write error, close
        `ws` (its reader then sees the session end) and return."""
        try:
            while True:
                while self._queue:
                    msg = self._queue[0]
                    await ws.send_bytes(msg.SerializeToString())
                    # The queue may have been purged while we were writing.
                    if self._queue and self._queue[0] is msg:
                        self._queue.popleft()
                self._empty.set()
                self._ready.clear()
                await self._ready.wait()
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            logger.warning("worker send failed", extra={"error": str(exc) or type(exc).__name__})
            await ws.close()

    async def wait_empty(self) -> None:
        """Return once every queued message has been written."""
        while self._queue:
            self._empty.clear()
            await self._empty.wait()
