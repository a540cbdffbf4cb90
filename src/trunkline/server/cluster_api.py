"""Cluster mode wiring and `GET /v1/cluster` (docs/cluster.md).

`setup_cluster(app, dispatcher, config)` builds this server's `ClusterNode`
on the coordinator `[cluster] redis_url` names (redis-py is imported only
here, only then), fences the dispatcher with it, gates the autoscaler to the
pools this server owns (a new owner adopts the replicas its predecessor
left), adds the cluster's gauges to `/metrics`, and serves `GET /v1/cluster`:
this member, the store's health, every member with its heartbeat, and each
pool's owner, epoch and lease age. Requests a member may not let in are
answered 503 with the refusal's code (`cluster_unavailable`,
`not_pool_owner`) and, when known, the owner's URL (`owner_url`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.auth import Authenticator
from trunkline.cluster import create_coordinator
from trunkline.config import ClusterConfig, Config
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.cluster_jobs import ClusterFence
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.idempotency import AnsweringFence, ClusterKeys
from trunkline.server.agent_ws import WORKER_RELAY
from trunkline.server.cluster_views import setup_cluster_views
from trunkline.server.idempotent import answer_after_record
from trunkline.server.keys import AUTH, AUTOSCALER, IDEMPOTENCY, METRICS
from trunkline.server.relay import FORWARD_SESSION, WorkerPipe
from trunkline.server.rest import error_response

CLUSTER = web.AppKey("cluster", ClusterNode)

__all__ = ["CLUSTER", "refusal_response", "setup_cluster"]


def refusal_response(exc: ClusterRefusal) -> web.Response:
    extra = {"owner_url": exc.owner_url} if exc.owner_url else {}
    return error_response(503, exc.code, exc.message, **extra)


def advertised_url(config: Config, cluster: ClusterConfig) -> str:
    if cluster.advertise_url:
        return cluster.advertise_url
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.gethostname()
    return f"http://{host}:{config.server.port}"


def setup_cluster(app: web.Application, dispatcher: Dispatcher, config: Config) -> ClusterNode:
    """See the module docstring; call after the autoscaler is set up."""
    cc = config.cluster
    assert cc is not None
    coordinator = create_coordinator(cc.redis_url, namespace=cc.namespace, timeout_s=cc.timeout_s)
    node = ClusterNode(
        coordinator,
        config.pools,
        url=advertised_url(config, cc),
        lease_ttl_s=cc.lease_ttl_s,
        clock=time.monotonic,
        member=cc.member,
    )
    app[CLUSTER] = node
    records = create_coordinator(
        cc.redis_url, namespace=cc.namespace, timeout_s=cc.timeout_s, single_connection=True
    )
    fence = AnsweringFence(node, dispatcher, settle_s=cc.settle_s, records=records)
    dispatcher.set_fence(fence)
    # Idempotency keys claimed in the store; a created job's answer waits for its record.
    app[IDEMPOTENCY] = ClusterKeys(dispatcher, node, records, settle_s=fence.settle_s)
    app.middlewares.append(answer_after_record)
    pipe = WorkerPipe(node)
    app[WORKER_RELAY] = pipe
    app[METRICS].registry.register(_ClusterCollector(node, dispatcher, pipe, fence))
    app.router.add_get("/v1/cluster", _cluster_handler)
    controller = app.get(AUTOSCALER)
    tasks: set[asyncio.Task[object]] = set()
    if controller is not None:
        controller.gate = node.may_act

        def gained(pool: str, epoch: int) -> None:
            if pool in controller.pools:
                task = asyncio.get_running_loop().create_task(controller.adopt_existing(pool))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        node.on_gained(gained)

    async def hand_over(pool: str) -> None:
        # Once another member owns the pool, its workers here can get nothing
        # more from us: let them reconnect (through the load balancer) and so
        # reach the owner. Not while the store is unreachable and nobody owns
        # it: they would only bounce between members that cannot take them.
        while not node.may_act(pool):
            lease = node.lease_of(pool)
            if node.store_ok and lease is not None and lease.member != node.member:
                await dispatcher.close_pool_links(pool, b"pool owner changed; reconnect")
                return
            await asyncio.sleep(node.tick_s)

    def lost(pool: str) -> None:
        task = asyncio.get_running_loop().create_task(hand_over(pool))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    node.on_lost(lost)

    async def _startup(app: web.Application) -> None:
        app[FORWARD_SESSION] = aiohttp.ClientSession()
        node.start()

    async def _shutdown(app: web.Application) -> None:
        await fence.aclose()
        await node.close()
        await app[FORWARD_SESSION].close()  # leases released: a survivor takes over at once

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    setup_cluster_views(app, node, config)  # reads at any member show the whole cluster
    return node


async def _cluster_handler(request: web.Request) -> web.Response:
    authn: Authenticator = request.app[AUTH]
    authn.require_reader(request.headers.get("Authorization"), all_rooms=True)
    return web.json_response(request.app[CLUSTER].status().as_json())


class _ClusterCollector(Collector):
    """The cluster as this member sees it, read at scrape time."""

    def __init__(
        self, node: ClusterNode, dispatcher: Dispatcher, pipe: WorkerPipe, fence: ClusterFence
    ) -> None:
        self._node = node
        self._dispatcher = dispatcher
        self._pipe = pipe
        self._fence = fence

    def collect(self) -> Iterable[Metric]:
        st = self._node.status()
        up = GaugeMetricFamily(
            "trunkline_cluster_store_up", "1 while the coordination store answers."
        )
        up.add_metric([], 1.0 if st.store == "ok" else 0.0)
        yield up
        members = GaugeMetricFamily(
            "trunkline_cluster_members", "Members with a live heartbeat, as last read."
        )
        members.add_metric([], len(st.members))
        yield members
        owner = GaugeMetricFamily(
            "trunkline_cluster_pool_owned", "1 if this member owns the pool now.", labels=["pool"]
        )
        epoch = GaugeMetricFamily(
            "trunkline_cluster_pool_epoch", "The pool's lease epoch as last seen.", labels=["pool"]
        )
        age = GaugeMetricFamily(
            "trunkline_cluster_lease_age_seconds",
            "How long this member has owned the pool (0 if not).",
            labels=["pool"],
        )
        for pl in st.leases:
            owner.add_metric([pl.pool], 1.0 if pl.ours else 0.0)
            epoch.add_metric([pl.pool], pl.epoch)
            age.add_metric([pl.pool], pl.age_s)
        yield owner
        yield epoch
        yield age
        fenced = GaugeMetricFamily(
            "trunkline_cluster_frames_fenced",
            "Frames to workers not sent: this member did not own their pool, or "
            "(relayed) the owner they came from no longer did.",
        )
        fenced.add_metric([], self._dispatcher.fenced + self._pipe.fenced)
        yield fenced
        ends = CounterMetricFamily(
            "trunkline_cluster_ends_adopted",
            "Carried-over jobs whose end their worker reported during a take-over "
            "(not placed again, or their new request cancelled).",
        )
        ends.add_metric([], self._fence.ends_adopted)
        yield ends
