"""The rollout manager: runs the pure rollout planner (core/rollout.py) against
the autoscaler and the Dispatcher.

Theory of operation
-------------------
One manager per server, hooked into the `AutoscaleController` as its
`RolloutHook`:

- Starting. `apply(pool, config)` (a config reload, or `trunkline rollout`)
  records the pool's new config under its version (the controller keeps every
  version's config: an abort starts the old one again) and, when some serving
  replica runs another version, begins a `Rollout` from the version most of
  them run. A rollout already going to that version is left alone; one going
  elsewhere is superseded (its replicas are simply outgoing for the new one).
- Planning. After every evaluation of the pool (`after_evaluate`, inside the
  controller's own pass, so the actions go out with the policy's), the planner
  gets every replica's version, state and used slots and `need` = the larger
  of the policy's desired count now and over its scale-down window (the floor
  it would itself keep). Its `StartReplicas` become `PoolScaler.add_replica`
  with the version recorded for the launch, `Retire` becomes
  `PoolScaler.retire` (a drain, stopped once empty or at `drain_timeout_s`),
  `Route` becomes `Dispatcher.route` (the scheduler's placement preference).
  While a rollout runs, the policy does not scale down (`hold_down`).
- Calls. As a job observer it hears every ended job: the version that served
  it is the `version` event in its trace; a job that ended `failed` or
  `worker_lost` there counts as a failed call of that version (the automatic
  stop's input).
- Restart. At a pool's first evaluation, replicas adopted with another known
  version than the configured one resume the rollout (a canary's share, an
  abort in progress are not remembered: it rolls to the configured version).
- Ending. When the planner reports the rollout over, the route is cleared,
  scale-down is allowed again, and the version the pool now runs is what
  later starts use (after a rollback: the old one, until the next rollout).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.config import ReplicaPoolConfig
from trunkline.core import Job, JobState
from trunkline.core.autoscale import SERVING, Demand, ReplicaState
from trunkline.core.rollout import (
    Phase,
    ReplicaView,
    Retire,
    Rollout,
    RolloutSpec,
    Route,
    StartReplicas,
)

if TYPE_CHECKING:
    from trunkline.runtime.autoscaler import AutoscaleController

log = logging.getLogger("trunkline.rollout")

# Job ends that count against the version that served them.
FAILED_ENDS = frozenset({JobState.FAILED, JobState.WORKER_LOST})


class RolloutError(Exception):
    """A rollout command that cannot be carried out; the message says why."""


class RolloutManager:
    """Rollouts of the controller's pools; see the module docstring."""

    def __init__(self, controller: AutoscaleController) -> None:
        self.controller = controller
        self.dispatcher = controller.dispatcher
        self.rollouts: dict[str, Rollout] = {}  # pool -> current or last rollout
        self.running: dict[str, str] = {}  # pool -> the version it runs when no rollout does
        self._logged: dict[str, int] = {}
        self.finished: Counter[tuple[str, str]] = Counter()  # (pool, final phase) -> rollouts
        self._checked: set[str] = set()  # pools looked at for a rollout to resume
        controller.hook = self
        self.dispatcher.add_job_observer(self)
        self.dispatcher.metrics.registry.register(RolloutCollector(self))

    # --------------------------------------------------------------- queries

    def version(self, pool: str) -> str:
        """The version the pool runs, or is moving to."""
        ro = self.rollouts.get(pool)
        if ro is not None and ro.active:
            return ro.target
        return self.running.get(pool) or self.controller.pools[pool].version

    def active(self, pool: str) -> Rollout | None:
        ro = self.rollouts.get(pool)
        return ro if ro is not None and ro.active else None

    # -------------------------------------------------------------- commands

    def apply(
        self,
        pool: str,
        rp: ReplicaPoolConfig,
        canary_percent: float | None = None,
        *,
        roll: bool = True,
    ) -> str:
        """The pool's config is now `rp`: adopt its scaling settings and, with
        `roll`, roll to its version if replicas run another. Returns what
        happened, in words ("" when nothing was rolled)."""
        c = self.controller
        c.pools[pool] = rp
        c.configs.setdefault(pool, {})[rp.version] = rp
        c.scalers[pool].spec = rp.scale
        c._on_flush()  # the new settings take effect in the next pass
        return self.begin(pool, canary_percent) if roll else ""

    def begin(self, pool: str, canary_percent: float | None = None) -> str:
        """Roll the pool to its configured version (see `apply`)."""
        c = self.controller
        if pool not in c.scalers:
            raise RolloutError(f"pool {pool!r} is not autoscaled (it has no command)")
        rp = c.pools[pool]
        new = rp.version
        now = self.dispatcher.now()
        cur = self.active(pool)
        if cur is not None and cur.target == new:
            if canary_percent is not None and cur.set_canary(now, canary_percent):
                self._log_events(pool, cur)
                c._on_flush()
                return f"canary of {new} now takes {canary_percent:g} % of new calls"
            return f"a rollout to {new} is already in progress ({cur.phase.value})"
        scaler = c.scalers[pool]
        serving = [r for r in scaler.replicas.values() if r.state in SERVING]
        others = Counter(c.versions.get(r.id, "") for r in serving)
        others.pop(new, None)
        if cur is None and not others:
            self.running[pool] = new
            return f"every replica runs {new}: nothing to roll out"
        old = others.most_common(1)[0][0] if others else self.version(pool)
        if cur is not None:
            cur.supersede(now, new)
            self.finished[(pool, cur.phase.value)] += 1
            self._log_events(pool, cur)
        spec: RolloutSpec = rp.rollout
        ro = Rollout(now, pool, old, new, spec, canary_percent=canary_percent)
        self.rollouts[pool] = ro
        self._logged[pool] = 0
        scaler.hold_down = True
        self._log_events(pool, ro)
        c._on_flush()  # plan at once, in the controller's next pass
        return f"rollout {old or '(none)'} -> {new} started ({ro.phase.value})"

    def promote(self, pool: str) -> str:
        ro = self.active(pool)
        if ro is None or not ro.promote(self.dispatcher.now()):
            raise RolloutError(f"pool {pool!r} has no canary to promote")
        self._log_events(pool, ro)
        self.controller._on_flush()
        return f"canary of {ro.new} promoted: rolling"

    def abort(self, pool: str) -> str:
        ro = self.active(pool)
        if ro is None or not ro.abort(self.dispatcher.now()):
            raise RolloutError(f"pool {pool!r} has no rollout to abort")
        self._log_events(pool, ro)
        self.controller._on_flush()
        return f"rollout to {ro.new} aborted: rolling back to {ro.old}"

    # ---------------------------------------------------------- RolloutHook

    def version_for_start(self, pool: str) -> str:
        ro = self.active(pool)
        if ro is None:
            return self.version(pool)
        scaler = self.controller.scalers[pool]
        return ro.version_for_start(self._views(pool, {}), self._need(pool, scaler))

    def after_evaluate(self, pool: str, demand: Demand, used: Mapping[str, int]) -> None:
        if pool not in self._checked:
            self._checked.add(pool)
            self._resume(pool)
        ro = self.active(pool)
        if ro is None:
            return
        c = self.controller
        scaler = c.scalers[pool]
        now = self.dispatcher.now()
        for action in ro.plan(now, self._views(pool, used), self._need(pool, scaler)):
            if isinstance(action, StartReplicas):
                for _ in range(action.n):
                    r = scaler.add_replica(now, action.reason)
                    c.versions[r.id] = action.version
            elif isinstance(action, Retire):
                scaler.retire(now, action.replica_id, action.reason)
            else:
                assert isinstance(action, Route)
                self.dispatcher.route(pool, action.version, action.share)
        if not ro.active:
            scaler.hold_down = False
            self.running[pool] = ro.target
            self.finished[(pool, ro.phase.value)] += 1
            self.dispatcher.route(pool, None)
        self._log_events(pool, ro)

    def rollout_json(self, pool: str) -> dict[str, Any] | None:
        ro = self.rollouts.get(pool)
        if ro is None:
            return None
        d = self.dispatcher
        scaler = self.controller.scalers.get(pool)
        counts: Counter[tuple[str, str]] = Counter()
        if scaler is not None:
            for r in scaler.replicas.values():
                counts[(self.controller.versions.get(r.id, ""), r.state.value)] += 1
        return {
            "from": ro.old,
            "to": ro.new,
            "target": ro.target,
            "phase": ro.phase.value,
            "canary_percent": ro.canary_percent,
            "surge": ro.spec.surge,
            "started_at": d.wall(ro.started_at),
            "ended_at": d.wall(ro.ended_at),
            "reason": ro.reason,
            "peak_serving": ro.peak_serving,
            "replicas": [
                {"version": v, "state": s, "count": n} for (v, s), n in sorted(counts.items())
            ],
            "calls": {v: {"ended": e, "failed": f} for v, (e, f) in ro.calls.items()},
            "events": [
                {"at": d.wall(ev.at), "kind": ev.kind, "detail": ev.detail} for ev in ro.events
            ],
        }

    # --------------------------------------------------------- JobObserver

    def job_placed(self, job: Job) -> None:
        """Placement is the scheduler's; nothing to do here."""

    def job_ended(self, job: Job) -> None:
        ro = self.active(job.agent_name)
        if ro is None:
            return
        version = job_version(job)
        if version:
            ro.job_ended(self.dispatcher.now(), version, job.state in FAILED_ENDS)
            self._log_events(job.agent_name, ro)
            if not ro.active or ro.phase is Phase.ROLLING_BACK:
                self.controller._on_flush()

    # ------------------------------------------------------------ internals

    def _resume(self, pool: str) -> None:
        """At the pool's first evaluation (after adoption): replicas of a known
        other version serving (a restart in the middle of a rollout) mean the
        rollout goes on. Replicas whose version is unknown ("" : recorded by an
        older server) do not start one."""
        c = self.controller
        want = c.pools[pool].version
        versions = {
            c.versions.get(r.id, "")
            for r in c.scalers[pool].replicas.values()
            if r.state in SERVING
        }
        if versions - {want, ""}:
            said = self.begin(pool)
            log.info("rollout resumed", extra={"pool": pool, "detail": said})

    def _need(self, pool: str, scaler: Any) -> int:
        return max(int(scaler.last_desired), int(scaler.window_target()))

    def _views(self, pool: str, used: Mapping[str, int]) -> list[ReplicaView]:
        c = self.controller
        return [
            ReplicaView(
                r.id,
                c.versions.get(r.id, ""),
                r.state,
                used.get(r.id, 0) if r.worker_id is not None else 0,
                r.ended_at,
                r.detail,
                r.id in c.adopted,
            )
            for r in c.scalers[pool].replicas.values()
        ]

    def _log_events(self, pool: str, ro: Rollout) -> None:
        fresh = min(ro.event_count - self._logged.get(pool, 0), len(ro.events))
        self._logged[pool] = ro.event_count
        for ev in list(ro.events)[len(ro.events) - fresh :] if fresh > 0 else []:
            log.info(
                "rollout event",
                extra={"pool": pool, "kind": ev.kind, "detail": ev.detail, "phase": ro.phase.value},
            )


class RolloutCollector(Collector):
    """`/metrics`: replicas by version, each pool's version, its rollout."""

    def __init__(self, manager: RolloutManager) -> None:
        self.m = manager

    def collect(self) -> Iterable[Metric]:
        m = self.m
        c = m.controller
        by_version = GaugeMetricFamily(
            "trunkline_replica_versions",
            "Live replicas of autoscaled pools by version and state.",
            labels=["pool", "version", "state"],
        )
        version = GaugeMetricFamily(
            "trunkline_pool_version",
            "1 for the version each autoscaled pool runs or is rolling to.",
            labels=["pool", "version"],
        )
        rollout = GaugeMetricFamily(
            "trunkline_rollout",
            "1 for each pool's current or last rollout, with its phase.",
            labels=["pool", "from", "to", "phase"],
        )
        finished = CounterMetricFamily(
            "trunkline_rollouts",
            "Rollouts ended, by how (done, rolled_back, superseded).",
            labels=["pool", "outcome"],
        )
        live = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)
        for name in sorted(c.scalers):
            counts: Counter[tuple[str, str]] = Counter()
            for r in c.scalers[name].replicas.values():
                if r.state in live:
                    counts[(c.versions.get(r.id, ""), r.state.value)] += 1
            for (v, state), n in sorted(counts.items()):
                by_version.add_metric([name, v, state], n)
            version.add_metric([name, m.version(name)], 1)
            ro = m.rollouts.get(name)
            if ro is not None:
                rollout.add_metric([name, ro.old, ro.new, ro.phase.value], 1)
        for (name, outcome), n in sorted(m.finished.items()):
            finished.add_metric([name, outcome], n)
        yield by_version
        yield version
        yield rollout
        yield finished


def job_version(job: Job) -> str:
    """The version of the replica that served `job` (its trace's last
    `version` event), "" when none is known."""
    for ev in reversed(job.trace):
        if ev.event == "version":
            return ev.detail or ""
    return ""
