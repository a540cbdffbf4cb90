"""The LiveKit double on a loop of its own (a thread): one double can serve a
whole test module while each test runs on its own event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from livekit.lk_double import LiveKitDouble

T = TypeVar("T")

# The upstream LiveKit server's key pair (not trunkline's own [keys]).
UP_KEY, UP_SECRET = "upstream-key", "upstream-secret-0123456789abcdef0123"


class DoubleThread:
    """A `LiveKitDouble` served from a background thread's event loop."""

    def __init__(self, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.double: LiveKitDouble = self.run(lambda: LiveKitDouble(UP_KEY, UP_SECRET, **kw))
        self.url = asyncio.run_coroutine_threadsafe(self.double.start(), self.loop).result(10)

    @property
    def ws_url(self) -> str:
        return self.double.ws_url

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn()` on the double's loop and return its result."""

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def run_async(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Await `fn()` on the double's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.double.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
