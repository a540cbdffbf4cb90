"""Cluster mode: whole-cluster reads at any member (docs/cluster.md, "Visibility").

Theory of operation
-------------------
Each member knows only what it decides: the pools it owns (their workers,
slots, queue, live jobs) and the jobs that ended there. A read at any member
is answered for the whole cluster by asking the others, once each:

- `GET /v1/pools`, `GET /v1/workers`, `GET /v1/jobs/{id}` and the
  dashboard's `GET /dashboard/jobs/{id}` pass through `merged_reads`, a
  middleware that exists only in cluster mode. The local handler answers
  first, so the caller's token is checked here before any other member is
  asked; then one concurrent GET of the same path goes to every other live
  member, over the kept-alive forwarding session, with the caller's
  `Authorization` and `X-Trunkline-Forwarded` (the member asked answers for
  itself only; each checks the token again, room scope included).
- Pools: each member marks the pools in its answer with their `owner` and
  `epoch` as it sees them; a pool's entry comes from the member that owns it
  (by its own answer; the highest epoch wins while views differ). A pool
  whose owner did not answer (within `PEER_TIMEOUT_S`) keeps this member's
  entry with `"owner_unreachable": true`. Workers: every member's, each
  marked with the `member` its connection is at (a connection is at one
  member only: a relay does not register the worker it pipes).
- Jobs: found here (live or in history), else the first member that finds
  it; not found anywhere, and some member did not answer: 503
  `cluster_unavailable` (it may be there), else 404.
- The dashboard: while someone watches, `SnapshotCache` fetches every other
  member's own snapshot (`GET /v1/cluster/snapshot`) every `REFRESH_S` with
  a read-only token this member signs, and the hub merges it into each
  snapshot it sends (pools as above, workers and jobs of every member,
  totals summed) and into its samples.
- `/metrics` is not merged (a scraper of every member would count each
  pool once per member): a pool's gauges (queue depth, slots, workers,
  active jobs, replicas) are exported only by its owner (`Metrics.owns`),
  counters by the member where things happened, so `sum by (pool)` over
  every member is the cluster; `trunkline_cluster_pool_owner{pool,member}`
  says at every member who owns what.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.auth import Authenticator, viewer_token
from trunkline.config import Config
from trunkline.runtime.cluster import ClusterNode
from trunkline.server.dashboard import COOKIE, ENDED_JOBS, HUB, LIVE_JOBS, MAX_WORKERS, DashboardHub
from trunkline.server.keys import AUTH, METRICS
from trunkline.server.relay import FORWARD_HEADER, FORWARD_SESSION
from trunkline.server.rest import ApiError, error_response
from trunkline.server.views import json_response

log = logging.getLogger("trunkline.cluster")

PEER_TIMEOUT_S = 1.0  # one member's answer to a merged read
REFRESH_S = 0.5  # the dashboard's fetch of the other members, while watched
FRESH_S = 3 * REFRESH_S  # older fetched snapshots are not merged
SNAPSHOT_PATH = "/v1/cluster/snapshot"
_TOKEN_TTL_S = 300

__all__ = ["PEER_TIMEOUT_S", "ClusterViews", "SnapshotCache", "setup_cluster_views"]


@dataclasses.dataclass(frozen=True, slots=True)
class PeerAnswer:
    """One member's answer to a read: `status` None if it did not answer."""

    member: str
    url: str
    status: int | None
    body: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and isinstance(self.body, dict)


class ClusterViews:
    """Asks the other members and merges their answers (see the module docstring)."""

    def __init__(self, node: ClusterNode, session: Callable[[], aiohttp.ClientSession | None]):
        self.node = node
        self._session = session

    def peers(self) -> list[tuple[str, str]]:
        """(member, url) of every other member with a live heartbeat."""
        me = self.node.member
        out = []
        for m in self.node.status().members:
            url = m.info.get("url", "")
            if m.member != me and url:
                out.append((m.member, url))
        return out

    async def ask(self, path: str, headers: Mapping[str, str]) -> list[PeerAnswer]:
        """GET `path` at every other member at once; never raises."""
        peers = self.peers()
        if not peers:
            return []
        return list(await asyncio.gather(*(self._get(m, u, path, headers) for m, u in peers)))

    async def first(
        self, path: str, headers: Mapping[str, str]
    ) -> tuple[PeerAnswer | None, list[PeerAnswer]]:
        """The first member answering 200 to `path` (the rest are cancelled),
        or None and the members that did not answer at all."""
        tasks = [asyncio.ensure_future(self._get(m, u, path, headers)) for m, u in self.peers()]
        failed: list[PeerAnswer] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                got = await next_done
                if got.ok:
                    return got, failed
                if got.status is None:
                    failed.append(got)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return None, failed

    async def _get(
        self, member: str, url: str, path: str, headers: Mapping[str, str]
    ) -> PeerAnswer:
        session = self._session()
        if session is None or session.closed:
            return PeerAnswer(member, url, None, error="no session")
        sent = {**headers, FORWARD_HEADER: "1"}
        limit = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        try:
            async with session.get(url + path, headers=sent, timeout=limit) as r:
                body = await r.json(content_type=None) if r.status == 200 else None
                return PeerAnswer(member, url, r.status, body)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return PeerAnswer(member, url, None, error=type(exc).__name__)

    # ----------------------------------------------------------------- pools

    def owner_fields(self, pool: str) -> dict[str, Any]:
        """`owner` and `epoch` of `pool` as this member sees it."""
        node = self.node
        if node.may_act(pool):
            return {"owner": node.member, "epoch": node.epoch(pool)}
        lease = node.lease_of(pool)
        return {"owner": lease.member if lease else "", "epoch": lease.epoch if lease else 0}

    def annotate_pools(self, entries: Iterable[dict[str, Any]]) -> None:
        for entry in entries:
            entry.update(self.owner_fields(str(entry.get("agent_name", ""))))

    def merge_pools(
        self, local: list[dict[str, Any]], answers: Iterable[PeerAnswer], failed: set[str]
    ) -> list[dict[str, Any]]:
        """Each pool's entry from its owner's own answer; this member's
        entry, `owner_unreachable`, when the owner it names is in `failed`.
        `local` is annotated (`annotate_pools`)."""
        me = self.node.member
        best: dict[str, dict[str, Any]] = {}

        def offer(entry: dict[str, Any], member: str) -> None:
            name = entry.get("agent_name")
            if not isinstance(name, str) or entry.get("owner") != member:
                return
            held = best.get(name)
            if held is None or int(entry.get("epoch", 0)) > int(held.get("epoch", 0)):
                best[name] = entry

        for entry in local:
            offer(entry, me)
        for a in answers:
            for entry in a.body.get("pools", ()) if a.ok else ():
                if isinstance(entry, dict):
                    offer(entry, a.member)
        out = []
        names = [str(e.get("agent_name", "")) for e in local]
        names += sorted(set(best) - set(names))
        by_name = {str(e.get("agent_name", "")): e for e in local}
        for name in names:
            owned = best.get(name)
            if owned is not None:
                out.append({**owned, "owner_unreachable": False})
                continue
            mine = by_name[name]
            out.append({**mine, "owner_unreachable": mine.get("owner", "") in failed})
        return out


def _failed(answers: Iterable[PeerAnswer]) -> set[str]:
    """Members whose answer cannot be used (none, or not a 200)."""
    return {a.member for a in answers if not a.ok}


# ------------------------------------------------------------ merged reads


def _body(response: web.StreamResponse) -> dict[str, Any] | None:
    if isinstance(response, web.Response) and response.status == 200:
        raw = response.body
        if isinstance(raw, bytes):
            data = json.loads(raw)
            if isinstance(data, dict):
                return data
    return None


def _caller_headers(request: web.Request) -> dict[str, str]:
    """The caller's credentials, as the other members must check them."""
    headers = {"Accept": "application/json"}
    auth = request.headers.get("Authorization")
    token = request.query.get("token") or request.cookies.get(COOKIE)
    if auth:
        headers["Authorization"] = auth
    elif token:  # the dashboard's: query or cookie
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _unreachable(answers: Iterable[PeerAnswer]) -> list[dict[str, Any]]:
    return [
        {"member": a.member, "url": a.url, "status": a.status, "error": a.error}
        for a in answers
        if not a.ok
    ]


async def _pools(views: ClusterViews, request: web.Request, local: dict[str, Any]) -> Any:
    pools = local.get("pools")
    if not isinstance(pools, list):
        return local
    views.annotate_pools(pools)
    if request.headers.get(FORWARD_HEADER):
        return local  # asked by a member: for ourselves only
    answers = await views.ask(request.path_qs, _caller_headers(request))
    merged = views.merge_pools(pools, answers, _failed(answers))
    return {**local, "pools": merged, "unreachable_members": _unreachable(answers)}


async def _workers(views: ClusterViews, request: web.Request, local: dict[str, Any]) -> Any:
    workers = local.get("workers")
    if not isinstance(workers, list):
        return local
    for w in workers:
        w["member"] = views.node.member
    if request.headers.get(FORWARD_HEADER):
        return local
    answers = await views.ask(request.path_qs, _caller_headers(request))
    for a in answers:
        theirs = a.body.get("workers") if a.ok else None
        if isinstance(theirs, list):
            workers.extend(w for w in theirs if isinstance(w, dict) and w.get("member") == a.member)
    return {**local, "workers": workers, "unreachable_members": _unreachable(answers)}


_MERGED = {"/v1/pools": _pools, "/v1/workers": _workers}
_JOBS = frozenset({"/v1/jobs/{job_id}", "/dashboard/jobs/{job_id}"})


def merged_reads(views: ClusterViews) -> Any:
    """The middleware (see the module docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "GET":  # the hot path (dispatches) pays one test
            response: web.StreamResponse = await handler(request)
            return response
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else ""
        if path not in _MERGED and path not in _JOBS:
            response = await handler(request)
            return response
        if path in _JOBS:
            return await _job(views, request, handler)
        response = await handler(request)
        local = _body(response)
        if local is None:
            return response
        return json_response(await _MERGED[path](views, request, local))

    return middleware


async def _job(views: ClusterViews, request: web.Request, handler: Any) -> web.StreamResponse:
    """Here (live or in history), else at the first member that has it."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        if exc.status != 404 or request.headers.get(FORWARD_HEADER):
            raise
        found, failed = await views.first(request.path_qs, _caller_headers(request))
        if found is not None:
            return json_response(found.body)
        if not failed:
            raise
        names = ", ".join(f"{a.member} at {a.url}" for a in failed)
        return error_response(
            503,
            "cluster_unavailable",
            f"{exc.message}; not found at the members that answered, and {names} did not "
            "answer: retry shortly",
        )


# --------------------------------------------------------------- dashboard


class SnapshotCache:
    """The other members' own dashboard snapshots, fetched while someone
    watches; merges them into the hub's (its `cluster` hook)."""

    def __init__(self, views: ClusterViews, hub: DashboardHub, token: Callable[[], str]) -> None:
        self._views = views
        self._hub = hub
        self._token = token
        self.answers: dict[str, tuple[float, PeerAnswer]] = {}  # member -> (when, answer)
        self._refused: dict[str, int] = {}  # member -> its refused total last seen
        self._refused_sum = 0  # peers' refusals since we first saw each
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if self._hub.viewers:
                try:
                    await self.refresh()
                except Exception:  # a bug here must not end the refresh for good
                    log.exception("cluster snapshot refresh failed")
            await asyncio.sleep(REFRESH_S)

    async def refresh(self) -> None:
        """Fetch every other member's own snapshot once."""
        headers = {"Authorization": f"Bearer {self._token()}"}
        answers = await self._views.ask(SNAPSHOT_PATH, headers)
        now = time.monotonic()
        live = set()
        for a in answers:
            live.add(a.member)
            self.answers[a.member] = (now, a)
        for gone in set(self.answers) - live:  # no heartbeat any more
            del self.answers[gone]

    def _fresh(self) -> list[PeerAnswer]:
        cutoff = time.monotonic() - FRESH_S
        return [a for at, a in self.answers.values() if at >= cutoff]

    def snapshot(self, local: dict[str, Any]) -> dict[str, Any]:
        """`local` (this member's snapshot) with the other members' merged in."""
        views = self._views
        answers = self._fresh()
        pools = [dict(p) for p in local.get("pools", [])]
        views.annotate_pools(pools)
        parts = [(a.member, a.body.get("snapshot", {})) for a in answers if a.ok]
        me = views.node.member
        workers = [{**w, "member": me} for w in local.get("workers", [])]
        total = int(local.get("workers_total", 0))
        jobs = list(local.get("jobs", []))
        requested = int(local.get("totals", {}).get("requested", 0))
        ended: dict[str, int] = dict(local.get("totals", {}).get("ended", {}))
        for member, snap in parts:
            workers += [{**w, "member": member} for w in snap.get("workers", [])]
            total += int(snap.get("workers_total", 0))
            jobs += snap.get("jobs", [])
            tot = snap.get("totals", {})
            requested += int(tot.get("requested", 0))
            for outcome, n in tot.get("ended", {}).items():
                ended[outcome] = ended.get(outcome, 0) + int(n)
        merged = views.merge_pools(pools, _as_pool_answers(answers), _failed(answers))
        return {
            **local,
            "pools": merged,
            "workers": workers[:MAX_WORKERS],
            "workers_total": total,
            "jobs": _newest(jobs),
            "totals": {"requested": requested, "ended": ended},
            "cluster": {"member": me, "unreachable": sorted(_failed(answers))},
        }

    def totals(self, local: dict[str, int]) -> dict[str, int]:
        """The hub's sample totals with the other members' added (theirs:
        running, queued, replicas now; refusals since first seen here)."""
        out = dict(local)
        for a in self._fresh():
            tot = a.body.get("totals_now", {}) if a.ok else {}
            if not isinstance(tot, dict):
                continue
            for key in ("running", "queued", "replicas"):
                out[key] = out.get(key, 0) + int(tot.get(key, 0))
            refused = int(tot.get("refused_total", 0))
            seen = self._refused.setdefault(a.member, refused)
            self._refused_sum += max(0, refused - seen)
            self._refused[a.member] = refused
        out["refused_total"] = out.get("refused_total", 0) + self._refused_sum
        return out


def _as_pool_answers(answers: Iterable[PeerAnswer]) -> list[PeerAnswer]:
    """Snapshot answers seen as `/v1/pools` answers (their pools at the top)."""
    return [
        dataclasses.replace(a, body={"pools": a.body.get("snapshot", {}).get("pools", [])})
        for a in answers
        if a.ok
    ]


def _newest(jobs: list[Any], live: int = LIVE_JOBS, ended: int = ENDED_JOBS) -> list[Any]:
    """Live jobs newest first, then ended ones newest first, each job once."""
    seen: set[str] = set()
    up: list[Any] = []
    done: list[Any] = []
    for j in sorted(jobs, key=lambda j: -(j.get("created_at") or 0)):
        if j.get("job_id") in seen:
            continue
        seen.add(j.get("job_id"))
        (up if j.get("ended_at") is None else done).append(j)
    done.sort(key=lambda j: -(j.get("ended_at") or 0))
    return up[:live] + done[:ended]


async def _own_snapshot(request: web.Request) -> web.Response:
    """`GET /v1/cluster/snapshot`: this member's own dashboard snapshot
    (pools marked with their owner) and its sample totals now."""
    authn: Authenticator = request.app[AUTH]
    authn.require_reader(request.headers.get("Authorization"), all_rooms=True)
    hub = request.app[HUB]
    views: ClusterViews = request.app[VIEWS]
    snap = hub.local_snapshot()
    views.annotate_pools(snap["pools"])
    return json_response(
        {"member": views.node.member, "snapshot": snap, "totals_now": hub.totals()}
    )


class _OwnerCollector(Collector):
    """`trunkline_cluster_pool_owner{pool,member}`: who owns each pool, as
    this member sees it (1 per pool with an owner)."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def collect(self) -> Iterable[Metric]:
        owner = GaugeMetricFamily(
            "trunkline_cluster_pool_owner",
            "1 for the member owning the pool, as this member sees it.",
            labels=["pool", "member"],
        )
        for pl in self._node.status().leases:
            if pl.owner:
                owner.add_metric([pl.pool, pl.owner], 1.0)
        yield owner


VIEWS = web.AppKey("cluster_views", ClusterViews)


def setup_cluster_views(app: web.Application, node: ClusterNode, config: Config) -> None:
    """Wire the whole-cluster reads (cluster mode only; after `setup_cluster`
    stored the forwarding session's key, before `setup_dashboard` runs or after:
    the hub is looked up at startup)."""
    views = ClusterViews(node, lambda: app.get(FORWARD_SESSION))
    app[VIEWS] = views
    app.middlewares.append(merged_reads(views))
    app.router.add_get(SNAPSHOT_PATH, _own_snapshot)
    metrics = app[METRICS]
    metrics.owns = node.may_act  # a pool's gauges only at its owner
    metrics.registry.register(_OwnerCollector(node))
    key, secret = next(iter(config.keys.items()))
    minted: list[tuple[float, str]] = []

    def token() -> str:
        # Read-only and without a room: the dashboard's own access (all rooms).
        now = time.monotonic()
        if not minted or now - minted[0][0] > _TOKEN_TTL_S / 2:
            minted[:] = [(now, viewer_token(key, secret, ttl_s=_TOKEN_TTL_S))]
        return minted[0][1]

    caches: list[SnapshotCache] = []

    async def _startup(app: web.Application) -> None:
        hub = app.get(HUB)
        if hub is not None:
            cache = SnapshotCache(views, hub, token)
            hub.cluster = cache
            cache.start()
            caches.append(cache)

    async def _shutdown(app: web.Application) -> None:
        for cache in caches:
            await cache.stop()

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
