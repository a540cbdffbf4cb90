"""The operator dashboard: a static page at `/` fed by server-sent events.

Routes (added by `setup_dashboard(app)`):

- `GET /` the page. `?token=JWT` is checked, stored in a cookie (HttpOnly,
  SameSite=Strict, and Secure when served over TLS or with `[server]
  behind_tls_proxy`) and stripped from the address bar by a redirect.
- `GET /dashboard/static/...` its JS and CSS (shipped in `server/static/`;
  nothing is fetched from outside the machine; a CSP header enforces it).
- `GET /dashboard/stream` the live feed (`text/event-stream`): `history` (the
  recent time series) and `snapshot` at once, then `snapshot` whenever the
  state changed (checked every `TICK_S`) and `sample` every `SAMPLE_S`.
- `GET /dashboard/jobs/{id}` one job with its trace.
- `GET /dashboard/jobs` a page of jobs, live then from the history, with the
  filters and cursors of `GET /v1/jobs` (JSON only); `GET /dashboard/usage`
  the usage report of `GET /v1/usage` (the history view, `static/history.js`).

Read access needs a token signed with a configured key and carrying
`video.roomAdmin` or the read-only `video.roomList` grant (query, cookie or
`Authorization: Bearer`), or a server started in dev mode (loopback only).
Nothing here changes state: a viewer token is enough. The stream ends
when the token expires, when the client goes (the next write fails; one is
due every `SAMPLE_S`) and at shutdown.

Cost: one `DashboardHub` per app samples the scheduler every `SAMPLE_S`
(O(pools + workers + placed jobs)) and, only while someone watches, encodes
one snapshot per tick, shared by every viewer and sent only when it changed.

Extra pool fields (`replicas`, `scale_events`, `rollout`) come from the autoscaler
stored at `app[AUTOSCALER]` (its `replicas_json(pool)` and
`events_json(pool)`, as `GET /v1/pools` shows them), or from a callable stored
at `app[POOL_EXTRAS]` returning `{agent_name: {"replicas": [...],
"scale_events": [...]}}`; without either, pools show workers only. Replicas
that have ended are left out of the snapshot and the replica count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt
from aiohttp import web

from trunkline.auth import Authenticator, AuthError
from trunkline.config import Config
from trunkline.core import JobState
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.server import usage
from trunkline.server.job_params import ParamError, parse_query
from trunkline.server.keys import AUTH, AUTOSCALER, CONFIG, DISPATCHER
from trunkline.server.rest import ApiError
from trunkline.server.views import job_json, job_row, json_response, pool_json, worker_json
from trunkline.stores import InvalidQuery

log = logging.getLogger("trunkline.dashboard")

STATIC_DIR = Path(__file__).with_name("static")
COOKIE = "trunkline_dashboard"
TICK_S = 0.25  # snapshot change check while someone watches
SAMPLE_S = 0.5  # time-series resolution
HISTORY = 720  # samples kept: 6 minutes
KEEP_SAMPLES = 240  # per viewer, when its connection is slow
MAX_WORKERS = 500  # workers drawn per snapshot (the rest are counted)
LIVE_JOBS = 30  # newest live jobs in a snapshot
ENDED_JOBS = 30  # newest ended jobs in a snapshot

PoolExtras = Callable[[], Mapping[str, Mapping[str, Any]]]


class ClusterMerge(Protocol):
    """Cluster mode (server/cluster_views.py): the other members' parts."""

    def snapshot(self, local: dict[str, Any]) -> dict[str, Any]: ...

    def totals(self, local: dict[str, int]) -> dict[str, int]: ...


POOL_EXTRAS = web.AppKey[PoolExtras]("trunkline.pool_extras")

# The page's policy: its own script, style and feed, nothing inline, no frames.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _Viewer:
    """One open stream: the newest snapshot not yet written, and samples."""

    __slots__ = ("closed", "samples", "snapshot", "wake")

    def __init__(self) -> None:
        self.snapshot: bytes | None = None
        self.samples: deque[bytes] = deque(maxlen=KEEP_SAMPLES)
        self.wake = asyncio.Event()
        self.closed = False

    def take(self) -> bytes:
        chunks = list(self.samples)
        self.samples.clear()
        if self.snapshot is not None:
            chunks.append(self.snapshot)
            self.snapshot = None
        self.wake.clear()
        return b"".join(chunks)


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class DashboardHub:
    """Samples the scheduler and fans snapshots out to the open streams."""

    def __init__(self, dispatcher: Dispatcher, extras: Callable[[], PoolExtras | None]) -> None:
        self.d = dispatcher
        self._extras = extras
        self.viewers: set[_Viewer] = set()
        self.samples: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._last_snapshot = b""
        self._last_refused = 0
        self._next_sample = 0.0
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.cluster: ClusterMerge | None = None  # cluster mode: the whole cluster's view

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self.closed = True
        for v in self.viewers:
            v.closed = True
            v.wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not end the feed for good
                log.exception("dashboard tick failed")
            await asyncio.sleep(TICK_S if self.viewers else SAMPLE_S)

    def subscribe(self) -> _Viewer:
        v = _Viewer()
        self.viewers.add(v)
        return v

    def unsubscribe(self, v: _Viewer) -> None:
        self.viewers.discard(v)

    # ---------------------------------------------------------------- output

    def tick(self) -> None:
        """Take a sample when one is due; send a snapshot if it changed."""
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_S
            sample = self.sample()
            self.samples.append(sample)
            if self.viewers:
                chunk = _event("sample", _dumps(sample))
                for v in self.viewers:
                    v.samples.append(chunk)
                    v.wake.set()
        if self.viewers:
            body = _dumps(self.snapshot())
            if body != self._last_snapshot:
                self._last_snapshot = body
                chunk = _event("snapshot", body)
                for v in self.viewers:
                    v.snapshot = chunk
                    v.wake.set()

    def hello(self) -> bytes:
        """What a new stream starts with: the time series and a snapshot."""
        body = _dumps(self.snapshot())
        return _event("history", _dumps(list(self.samples))) + _event("snapshot", body)

    def _pool_extras(self) -> Mapping[str, Mapping[str, Any]]:
        fn = self._extras()
        if fn is None:
            return {}
        try:
            return fn()
        except Exception:
            log.exception("pool extras failed")
            return {}

    def sample(self) -> dict[str, Any]:
        """Totals now: running, queued, refused since the last sample, replicas."""
        totals = self.totals()
        if self.cluster is not None:
            totals = self.cluster.totals(totals)
        refused = totals["refused_total"] - self._last_refused
        self._last_refused = totals["refused_total"]
        return {
            "t": round(self.d.wall(self.d.now()) or 0.0, 3),
            "running": totals["running"],
            "queued": totals["queued"],
            "refused": refused,
            "replicas": totals["replicas"],
        }

    def totals(self) -> dict[str, int]:
        """This server's running jobs, queued jobs, replicas, and jobs ended
        `no_capacity` since start (`refused_total`)."""
        d = self.d
        running = 0
        for w in d.workers():
            for job in w.jobs.values():
                if job.state is JobState.RUNNING:
                    running += 1
        queued = sum(p.queued for p in d.pools())
        refused_total = sum(n for (_, outcome), n in d.counters()[1] if outcome == "no_capacity")
        extras = self._pool_extras()
        replicas = 0
        for pool in d.pools():
            reps = extras.get(pool.name, {}).get("replicas")
            replicas += len(reps) if isinstance(reps, list) else len(pool.workers)
        return {
            "running": running,
            "queued": queued,
            "refused_total": refused_total,
            "replicas": replicas,
        }

    def snapshot(self) -> dict[str, Any]:
        """What the page draws: this server's `local_snapshot`, in cluster
        mode with the other members' merged in."""
        local = self.local_snapshot()
        return local if self.cluster is None else self.cluster.snapshot(local)

    def local_snapshot(self) -> dict[str, Any]:
        """Pools, workers and recent jobs as the page draws them (no wall
        clock inside, so an unchanged state encodes to the same bytes)."""
        d = self.d
        extras = self._pool_extras()
        pools = []
        for pool in d.pools():
            entry = pool_json(pool)
            for key in ("replicas", "scale_events", "rollout"):
                value = extras.get(pool.name, {}).get(key)
                if value is not None:
                    entry[key] = value
            pools.append(entry)
        workers = []
        for n, w in enumerate(d.workers()):
            if n >= MAX_WORKERS:
                break
            view = worker_json(w, detail=False)
            view["load"] = round(w.load, 2)
            workers.append(view)
        jobs = []
        live = list(d.live_jobs())[-LIVE_JOBS:]
        for job in reversed(live):
            jobs.append(job_row(d.record(job)))
        for rec in d.recent_ended(ENDED_JOBS):
            jobs.append(job_row(rec))
        requested, ended_n = d.counters()
        ended: dict[str, int] = {}
        for (_, outcome), n in ended_n:
            ended[outcome] = ended.get(outcome, 0) + n
        return {
            "pools": pools,
            "workers": workers,
            "workers_total": d.worker_count(),
            "jobs": jobs,
            "totals": {"requested": sum(n for _, n in requested), "ended": ended},
        }


HUB = web.AppKey("trunkline.dashboard_hub", DashboardHub)


# ------------------------------------------------------------------- access


def _viewer_expiry(request: web.Request) -> float:
    """When the caller's read access ends (inf in dev mode); `AuthError` if
    it has none."""
    config: Config = request.app[CONFIG]
    token = request.query.get("token") or request.cookies.get(COOKIE)
    header = request.headers.get("Authorization", "")
    if not token and header.lower().startswith("bearer "):
        token = header[7:].strip()
    if not token:
        if config.dev:
            return float("inf")
        raise AuthError(
            "unauthenticated",
            "the dashboard needs a token: open the link `trunkline status --dashboard-url` prints",
        )
    authn: Authenticator = request.app[AUTH]
    authn.check_reader(authn.verify(token), all_rooms=True)
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) if isinstance(exp, int | float) else float("inf")


def _denied_page(exc: AuthError) -> web.Response:
    status = exc.http_status
    html = (  # no inline style: the CSP allows none
        "<!doctype html><meta charset=utf-8><title>trunkline: access denied</title>"
        "<body><h1>trunkline dashboard</h1>"
        f"<p>Access denied: {_escape(exc.message)}.</p>"
        "<p>Run <code>trunkline status --dashboard-url</code> (with the server's URL and API "
        "key) and open the link it prints.</p></body>"
    )
    return web.Response(text=html, status=status, content_type="text/html")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------ handlers


async def _index(request: web.Request) -> web.StreamResponse:
    try:
        expiry = _viewer_expiry(request)
    except AuthError as exc:
        return _denied_page(exc)
    token = request.query.get("token")
    if token:
        # Keep the token out of the address bar, history and screenshots.
        resp = web.Response(status=303, headers={"Location": "/"})
        max_age = None if expiry == float("inf") else max(int(expiry - time.time()), 0)
        config: Config = request.app[CONFIG]
        resp.set_cookie(
            COOKIE,
            token,
            max_age=max_age,
            httponly=True,
            samesite="Strict",
            # Over plain HTTP a Secure cookie would never come back; behind a
            # TLS proxy this hop is plain HTTP but the browser's is not.
            secure=request.secure or config.server.behind_tls_proxy,
            path="/",
        )
        return resp
    return web.FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    expiry = _viewer_expiry(request)  # AuthError: JSON 401/403 via errors_middleware
    hub = request.app[HUB]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    viewer = hub.subscribe()
    try:
        # retry: how soon the browser reconnects after the stream ends.
        await resp.write(b"retry: 2000\n\n" + hub.hello())
        while not viewer.closed:
            await viewer.wake.wait()
            if time.time() >= expiry:
                await resp.write(_event("expired", b'"token expired: reopen the link"'))
                break
            chunk = viewer.take()
            if chunk:
                await resp.write(chunk)
    except ConnectionResetError:
        pass  # the viewer went away
    finally:
        hub.unsubscribe(viewer)
    return resp


async def _job(request: web.Request) -> web.Response:
    _viewer_expiry(request)  # AuthError: JSON 401/403 via errors_middleware
    d: Dispatcher = request.app[DISPATCHER]
    job_id = request.match_info["job_id"]
    job = await d.find_job(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} (live or in history)")
    # metadata may be large and is not shown
    return web.json_response(job_json(job, metadata=False))


async def _jobs(request: web.Request) -> web.Response:
    """Jobs as `GET /v1/jobs` lists them (JSON pages), for the history view."""
    _viewer_expiry(request)  # AuthError: JSON 401/403 via errors_middleware
    d: Dispatcher = request.app[DISPATCHER]
    query = {k: request.query.getall(k) for k in request.query}
    try:
        q = parse_query(query, now=time.time())
        if q.format != "json" or q.limit is None:
            raise ParamError("'format': the dashboard lists pages; export with GET /v1/jobs")
        page = await d.query_jobs(q.flt, limit=q.limit, cursor=q.cursor)
    except (ParamError, InvalidQuery) as exc:
        raise ApiError(400, "invalid_argument", str(exc)) from None
    jobs = [job_json(j, trace=False, metadata=False) for j in page.jobs]
    return json_response({"jobs": jobs, "next_cursor": page.next_cursor})


async def _usage(request: web.Request) -> web.Response:
    """The usage report of `GET /v1/usage`, for the history view."""
    _viewer_expiry(request)
    return await usage.answer(request)


def _autoscaler_extras(app: web.Application) -> PoolExtras | None:
    """Replicas and scale events from the autoscaler, if the app has one."""
    scaler = app.get(AUTOSCALER)
    if scaler is None or not hasattr(scaler, "replicas_json"):
        return None
    d: Dispatcher = app[DISPATCHER]

    def extras() -> Mapping[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for pool in d.pools():
            name = pool.name
            replicas = [r for r in scaler.replicas_json(name) if r.get("ended_at") is None]
            events = scaler.events_json(name, 20) if hasattr(scaler, "events_json") else []
            rollout = scaler.rollout_json(name) if hasattr(scaler, "rollout_json") else None
            if replicas or events or rollout:
                out[name] = {"replicas": replicas, "scale_events": events, "rollout": rollout}
        return out

    return extras


def setup_dashboard(app: web.Application) -> None:
    """Add the dashboard routes and its hub to `app` (after the dispatcher is
    stored at `app[DISPATCHER]`)."""
    dispatcher: Dispatcher = app[DISPATCHER]
    hub = DashboardHub(dispatcher, lambda: app.get(POOL_EXTRAS) or _autoscaler_extras(app))
    app[HUB] = hub
    app.router.add_get("/", _index)
    app.router.add_get("/dashboard/stream", _stream)
    app.router.add_get("/dashboard/jobs/{job_id}", _job)
    app.router.add_get("/dashboard/jobs", _jobs)
    app.router.add_get("/dashboard/usage", _usage)
    app.router.add_static("/dashboard/static", STATIC_DIR, append_version=False)

    async def _startup(app: web.Application) -> None:
        hub.start()

    async def _shutdown(app: web.Application) -> None:
        await hub.stop()

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
