"""Wiring: `build_app(config)` assembles the whole server; nothing registers
itself at import time.

Routes: `/agent` (worker protocol), `/v1/...` (REST), `/twirp/...` (LiveKit
AgentDispatchService), `/metrics`, `/healthz`, and the dashboard at `/`
(`trunkline.server.dashboard`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from trunkline import __version__
from trunkline.auth import Authenticator, refusal_reason
from trunkline.config import Config
from trunkline.core.autoscale import ReplicaState
from trunkline.providers import Provider, create_provider
from trunkline.runtime.autoscaler import SHUTDOWN_GRACE_S, AutoscaleController, replica_url
from trunkline.runtime.bridge import Bridge
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.idempotency import IdempotencyKeys
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.rollout import RolloutManager
from trunkline.runtime.room_binding import RoomBinding
from trunkline.runtime.sip_admission import SchedulerAdmission
from trunkline.runtime.sip_cluster import ClusterAdmission
from trunkline.runtime.sip_server import SipServer
from trunkline.server import rest, usage
from trunkline.server.agent_ws import agent_handler
from trunkline.server.dashboard import setup_dashboard
from trunkline.server.keys import AUTH, AUTOSCALER, CONFIG, DISPATCHER, IDEMPOTENCY, METRICS, SIP
from trunkline.server.reload import setup_reload
from trunkline.server.twirp import PREFIX, twirp_handler
from trunkline.server.webhook import setup_webhooks
from trunkline.stores import StoreError, create_store

log = logging.getLogger("trunkline.server")


async def _healthz(request: web.Request) -> web.Response:
    d: Dispatcher = request.app[DISPATCHER]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "workers": d.worker_count(),
            "live_jobs": d.live_job_count(),
            "history": d.history_status().as_json(),
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    metrics: Metrics = request.app[METRICS]
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


# Every response that is not the dashboard page (which sets its own, see
# dashboard.CSP): nothing to run, load or frame.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


async def _secure_response(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, just before its headers go out (so streamed ones,
    the dashboard feed and websocket upgrades, too; a middleware would come
    too late for them): the security headers, `Cache-Control: no-store`
    except on the dashboard's static files, and refusals (401/403) to the
    rate-limited refusal log."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Content-Security-Policy", API_CSP)
    if request.path.startswith("/dashboard/static/"):
        headers.setdefault("Cache-Control", "no-cache")  # revalidate after an upgrade
    else:
        headers["Cache-Control"] = "no-store"
    if response.status in (401, 403):
        request.app[AUTH].refusals.refused(
            _client_address(request), response.status, request.path, refusal_reason()
        )


def _client_address(request: web.Request) -> str:
    """Who sent `request`: the peer address, or behind a TLS proxy the address
    that proxy appended to `X-Forwarded-For` (the last entry; earlier ones
    come from the client and prove nothing)."""
    if request.app[CONFIG].server.behind_tls_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return request.remote or "?"


def build_app(config: Config) -> web.Application:
    """The complete server application for `config`."""
    if not config.keys:
        raise ValueError("no API keys configured: add a [keys] section or run with --dev")
    metrics = Metrics()
    dispatcher = Dispatcher(config, metrics, history=create_store(config))
    app = web.Application(middlewares=[rest.errors_middleware], client_max_size=1 << 20)
    app.on_response_prepare.append(_secure_response)
    app[CONFIG] = config
    app[AUTH] = Authenticator(config.keys)
    app[METRICS] = metrics
    app[DISPATCHER] = dispatcher
    app[IDEMPOTENCY] = IdempotencyKeys(dispatcher)  # cluster mode: ClusterKeys (setup_cluster)
    app.router.add_get("/agent", agent_handler)
    app.router.add_routes(rest.routes)
    app.router.add_routes(usage.routes)
    app.router.add_post(PREFIX + "{method}", twirp_handler)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)

    sip_server: SipServer | None = None
    binding: RoomBinding | None = None
    sip_cluster: ClusterAdmission | None = None
    if config.sip is not None:
        admission: SchedulerAdmission | ClusterAdmission
        if config.cluster is not None:
            # Calls at any member, jobs at the pool's owner (docs/cluster.md).
            admission = sip_cluster = ClusterAdmission(dispatcher, *next(iter(config.keys.items())))
        else:
            admission = SchedulerAdmission(dispatcher)
        # The scheduler always decides a call: refused at its max wait, or an
        # offer answered / timed out within availability_timeout_s. The edge's
        # own deadline is only a backstop, so it must not cut an offer short.
        offer_s = max(
            [config.defaults.availability_timeout_s]
            + [p.availability_timeout_s for p in config.pools.values()]
        )
        sip_server = SipServer(config.sip, admission, decision_grace_s=offer_s + 0.5)
        admission.edge = sip_server
        metrics.bind_sip(sip_server.edge.stats)
        if (
            isinstance(admission, SchedulerAdmission)
            and config.livekit is not None
            and any(t.to_livekit for t in config.sip.trunks)
        ):
            poll_s = config.sip.livekit_poll_s
            admission.binding = binding = RoomBinding(
                dispatcher, config.livekit, poll_after_s=poll_s, poll_interval_s=poll_s
            )
    app[SIP] = sip_server
    bridge: Bridge | None = None
    if config.livekit is not None and config.livekit.bridge is not None:
        bridge = Bridge(dispatcher, config.livekit, lambda name: _starting_slots(app, name))

    async def _startup(app: web.Application) -> None:
        await dispatcher.open_history()  # an unusable store stops the start here
        dispatcher.start(asyncio.get_running_loop())
        # Everything alive now (modules, config, app) lives for the process:
        # move it out of the collector's reach, so full collections, which
        # pause the loop, scan only what serving creates.
        gc.collect()
        gc.freeze()
        if binding is not None:
            await binding.start()
        if sip_server is not None:
            await sip_server.start()
        if bridge is not None:
            await bridge.start()

    async def _shutdown(app: web.Application) -> None:
        if bridge is not None:
            await bridge.close()  # running bridged jobs go on; the workers migrate
        if sip_server is not None:
            await sip_server.close()
        if binding is not None:
            await binding.close()
        dispatcher.close()
        await dispatcher.close_links(b"server shutting down")
        await dispatcher.aclose()

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    if config.replica_pools:
        _setup_autoscale(app, dispatcher, config)
    if config.cluster is not None:
        from trunkline.server.cluster_api import setup_cluster  # imports redis-py

        node = setup_cluster(app, dispatcher, config)
        if bridge is not None:
            # Only a pool's owner registers upstream for it (docs/cluster.md).
            bridge.gate = node.may_act
            node.on_gained(lambda pool, epoch: bridge.pool_gained(pool))
            node.on_lost(bridge.pool_lost)
        if sip_cluster is not None:
            from trunkline.server.sip_cluster_api import setup_sip_cluster

            setup_sip_cluster(app, config, node, sip_cluster)
    if config.livekit is not None:
        setup_webhooks(app, config.livekit, binding)
    setup_reload(app)
    setup_dashboard(app)
    return app


def _starting_slots(app: web.Application, pool: str) -> int | None:
    """Slots of the pool's replicas still starting (the bridge counts them as
    capacity on its way); None when the pool is not autoscaled."""
    controller = app.get(AUTOSCALER)
    scaler = controller.scalers.get(pool) if controller is not None else None
    if scaler is None:
        return None
    starting = sum(1 for r in scaler.replicas.values() if r.state is ReplicaState.STARTING)
    return starting * scaler.spec.slots_per_replica


def _kubernetes_settings(config: Config) -> dict[str, Any]:
    """The Kubernetes provider's settings: `[kubernetes]` plus, per pool, its pod
    template and the drain limit its pods' termination grace must cover."""
    from trunkline.providers.kubernetes import PodPool

    pools = {
        name: PodPool(rp.pod_template, rp.scale.drain_timeout_s)
        for name, rp in config.replica_pools.items()
        if rp.provider == "kubernetes"
    }
    return {"pools": pools, **dataclasses.asdict(config.kubernetes)}


def _setup_autoscale(app: web.Application, dispatcher: Dispatcher, config: Config) -> None:
    """The controller for `config.replica_pools`: stored as `app[AUTOSCALER]`
    (read by `GET /v1/pools`), the pools' minimum replicas started once the
    dispatcher runs, every replica stopped at shutdown before the worker
    connections are closed (so replicas drain instead of reconnecting to a
    server that is going away)."""
    run_dir = config.autoscale.run_dir or tempfile.mkdtemp(prefix="trunkline-replicas-")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    api_key, api_secret = next(iter(config.keys.items()))
    providers: dict[str, Provider] = {}
    for rp in config.replica_pools.values():
        if rp.provider not in providers:
            # Each provider's own settings; "local" keeps logs and records in run_dir.
            settings: dict[str, Any] = {"run_dir": run_dir} if rp.provider == "local" else {}
            if rp.provider == "kubernetes":
                settings = _kubernetes_settings(config)
            providers[rp.provider] = create_provider(rp.provider, **settings)
    controller = AutoscaleController(
        dispatcher,
        config.replica_pools,
        providers,
        url=replica_url(config),
        api_key=api_key,
        api_secret=api_secret,
        run_dir=str(run_dir),
    )
    app[AUTOSCALER] = controller
    RolloutManager(controller)  # hooks itself in: controller.hook
    app[METRICS].bind_autoscale(lambda: controller.scalers)
    # Each replica connects to its own URL, `<url>/replica/<token>`: both the SDK
    # and livekit-agents keep a path prefix, so `/agent` is reached as
    # `/replica/<token>/agent` and the token ties the worker to its replica.
    app.router.add_get("/replica/{token}/agent", agent_handler)

    async def _startup(app: web.Application) -> None:
        log.info(
            "autoscaling",
            extra={
                "pools": ",".join(config.replica_pools),
                "run_dir": str(run_dir),
                "url": controller.url,
            },
        )
        await controller.start()

    async def _shutdown(app: web.Application) -> None:
        await controller.close(SHUTDOWN_GRACE_S)

    app.on_startup.append(_startup)
    # First: replicas drain and exit while the server still answers them.
    app.on_shutdown.insert(0, _shutdown)


def run_server(config: Config) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    app = build_app(config)
    log.info(
        "trunkline listening",
        extra={
            "host": config.server.host,
            "port": config.server.port,
            "dev": config.dev,
            "pools": ",".join(config.pools) or "-",
        },
    )
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            print=None,
            access_log=None,
            handle_signals=True,
        )
    except StoreError as exc:
        # At start (the store cannot be used at all): say why and stop.
        raise SystemExit(f"trunkline: job history: {exc}") from None
