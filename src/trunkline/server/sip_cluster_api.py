"""Cluster mode for the SIP edge: the members' internal endpoints and wiring
(runtime/sip_cluster.py has the logic; docs/cluster.md, "SIP calls").

`POST /v1/cluster/sip/join` (an edge member asks the pool's owner for a
call's job, or joins one): answered 503 `not_pool_owner` / `cluster_unavailable`
by a member that does not own the pool, else 200 with a stream of JSON lines
(`joined`, `placed`, `refused`, `ended`, `unknown`, `closed`; a blank line
every second keeps it alive) that stays open for the call's life. The stream
breaking (the edge member died) is what tells the owner the call's proxy is
gone. `POST /v1/cluster/sip/control` carries the edge's cancel, release and
final. Both need an admin token without a room scope, the same keys the
members share for everything else (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.auth import Authenticator, room_scope
from trunkline.cluster import create_coordinator
from trunkline.config import Config
from trunkline.core import agent_name_problem
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.sip_cluster import CONTROL_PATH, JOIN_PATH, KEEPALIVE_S, ClusterAdmission
from trunkline.runtime.sip_hub import SipCallHub
from trunkline.server.keys import AUTH, METRICS
from trunkline.server.rest import ApiError, error_response

HUB = web.AppKey("sip_hub", SipCallHub)
NODE = web.AppKey("sip_node", ClusterNode)

__all__ = ["HUB", "StreamLink", "setup_sip_cluster"]

_TERMINAL = ("refused", "ended", "unknown", "closed")


class StreamLink:
    """An `EdgeLink` whose answers are lines queued for the join's stream."""

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.finished = False

    def _put(self, event: str, **fields: str) -> None:
        if not self.finished:
            self.finished = event in _TERMINAL
            self.queue.put_nowait({"event": event, **fields})

    def joined(self) -> None:
        self._put("joined")

    def placed(self, job_id: str, worker_id: str) -> None:
        self._put("placed", job_id=job_id, worker_id=worker_id)

    def refused(self, reason: str) -> None:
        self._put("refused", reason=reason)

    def ended(self) -> None:
        self._put("ended")

    def unknown(self) -> None:
        self._put("unknown")

    def close(self) -> None:
        self._put("closed")


def _member(request: web.Request) -> None:
    """Members sign with the keys they share; a room-scoped token is no member's."""
    authn: Authenticator = request.app[AUTH]
    claims = authn.require_admin(request.headers.get("Authorization"))
    if room_scope(claims):
        raise ApiError(403, "permission_denied", "a cluster member's token has no room scope")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed", "request body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > 512:
        raise ApiError(400, "invalid_argument", f"'{key}' must be a non-empty string")
    return value


async def _join(request: web.Request) -> web.StreamResponse:
    _member(request)
    body = await _body(request)
    job_id, pool, edge = _str(body, "job_id"), _str(body, "pool"), _str(body, "edge")
    room = _str(body, "room")
    problem = agent_name_problem(pool)
    if problem is not None:
        raise ApiError(400, "invalid_argument", f"'pool': {problem}")
    metadata = body.get("metadata")
    wait = body.get("max_wait_s")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ApiError(400, "invalid_argument", "'metadata' must be an object of strings")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 3600:
        raise ApiError(400, "invalid_argument", "'max_wait_s' must be a number in [0, 3600]")
    node = request.app[NODE]
    hub = request.app[HUB]
    link = StreamLink(edge)
    try:
        if not node.may_act(pool):
            raise node.refusal(pool)
        await hub.join(
            job_id,
            pool,
            max_wait_s=float(wait),
            room=room,
            metadata=metadata,
            create=body.get("create") is True,
            link=link,
        )
    except ClusterRefusal as exc:
        # Answered here, never forwarded (the middleware would buffer a
        # stream): the edge asks the owner its own view names.
        extra = {"owner_url": exc.owner_url} if exc.owner_url else {}
        return error_response(503, exc.code, exc.message, **extra)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    msg = await link.queue.get()
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break  # the edge's socket closed (its member died)
                await resp.write(b"\n")  # a silently gone edge fails a later write
                continue
            await resp.write(json.dumps(msg).encode() + b"\n")
            if msg["event"] in _TERMINAL:
                break
    except (ConnectionError, OSError):
        pass
    finally:
        hub.link_lost(job_id, link)  # nothing if the link ended normally
    with contextlib.suppress(ConnectionError, OSError):
        await resp.write_eof()
    return resp


async def _control(request: web.Request) -> web.Response:
    _member(request)
    body = await _body(request)
    op = _str(body, "op")
    if op not in ("cancel", "release", "final"):
        raise ApiError(400, "invalid_argument", "'op' must be cancel, release or final")
    detail = body.get("detail", "")
    if not isinstance(detail, str) or len(detail) > 512:
        raise ApiError(400, "invalid_argument", "'detail' must be a string")
    done = request.app[HUB].control(op, _str(body, "job_id"), _str(body, "edge"), detail)
    return web.json_response({"done": done})


def setup_sip_cluster(
    app: web.Application,
    config: Config,
    node: ClusterNode,
    admission: ClusterAdmission,
) -> None:
    """Serve the two endpoints and run `admission` with the app, its call
    claims on a Redis connection of its own (a burst of INVITEs must not
    delay the lease renewals)."""
    cc = config.cluster
    assert cc is not None
    store = create_coordinator(cc.redis_url, namespace=cc.namespace, timeout_s=cc.timeout_s)
    admission.bind(node, store)
    app[NODE] = node
    app[HUB] = admission.hub
    app[METRICS].registry.register(_SipClusterCollector(admission))
    app.router.add_post(JOIN_PATH, _join)
    app.router.add_post(CONTROL_PATH, _control)

    async def _startup(app: web.Application) -> None:
        await admission.start()

    async def _shutdown(app: web.Application) -> None:
        await admission.aclose()
        await store.close()

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)


class _SipClusterCollector(Collector):
    """`trunkline_sip_cluster_events_total{event}`, read at scrape time."""

    def __init__(self, admission: ClusterAdmission) -> None:
        self._a = admission

    def collect(self) -> Iterable[Metric]:
        hub = self._a.hub
        family = CounterMetricFamily(
            "trunkline_sip_cluster_events",
            "SIP calls across members: joined (an INVITE found its call claimed by "
            "another member), links_lost (an edge's link to this owner broke), "
            "edges_lost (a placed call ended so), unclaimed (a placed job no edge took).",
            labels=["event"],
        )
        family.add_metric(["joined"], self._a.joined_elsewhere)
        family.add_metric(["links_lost"], hub.links_lost)
        family.add_metric(["edges_lost"], hub.edges_lost)
        family.add_metric(["unclaimed"], hub.unclaimed_cancelled)
        yield family
