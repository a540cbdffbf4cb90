"""The autoscale controller: runs the pure policy against the live dispatcher.

Theory of operation
-------------------
One controller per server process owns a `PoolScaler` (core policy) for each
pool that has a `command`, and a provider that starts and stops replicas.

- Demand in. The dispatcher calls `_on_flush` after every command it has
  carried out; the controller coalesces these with `loop.call_soon`, so a
  burst of requests costs one evaluation per loop iteration, and a job queued
  now is turned into a provider start within the same few milliseconds. A
  timer armed at the policies' next deadline (at most `TICK_S` away) runs the
  time-driven parts: stabilization windows, backoff, drain and start timeouts,
  refusals ageing out of the demand window.
- Replica <-> worker. Every replica gets a unique token inside its URL:
  `LIVEKIT_URL=<url>/replica/<token>`, so the trunkline SDK and livekit-agents
  (both keep a path prefix) connect to `/replica/<token>/agent` and `agent_ws`
  hands the token to `worker_registered`. When the pool's env sets its own
  `LIVEKIT_URL`, the token goes in `LIVEKIT_WORKER_TOKEN` instead (sent as the
  `worker_token` query parameter). Not by default: livekit-agents 1.8.9 takes
  that variable to mean "hosted on LiveKit Cloud" and replaces the agent's own
  `load_fnc`/`load_threshold` with its CPU-based defaults. Registration under
  the pool's agent name makes the replica READY; the worker's used slots and
  the pool's demand are read through the dispatcher's queries.
- Actions out. `StartReplica` -> provider start (a failed start counts as a
  replica failure); `DrainReplica` -> `Dispatcher.drain` (no new offers);
  `StopReplica` -> provider stop (SIGTERM, SIGKILL after the grace). When a
  replica's process exits, its worker is declared gone
  (`Dispatcher.worker_gone`): a dead process cannot reconnect, so its jobs end
  `worker_lost` (or are re-dispatched) without waiting for the grace period.
- Versions. Each replica runs one version of its pool (`versions`: replica
  id -> the digest of what started it, config.replica_version); the provider
  keeps it with the replica, so an adopted one is known too, and its worker
  is tagged with it (`Dispatcher.tag_worker`). A `RolloutHook` (the rollout
  manager, runtime/rollout.py) picks the version of each start and plans a
  rollout after each evaluation; without one every start runs the pool's
  configured version.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from trunkline.config import Config, ReplicaPoolConfig
from trunkline.core.autoscale import (
    Demand,
    DrainReplica,
    PoolScaler,
    Replica,
    ReplicaState,
    ScaleAction,
    ScaleEvent,
    StartReplica,
    StopReplica,
)
from trunkline.providers import Launch, Provider, ProviderError, ReplicaHandle

if TYPE_CHECKING:
    from trunkline.runtime.dispatcher import Dispatcher

log = logging.getLogger("trunkline.autoscale")

# How long replicas get to exit when the server shuts down, before SIGKILL.
SHUTDOWN_GRACE_S = 10.0

# Longest time between two evaluations of an idle pool (refused demand ages out).
TICK_S = 1.0


class RolloutHook(Protocol):
    """What the rollout manager adds to the controller (runtime/rollout.py)."""

    def version_for_start(self, pool: str) -> str:
        """The version a replica the pool starts now should run."""
        ...

    def after_evaluate(self, pool: str, demand: Demand, used: Mapping[str, int]) -> None:
        """Plan the pool's rollout, if one runs, after the policy has decided."""
        ...

    def rollout_json(self, pool: str) -> dict[str, Any] | None:
        """The pool's current (or last) rollout, for `/v1/pools`."""
        ...


class AutoscaleController:
    """Scales the replica pools of `pools`; see the module docstring.

    `url`, `api_key`, `api_secret` are what replicas get in `LIVEKIT_URL`,
    `LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET` unless their pool's env sets them.
    `providers` maps a provider name (a replica pool's `provider` key) to the
    provider that runs those pools' replicas. Call `await start()` once the
    dispatcher runs (it adopts replicas an earlier run left, then starts each
    pool's minimum), `close()` at shutdown.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        pools: Mapping[str, ReplicaPoolConfig],
        providers: Mapping[str, Provider],
        *,
        url: str,
        api_key: str,
        api_secret: str,
        run_dir: str = "",
    ) -> None:
        self.dispatcher = dispatcher
        self.pools = dict(pools)
        missing = sorted({rp.provider for rp in pools.values()} - set(providers))
        if missing:
            raise ValueError(f"no provider given for {', '.join(missing)}")
        self.providers = dict(providers)
        self.url = url
        self.run_dir = run_dir
        self._creds = (api_key, api_secret)
        self.scalers = {name: PoolScaler(name, rp.scale) for name, rp in pools.items()}
        self.handles: dict[str, ReplicaHandle] = {}
        # Loop time at which the provider was asked to start each replica.
        self.start_issued_at: dict[str, float] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # token -> (pool, replica id)
        self._last_worker: dict[str, str] = {}  # replica id -> last registered worker
        self._stop_after_start: dict[str, float] = {}  # replica id -> grace
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._logged: dict[str, int] = {}  # pool -> events already logged
        self.versions: dict[str, str] = {}  # replica id -> the version it runs
        self.adopted: set[str] = set()  # replicas found running, not started by this run
        # pool -> version -> the config that starts it (old versions stay for an abort)
        self.configs: dict[str, dict[str, ReplicaPoolConfig]] = {
            name: {rp.version: rp} for name, rp in pools.items()
        }
        self.hook: RolloutHook | None = None
        # Cluster mode: scale a pool only while this server owns it (None: always).
        self.gate: Callable[[str], bool] | None = None

    # ---------------------------------------------------------------- lifecycle

    def provider(self, pool: str) -> Provider:
        """The provider that runs `pool`'s replicas."""
        return self.providers[self.pools[pool].provider]

    async def start(self) -> None:
        """Adopt the replicas an earlier server run left running (their workers
        reconnect with the same token), hook into the dispatcher, and start
        each pool's minimum replicas."""
        for pool in self.pools:
            for handle in await self.provider(pool).list_existing(pool):
                self._adopt(pool, handle)
        d = self.dispatcher
        d.add_flush_listener(self._on_flush)
        d.add_worker_observer(self)
        self._run()

    def _adopt(self, pool: str, handle: ReplicaHandle) -> None:
        r = self.scalers[pool].adopt(self.dispatcher.now(), handle.replica_id)
        token = handle.token
        self._tokens[token] = (pool, r.id)
        self.handles[r.id] = handle
        self.start_issued_at[r.id] = self.dispatcher.now()
        self.versions[r.id] = str(handle.describe().get("version") or "")
        self.adopted.add(r.id)

        def on_exit(code: int | None, detail: str) -> None:
            self._exited(pool, r.id, token, code, detail)

        self.provider(pool).adopt(handle, on_exit)
        log.info("replica adopted", extra={"replica": r.id, "pool": pool, "where": handle.location})

    async def adopt_existing(self, pool: str) -> None:
        """This server became `pool`'s owner (cluster mode): adopt the
        replicas the provider finds that we do not know yet (an earlier
        owner started them), then evaluate, so none is started twice."""
        for handle in await self.provider(pool).list_existing(pool):
            if handle.replica_id not in self.handles:
                self._adopt(pool, handle)
        self._on_flush()

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop scaling and stop every replica (SIGTERM; SIGKILL after `grace_s`)."""
        self._closed = True
        d = self.dispatcher
        d.remove_flush_listener(self._on_flush)
        d.remove_worker_observer(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for provider in self.providers.values():
            await provider.aclose(grace_s)

    # ------------------------------------------------------------ dispatcher hooks

    def _on_flush(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def worker_registered(self, worker_id: str, agent_name: str, token: str) -> None:
        """A worker registered on `/agent` with this `worker_token` ("" if none)."""
        found = self._tokens.get(token) if token else None
        if found is None:
            return
        pool, rid = found
        scaler = self.scalers[pool]
        if agent_name != pool:
            r = scaler.replicas.get(rid)
            if r is not None:
                r.detail = f"its worker registered as agent {agent_name!r}, expected {pool!r}"
            log.warning(
                "replica registered under another agent name",
                extra={"replica": rid, "agent_name": agent_name, "expected": pool},
            )
            return
        r = scaler.replica_ready(self.dispatcher.now(), rid, worker_id)
        if r is None:
            return
        self._last_worker[rid] = worker_id
        version = self.versions.get(rid, "")
        if version:
            self.dispatcher.tag_worker(worker_id, version)
        if r.state is ReplicaState.DRAINING:
            self.dispatcher.drain(worker_id)
        log.info(
            "replica ready",
            extra={
                "replica": rid,
                "worker_id": worker_id,
                "cold_start_s": round((r.ready_at or r.created_at) - r.created_at, 3),
            },
        )
        self._on_flush()

    def worker_gone(self, worker_id: str) -> None:
        """A worker's connection closed (its process may still reconnect)."""
        for scaler in self.scalers.values():
            scaler.worker_gone(worker_id)
        self._on_flush()

    # ---------------------------------------------------------------- evaluation

    def _run(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        for name in self.scalers:
            self._evaluate(name)
        self._arm()

    def demand(self, name: str) -> tuple[Demand, dict[str, int]]:
        """The pool's demand now (the core counts it: `Scheduler.demand`), and
        the slots each replica's worker holds."""
        d = self.dispatcher
        scaler = self.scalers[name]
        used: dict[str, int] = {}
        for r in scaler.replicas.values():
            if r.worker_id is not None:
                n = d.slots_used(r.worker_id)
                if n is not None:
                    used[r.id] = n
        return d.demand(name, scaler.spec.refused_window_s), used

    def _evaluate(self, name: str) -> None:
        if self.gate is not None and not self.gate(name):
            return  # another cluster member owns the pool and scales it
        scaler = self.scalers[name]
        demand, used = self.demand(name)
        scaler.evaluate(self.dispatcher.now(), demand, used)
        if self.hook is not None:
            self.hook.after_evaluate(name, demand, used)
        self._carry_out(name, scaler.take_actions())
        self._log_events(scaler)

    def _log_events(self, scaler: PoolScaler) -> None:
        fresh = scaler.event_count - self._logged.get(scaler.pool, 0)
        self._logged[scaler.pool] = scaler.event_count
        if fresh > 0:
            for ev in list(scaler.events)[-fresh:]:
                _log_event(ev)
                self.dispatcher.record_scale_event(ev)  # kept in the job history

    def _arm(self) -> None:
        d = self.dispatcher
        now = d.now()
        when = now + TICK_S
        for scaler in self.scalers.values():
            t = scaler.next_deadline()
            if t is not None:
                when = min(when, t)
        when = max(when, now)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._run()

    # --------------------------------------------------------------------- actions

    def _carry_out(self, pool: str, actions: list[ScaleAction]) -> None:
        d = self.dispatcher
        for action in actions:
            r = action.replica
            if isinstance(action, StartReplica):
                self._spawn(self._launch(pool, r))
            elif isinstance(action, DrainReplica):
                if r.worker_id is not None:
                    d.drain(r.worker_id)
                log.info("replica draining", extra={"replica": r.id, "worker_id": r.worker_id})
            else:
                assert isinstance(action, StopReplica)
                handle = self.handles.get(r.id)
                log.info("replica stopping", extra={"replica": r.id, "reason": action.reason})
                if handle is None:
                    self._stop_after_start[r.id] = action.grace_s
                else:
                    self._spawn(self.provider(pool).stop(handle, action.grace_s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch_env(
        self, pool: str, r: Replica, token: str, rp: ReplicaPoolConfig | None = None
    ) -> dict[str, str]:
        key, secret = self._creds
        url = f"{self.url.rstrip('/')}/replica/{token}"
        env = {"LIVEKIT_URL": url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret}
        own = (rp or self.pools[pool]).env
        env.update(own)
        if "LIVEKIT_URL" in own:
            env["LIVEKIT_WORKER_TOKEN"] = token
        env["TRUNKLINE_REPLICA_ID"] = r.id
        env.setdefault("LIVEKIT_AGENT_NAME", pool)
        return env

    async def _launch(self, pool: str, r: Replica) -> None:
        token = "tlr_" + secrets.token_urlsafe(18)
        self._tokens[token] = (pool, r.id)
        version = self.versions.get(r.id) or (
            self.hook.version_for_start(pool) if self.hook else self.pools[pool].version
        )
        self.versions[r.id] = version
        rp = self.configs.get(pool, {}).get(version) or self.pools[pool]
        env = self._launch_env(pool, r, token, rp)
        launch = Launch(
            r.id, pool, rp.command, env, token, version=version, pod_template=rp.pod_template
        )
        provider = self.provider(pool)
        loop = asyncio.get_running_loop()
        self.start_issued_at[r.id] = loop.time()

        def on_exit(code: int | None, detail: str) -> None:
            self._exited(pool, r.id, token, code, detail)

        try:
            handle = await provider.start(launch, on_exit)
        except ProviderError as exc:
            log.warning("replica could not start", extra={"replica": r.id, "error": str(exc)})
            self._exited(pool, r.id, token, None, str(exc))
            return
        self.handles[r.id] = handle
        grace = self._stop_after_start.pop(r.id, None)
        if grace is not None or self._closed:
            await provider.stop(handle, grace or 0.0)

    def _exited(self, pool: str, rid: str, token: str, code: int | None, detail: str) -> None:
        d = self.dispatcher
        self._tokens.pop(token, None)
        if self._closed:
            return
        scaler = self.scalers[pool]
        scaler.replica_exited(d.now(), rid, code, detail)
        self._log_events(scaler)
        # The scaler keeps a bounded history of finished replicas; so do we.
        known = set().union(*(s.replicas for s in self.scalers.values()))
        for gone in [k for k in self.handles if k not in known]:
            del self.handles[gone]
            self.start_issued_at.pop(gone, None)
        for gone in [k for k in self.versions if k not in known]:
            del self.versions[gone]
        wid = self._last_worker.pop(rid, None)
        if wid is not None:
            d.worker_gone(wid, f"replica {rid} {detail}")
        self._on_flush()

    # ------------------------------------------------------------------------ views

    def replicas_json(self, pool: str) -> list[dict[str, Any]]:
        """The pool's replicas as `/v1/pools` shows them; times are Unix seconds."""
        scaler = self.scalers.get(pool)
        if scaler is None:
            return []
        d = self.dispatcher
        out = []
        for r in scaler.replicas.values():
            handle = self.handles.get(r.id)
            where = handle.describe() if handle else {}
            w = d.worker(r.worker_id) if r.worker_id else None
            out.append(
                {
                    "id": r.id,
                    "state": r.state.value,
                    "pid": where.get("pid"),
                    "provider": self.pools[pool].provider,
                    "location": handle.location if handle else None,
                    "where": where,
                    "worker_id": r.worker_id,
                    "started_at": d.wall(r.created_at),
                    "ready_at": d.wall(r.ready_at),
                    "cold_start_s": (
                        round(r.ready_at - r.created_at, 3) if r.ready_at is not None else None
                    ),
                    "drain_started_at": d.wall(r.drain_started_at),
                    "ended_at": d.wall(r.ended_at),
                    "exit_code": r.exit_code,
                    "slots_used": w.used if w is not None else 0,
                    "slots_cap": w.capacity if w is not None else scaler.spec.slots_per_replica,
                    "log": where.get("log"),
                    "detail": r.detail,
                    "version": self.versions.get(r.id, ""),
                }
            )
        return out

    def events_json(self, pool: str, limit: int = 50) -> list[dict[str, Any]]:
        """The pool's most recent scale events (oldest first) with their numbers."""
        scaler = self.scalers.get(pool)
        if scaler is None:
            return []
        d = self.dispatcher
        events = list(scaler.events)[-limit:]
        return [
            {
                "at": d.wall(ev.at),
                "kind": ev.kind,
                "from": ev.from_replicas,
                "to": ev.to_replicas,
                "desired": ev.desired,
                "demand": {
                    "running": ev.demand.running,
                    "reserved": ev.demand.reserved,
                    "queued": ev.demand.queued,
                    "refused": ev.demand.refused,
                    "total": ev.demand.total,
                },
                "slots_per_replica": ev.capacity,
                "spare_slots": ev.spare_slots,
                "reason": ev.reason,
                "replicas": list(ev.replicas),
            }
            for ev in events
        ]

    def settings_json(self, pool: str) -> dict[str, Any] | None:
        rp = self.pools.get(pool)
        if rp is None:
            return None
        s = rp.scale
        return {
            "provider": rp.provider,
            "command": list(rp.command),
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "spare_slots": s.spare_slots,
            "scale_down_delay_s": s.scale_down_delay_s,
            "drain_timeout_s": s.drain_timeout_s,
            "start_timeout_s": s.start_timeout_s,
            "run_dir": self.run_dir,
            "version": rp.version,
        }

    def rollout_json(self, pool: str) -> dict[str, Any] | None:
        """The pool's current or last rollout (None: none yet, or no manager)."""
        return self.hook.rollout_json(pool) if self.hook is not None else None


def _log_event(ev: ScaleEvent) -> None:
    log.info(
        "scale event",
        extra={
            "pool": ev.pool,
            "kind": ev.kind,
            "from": ev.from_replicas,
            "to": ev.to_replicas,
            "desired": ev.desired,
            "running": ev.demand.running,
            "reserved": ev.demand.reserved,
            "queued": ev.demand.queued,
            "refused": ev.demand.refused,
            "reason": ev.reason,
        },
    )


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
