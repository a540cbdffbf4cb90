"""`setup_autoscale(app, dispatcher, config)`: attach the controller to a server app.

Called by `build_app` when the config has pools with a `command`. It creates
the run dir (replica logs), the local provider and the controller, stores the
controller as `app[AUTOSCALER]` (read by `GET /v1/pools`), starts the pools'
minimum replicas once the dispatcher runs, and stops every replica at shutdown
before the worker connections are closed (so replicas drain instead of
reconnecting to a server that is going away).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from trunkline.autoscale.controller import AutoscaleController
from trunkline.autoscale.local import LocalProvider
from trunkline.config import Config
from trunkline.server.agent_ws import agent_handler
from trunkline.server.keys import AUTOSCALER, METRICS

if TYPE_CHECKING:
    from trunkline.server.dispatcher import Dispatcher

log = logging.getLogger("trunkline.autoscale")

# How long replicas get to exit when the server shuts down, before SIGKILL.
SHUTDOWN_GRACE_S = 10.0


def replica_url(config: Config) -> str:
    """The URL replicas connect to: `[autoscale] url`, else the server's own port
    on loopback (an unspecified bind address is reached through 127.0.0.1)."""
    if config.autoscale.url:
        return config.autoscale.url
    host = config.server.host
    if host in ("", "0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if config.server.port == 0:
        raise ValueError(
            "autoscaled pools need the server's port: set [server] port (not 0) or [autoscale] url"
        )
    return f"ws://{host}:{config.server.port}"


def setup_autoscale(app: web.Application, dispatcher: Dispatcher, config: Config) -> None:
    """Create the controller for `config.replica_pools` and hook it into `app`."""
    run_dir = config.autoscale.run_dir or tempfile.mkdtemp(prefix="trunkline-replicas-")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    api_key, api_secret = next(iter(config.keys.items()))
    controller = AutoscaleController(
        dispatcher,
        config.replica_pools,
        LocalProvider(run_dir),
        url=replica_url(config),
        api_key=api_key,
        api_secret=api_secret,
        run_dir=str(run_dir),
    )
    app[AUTOSCALER] = controller
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
        controller.start()

    async def _shutdown(app: web.Application) -> None:
        await controller.close(SHUTDOWN_GRACE_S)

    app.on_startup.append(_startup)
    # First: replicas drain and exit while the server still answers them.
    app.on_shutdown.insert(0, _shutdown)
