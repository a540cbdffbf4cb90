"""Config reload and rollout commands over HTTP, and SIGHUP.

- `POST /v1/config/reload` (admin, not room-scoped): `Reloader.reload()`; 200
  with what changed, 400 `invalid_config` with every error (nothing applied).
- `POST /v1/pools/{pool}/rollout` (same auth), body `{"action": "start" |
  "promote" | "abort", "canary_percent": N}`: `start` reloads the file first
  (so an edited command or template is what rolls out) and rolls the pool to
  its configured version, with `canary_percent` instead of the pool's own;
  `promote` and `abort` act on its rollout. 200 with the pool's rollout, 404
  for a pool that is not autoscaled, 409 when there is nothing to promote or
  abort.
- SIGHUP: the same reload; the outcome is logged (`trunkline.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

from aiohttp import web

from trunkline.auth import AuthError, room_scope
from trunkline.config import ConfigError
from trunkline.runtime.reload import Reloader
from trunkline.runtime.rollout import RolloutError, RolloutManager
from trunkline.server.keys import AUTH, AUTOSCALER, CONFIG, DISPATCHER, SIP
from trunkline.server.views import json_response

log = logging.getLogger("trunkline.reload")

RELOADER = web.AppKey("reloader", Reloader)
MAX_CANARY_BODY = 4096  # bytes: the rollout body is a few keys


def _admin(request: web.Request) -> None:
    claims = request.app[AUTH].require_admin(request.headers.get("Authorization"))
    if room_scope(claims):
        raise AuthError(
            "permission_denied",
            f"token is scoped to room {room_scope(claims)!r}; this endpoint needs a roomAdmin "
            "token without a room",
        )


def _error(status: int, code: str, message: str) -> web.Response:
    return json_response({"code": code, "message": message}, status=status)


async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file and apply what can change live."""
    _admin(request)
    try:
        result = await request.app[RELOADER].reload()
    except ConfigError as exc:
        log.warning("config reload refused", extra={"error": str(exc)})
        return _error(400, "invalid_config", str(exc))
    return json_response(result.as_json())


async def rollout(request: web.Request) -> web.Response:
    """Start, promote or abort a pool's rollout."""
    _admin(request)
    pool = request.match_info["pool"]
    controller = request.app.get(AUTOSCALER)
    manager = controller.hook if controller is not None else None
    if not isinstance(manager, RolloutManager) or pool not in controller.scalers:  # type: ignore[union-attr]
        return _error(404, "not_found", f"pool {pool!r} is not autoscaled (it has no command)")
    raw = await request.content.read(MAX_CANARY_BODY + 1)
    if len(raw) > MAX_CANARY_BODY:
        return _error(413, "too_large", f"body over {MAX_CANARY_BODY} bytes")
    try:
        body: Any = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return _error(400, "invalid_argument", "body must be JSON")
    if not isinstance(body, dict) or set(body) - {"action", "canary_percent"}:
        return _error(400, "invalid_argument", 'body: {"action": ..., "canary_percent": N}')
    action = body.get("action", "start")
    pct = body.get("canary_percent")
    if action not in ("start", "promote", "abort"):
        return _error(400, "invalid_argument", "action must be start, promote or abort")
    if pct is not None and (
        isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct < 100
    ):
        return _error(400, "invalid_argument", "canary_percent must be a number >= 0 and < 100")
    try:
        if action == "start":
            share = None if pct is None else float(pct)
            result = await request.app[RELOADER].reload(canary={pool: share})
            message = result.rollouts.get(pool) or manager.begin(pool, pct)
        elif action == "promote":
            message = manager.promote(pool)
        else:
            message = manager.abort(pool)
    except ConfigError as exc:
        return _error(400, "invalid_config", str(exc))
    except RolloutError as exc:
        return _error(409, "failed_precondition", str(exc))
    return json_response(
        {"pool": pool, "message": message, "version": manager.version(pool),
         "rollout": manager.rollout_json(pool)}
    )  # fmt: skip


def setup_reload(app: web.Application) -> None:
    """Routes and the SIGHUP handler; call at the end of `build_app`."""
    controller = app.get(AUTOSCALER)
    manager = controller.hook if controller is not None else None
    app[RELOADER] = Reloader(
        app[CONFIG],
        app[DISPATCHER],
        app[AUTH],
        manager if isinstance(manager, RolloutManager) else None,
        app[SIP],
    )
    app.router.add_post("/v1/config/reload", reload_config)
    app.router.add_post("/v1/pools/{pool}/rollout", rollout)

    tasks: set[asyncio.Task[None]] = set()

    async def sighup_reload() -> None:
        try:
            await app[RELOADER].reload()
        except ConfigError as exc:
            log.warning("config reload refused", extra={"error": str(exc)})
        except Exception:
            log.exception("config reload failed")

    def on_sighup() -> None:
        task = asyncio.ensure_future(sighup_reload())
        tasks.add(task)  # kept until done (the loop holds only a weak reference)
        task.add_done_callback(tasks.discard)

    async def _startup(app: web.Application) -> None:
        # Only the main thread may own signals (tests run servers elsewhere).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)

    async def _cleanup(app: web.Application) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
