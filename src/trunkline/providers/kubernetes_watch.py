"""The Kubernetes provider's pod informer: one list+watch over this instance's
pods, kept as a cache of `PodView`s.

Theory of operation
-------------------
`PodWatch.start()` runs one task for the provider's lifetime. It lists the
pods the instance selector matches (paged with `limit`/`continue`), then
watches from the list's resource version, asking for bookmarks, and resumes
from the last version seen when the stream ends or drops. A 410 Expired (as
an HTTP status or an in-stream ERROR event) means relist; a continue token
that expired mid-list restarts the list. The versions are opaque: only ever
sent back, never compared. While the API server cannot be reached it backs
off and retries; nothing is concluded for lack of news.

What it learns goes to its `PodListener` (the provider), from the loop: each
pod seen or changed (`pod_seen`), each pod deleted (`pod_deleted`, after it
left the cache), and the end of each relist (`relisted`, with the pods it
found and the relist's epoch, so pods missing from it can be concluded
gone). `synced` is set once the first list is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp

from trunkline.providers import kubernetes_api as kapi
from trunkline.providers.kubernetes_pods import PodView
from trunkline.providers.protocol import ProviderError

__all__ = ["PodListener", "PodWatch"]

log = logging.getLogger("trunkline.providers")


class PodListener(Protocol):
    """What a `PodWatch` tells about the pods it sees."""

    def pod_seen(self, view: PodView) -> None: ...

    def pod_deleted(self, view: PodView) -> None: ...

    def relisted(self, seen: Mapping[str, PodView], epoch: int) -> None: ...


class PodWatch:
    """List+watch of the pods `selector` matches; see the module docstring.
    `client` returns the connected API (it may raise `kapi.Unavailable` or
    `ProviderError`, both retried)."""

    def __init__(
        self,
        listener: PodListener,
        client: Callable[[], Awaitable[kapi.Api]],
        *,
        selector: str,
        backoff: kapi.Backoff,
        request_budget_s: float,
        watch_timeout_s: int,
        page_size: int,
    ) -> None:
        self._listener = listener
        self._client = client
        self._selector = selector
        self.backoff = backoff
        self.request_budget_s = request_budget_s
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.cache: dict[str, PodView] = {}  # every pod of this instance, by name
        self.rv: str | None = None
        self.epoch = 0  # relists started
        self.synced = asyncio.Event()
        self.reachable = False
        self.stats: dict[str, int] = {"relists": 0, "watches": 0, "watch_errors": 0, "events": 0}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Run the list+watch task (once; never after `cancel`)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop for good; the task, if one ran, to await."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                api = await self._client()
                if self.rv is None:
                    await self._relist(api)
                began = asyncio.get_running_loop().time()
                if await self._watch_once(api):
                    attempt = 0
                elif asyncio.get_running_loop().time() - began < 1.0:
                    # An empty stream that ended at once: do not spin on it.
                    attempt += 1
                    await asyncio.sleep(self.backoff.delay(attempt))
            except _Expired:
                self.rv = None
                attempt += 1
                if attempt > 1:
                    await asyncio.sleep(self.backoff.delay(attempt))
            except asyncio.CancelledError:
                raise
            except (
                kapi.Unavailable,
                aiohttp.ClientError,
                TimeoutError,
                OSError,
                ValueError,
            ) as exc:
                self.stats["watch_errors"] += 1
                if self.reachable:
                    log.warning("kubernetes watch interrupted", extra={"error": str(exc)})
                self.reachable = False
                attempt += 1
                await asyncio.sleep(self.backoff.delay(attempt))
            except ProviderError as exc:
                log.error("kubernetes provider cannot connect", extra={"error": str(exc)})
                attempt += 1
                await asyncio.sleep(self.backoff.delay(attempt))

    async def _relist(self, api: kapi.Api) -> None:
        self.epoch += 1
        epoch = self.epoch
        self.stats["relists"] += 1
        seen: dict[str, PodView] = {}
        token: str | None = None
        rv = ""
        while True:
            kw: dict[str, Any] = {"label_selector": self._selector, "limit": self.page_size}
            if token:
                kw["_continue"] = token
            reply = await api.call(
                "list pods",
                lambda kw=kw: api.core.list_namespaced_pod(  # type: ignore[misc]
                    api.namespace, _preload_content=False, **kw
                ),
                budget_s=self.request_budget_s,
            )
            if reply.status == 410 and token:  # the continue token expired: start over
                seen, token = {}, None
                continue
            if not reply.ok:
                raise kapi.Unavailable(f"list pods: {reply.describe()}")
            meta = reply.body.get("metadata") or {}
            if not token:
                rv = str(meta.get("resourceVersion", ""))
            for item in reply.body.get("items") or []:
                v = PodView.of(item)
                seen[v.name] = v
            token = meta.get("continue") or None
            if not token:
                break
        self.reachable = True
        self.cache = seen
        self.rv = rv or None
        for v in seen.values():
            self._listener.pod_seen(v)
        self._listener.relisted(seen, epoch)
        self.synced.set()

    async def _watch_once(self, api: kapi.Api) -> bool:
        """One watch stream, to its end; True if it carried anything."""
        self.stats["watches"] += 1
        api.requests["watch"] += 1
        resp = await api.core.list_namespaced_pod(
            api.namespace,
            label_selector=self._selector,
            watch=True,
            resource_version=self.rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=10, sock_read=self.watch_timeout_s + 30
            ),
        )
        got = False
        async with resp:
            if resp.status == 410:
                raise _Expired
            if resp.status != 200:
                raise kapi.Unavailable(f"watch pods: {resp.status} {(await resp.read())[:200]!r}")
            self.reachable = True
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._event(json.loads(line))
                        got = True
        return got

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        obj = ev.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired
            raise kapi.Unavailable(f"watch error: {obj.get('message', obj)}")
        self.stats["events"] += 1
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.rv = rv or self.rv
            return
        view = PodView.of(obj)
        if kind == "DELETED":
            self.cache.pop(view.name, None)
            self._listener.pod_deleted(view)
        else:
            self.cache[view.name] = view
            self._listener.pod_seen(view)
        self.rv = rv or self.rv


class _Expired(Exception):
    """The watch's resource version is too old: relist."""
