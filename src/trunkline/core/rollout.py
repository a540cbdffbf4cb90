"""Rollout planner for one replica pool: move it from one version to another
without cutting a call. The replicas, the need and the time in, actions out.

Theory of operation
-------------------
A pool's *version* is a digest of what starts its replicas (command and env,
or the pod template). A `Rollout` takes a pool from version `old` to version
`new`. It performs no I/O and reads no clock: the adapter
(`runtime.rollout.RolloutManager`) calls `plan(now, replicas, need)` after
every autoscale evaluation, with each replica's version, state and used
slots, and `need` = the replicas the demand and `min_replicas` call for (the
autoscaler's own floor: the largest desired count over its scale-down
window). It carries out the actions (`StartReplicas`, `Retire`, `Route`)
through the pool's `PoolScaler` and the Dispatcher.

Rolling (`ROLLING`, and `ROLLING_BACK` toward `old` after an abort), with
target version T and the other replicas "outgoing":

- Outgoing replicas still starting are retired at once: they give no
  capacity yet (except adopted ones, which may hold calls: they wait until
  their worker registers and are then retired like any ready one).
- An outgoing ready replica is retired (drained: no new offers; the
  autoscaler stops it once empty or at `drain_timeout_s`) only while the
  ready replicas left would still be at least `need`: capacity never falls
  below what the demand and `min_replicas` need. Emptiest first.
- Replicas of T are started while fewer than `need` serve, with at most
  `need + surge` serving in all: the surge is the only extra.
- New calls prefer T (`Route(T, 1.0)`): as its replicas become ready they take
  the calls, the outgoing ones only what T cannot take now.
- Done when no outgoing replica is left at all (serving or draining).

Canary (`CANARY`, share p): `max(1, ceil(p * need))` replicas of `new` run
beside the old ones, none of which is retired; `Route(new, p)` sends that
share of new calls to `new` (each call decided by its job id's hash, so the
count is binomial and a re-placed call keeps its side). `promote` turns it
into `ROLLING`; `abort` into `ROLLING_BACK`.

Automatic stop: while `new` is the target, `max_start_failures` failed
replicas of `new`, or more than `max_failed_calls_percent` of its calls failing
once `min_calls` have ended there, abort the rollout with the reason.

Whatever the phase, the queue rules stay the scheduler's, and a route only
orders the workers a job may go to: a job falls back to any eligible worker,
so a preference never refuses one. The autoscaler does not scale down while
a rollout is `active` (the adapter sets `PoolScaler.hold_down`): the planner
decides which replicas go.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from trunkline.common.fsm import Transitions
from trunkline.core.autoscale import SERVING, ReplicaState


@dataclasses.dataclass(frozen=True, slots=True)
class RolloutSpec:
    """A pool's `rollout = {...}` settings. `canary_percent` 0 rolls straight
    through; `surge >= 1` (the config loader checks it: with no surge, no
    replica could be retired without capacity dipping)."""

    surge: int = 1
    canary_percent: float = 0.0
    max_start_failures: int = 3
    max_failed_calls_percent: float = 50.0
    min_calls: int = 10


class Phase(enum.Enum):
    CANARY = "canary"  # a share of new calls goes to `new`; no old replica retired
    ROLLING = "rolling"  # replacing old replicas by `new`
    ROLLING_BACK = "rolling_back"  # aborted: replacing `new` replicas by `old`
    DONE = "done"  # every replica is `new`
    ROLLED_BACK = "rolled_back"  # every replica is `old` again
    SUPERSEDED = "superseded"  # a later rollout of the same pool took over


P = Phase

ROLLOUT_TRANSITIONS: Transitions[Phase] = Transitions(
    P.ROLLING,
    {
        P.CANARY: {P.ROLLING, P.ROLLING_BACK, P.SUPERSEDED},
        P.ROLLING: {P.ROLLING_BACK, P.DONE, P.SUPERSEDED},
        P.ROLLING_BACK: {P.ROLLED_BACK, P.SUPERSEDED},
        P.DONE: (),
        P.ROLLED_BACK: (),
        P.SUPERSEDED: (),
    },
)

FINAL: frozenset[Phase] = frozenset({P.DONE, P.ROLLED_BACK, P.SUPERSEDED})


class ReplicaView(NamedTuple):
    """One replica as the planner sees it."""

    id: str
    version: str
    state: ReplicaState
    used: int = 0  # slots its worker holds (offers + jobs)
    ended_at: float | None = None
    detail: str = ""
    # Found running by a restarted server: until its worker registers again it
    # may hold calls nobody can count yet, so it is never retired while starting.
    adopted: bool = False


class StartReplicas(NamedTuple):
    """Start `n` replicas of `version`."""

    version: str
    n: int
    reason: str


class Retire(NamedTuple):
    """Drain this replica (no new offers; stopped once empty or at the drain timeout)."""

    replica_id: str
    reason: str


class Route(NamedTuple):
    """New calls: a `share` (0..1) of them prefer workers of `version`, the
    rest prefer the others; `version` None clears the preference."""

    version: str | None
    share: float


RolloutAction = StartReplicas | Retire | Route


class RolloutEvent(NamedTuple):
    at: float
    kind: str  # started, canary, promoted, aborted, stopped, start, retire, done, rolled_back
    detail: str


class Rollout:
    """One rollout of one pool; see the module docstring."""

    def __init__(
        self,
        now: float,
        pool: str,
        old: str,
        new: str,
        spec: RolloutSpec,
        *,
        canary_percent: float | None = None,
        max_events: int = 100,
    ) -> None:
        self.pool = pool
        self.old = old
        self.new = new
        self.spec = spec
        pct = spec.canary_percent if canary_percent is None else canary_percent
        self.canary_percent = min(100.0, max(0.0, pct))
        self.phase = P.CANARY if 0 < self.canary_percent < 100 else P.ROLLING
        self.started_at = now
        self.ended_at: float | None = None
        self.reason = ""  # why it was aborted or stopped
        self.events: deque[RolloutEvent] = deque(maxlen=max_events)
        self.event_count = 0  # events ever recorded (`events` keeps the latest)
        self.calls: dict[str, list[int]] = {}  # version -> [ended, failed]
        self.peak_serving = 0
        self.route: tuple[str | None, float] | None = None
        self._retired: set[str] = set()
        how = f"canary at {self.canary_percent:g} %" if self.phase is P.CANARY else "rolling"
        self._event(now, "started", f"{old or '(none)'} -> {new}, {how}, surge {spec.surge}")

    # ---------------------------------------------------------------- queries

    @property
    def target(self) -> str:
        return self.old if self.phase in (P.ROLLING_BACK, P.ROLLED_BACK) else self.new

    @property
    def active(self) -> bool:
        return self.phase not in FINAL

    def canary_replicas(self, need: int) -> int:
        return max(1, math.ceil(self.canary_percent / 100.0 * need))

    def version_for_start(self, replicas: Sequence[ReplicaView], need: int) -> str:
        """The version a replica the autoscaler starts on its own (demand rose,
        a failed one is replaced) should run."""
        if self.phase is P.CANARY:
            new = sum(1 for r in replicas if r.state in SERVING and r.version == self.new)
            return self.new if new < self.canary_replicas(need) else self.old
        return self.target

    # --------------------------------------------------------------- commands

    def set_canary(self, now: float, percent: float) -> bool:
        """Change a running canary's share (0 < percent < 100). False if it is
        not a canary or the share is out of range."""
        if self.phase is not P.CANARY or not 0 < percent < 100:
            return False
        self.canary_percent = percent
        self._event(now, "canary", f"share now {percent:g} %")
        return True

    def promote(self, now: float) -> bool:
        """Canary -> rolling. False if it is not a canary."""
        if self.phase is not P.CANARY:
            return False
        self._move(P.ROLLING)
        self._event(now, "promoted", f"rolling to {self.new}")
        return True

    def abort(
        self, now: float, reason: str = "aborted by request", *, kind: str = "aborted"
    ) -> bool:
        """Roll back to `old`: new replicas drain, old ones take the calls again.
        False if it is already rolling back or over."""
        if self.phase not in (P.CANARY, P.ROLLING):
            return False
        self._move(P.ROLLING_BACK)
        self.reason = reason
        self._event(now, kind, reason)
        return True

    def supersede(self, now: float, by: str) -> None:
        if self.active:
            self._move(P.SUPERSEDED)
            self.ended_at = now
            self._event(now, "superseded", f"a rollout to {by} took over")

    def job_ended(self, now: float, version: str, failed: bool) -> None:
        """A call ended on a replica of `version`; `failed` if it failed there."""
        counts = self.calls.setdefault(version, [0, 0])
        counts[0] += 1
        counts[1] += int(failed)
        if version != self.new or self.phase not in (P.CANARY, P.ROLLING):
            return
        ended, bad = counts
        limit = self.spec.max_failed_calls_percent
        if ended >= self.spec.min_calls and bad * 100.0 > limit * ended:
            self.abort(
                now,
                f"{bad} of {ended} calls on version {self.new} failed (more than {limit:g} %)",
                kind="stopped",
            )

    # ------------------------------------------------------------------- plan

    def plan(self, now: float, replicas: Sequence[ReplicaView], need: int) -> list[RolloutAction]:
        """What to do now; see the module docstring."""
        if not self.active:
            return []
        self._check_start_failures(now, replicas)
        actions: list[RolloutAction] = []
        if self.phase is P.CANARY:
            self._plan_canary(now, replicas, need, actions)
        else:
            self._plan_rolling(now, replicas, need, actions)
        serving = sum(1 for r in replicas if r.state in SERVING)
        starts = sum(a.n for a in actions if isinstance(a, StartReplicas))
        retires = sum(1 for a in actions if isinstance(a, Retire))
        self.peak_serving = max(self.peak_serving, serving + starts - retires)
        return actions

    def _plan_canary(
        self, now: float, replicas: Sequence[ReplicaView], need: int, out: list[RolloutAction]
    ) -> None:
        self._set_route(out, self.new, self.canary_percent / 100.0)
        new = sum(1 for r in replicas if r.state in SERVING and r.version == self.new)
        want = self.canary_replicas(need)
        if new < want:
            why = f"canary: {want} replica(s) of {self.new}"
            out.append(StartReplicas(self.new, want - new, why))
            self._event(now, "start", f"{want - new} canary replica(s) of {self.new}")

    def _plan_rolling(
        self, now: float, replicas: Sequence[ReplicaView], need: int, out: list[RolloutAction]
    ) -> None:
        target = self.target
        self._set_route(out, target, 1.0)
        R = ReplicaState
        serving = [r for r in replicas if r.state in SERVING and r.id not in self._retired]
        outgoing = [r for r in serving if r.version != target]
        ready = sum(1 for r in serving if r.state is R.READY)
        n_serving = len(serving)
        for r in outgoing:
            if r.state is R.STARTING and not r.adopted:
                self._retire(now, r, "outgoing and not ready yet", out)
                n_serving -= 1
        ready_out = sorted(
            (r for r in outgoing if r.state is R.READY), key=lambda r: (r.used, r.id)
        )
        for r in ready_out:
            if ready - 1 < need:
                break
            self._retire(now, r, f"replaced by version {target}", out)
            ready -= 1
            n_serving -= 1
        mine = sum(1 for r in serving if r.version == target)
        k = min(need - mine, need + self.spec.surge - n_serving)
        if k > 0:
            why = f"{k} replica(s) of version {target} (need {need}, surge {self.spec.surge})"
            out.append(StartReplicas(target, k, why))
            self._event(now, "start", why)
        live = (*SERVING, R.DRAINING)
        if not any(r.version != target and r.state in live for r in replicas):
            self._finish(now)

    def _finish(self, now: float) -> None:
        final = P.DONE if self.phase is P.ROLLING else P.ROLLED_BACK
        self._move(final)
        self.ended_at = now
        self._event(
            now,
            final.value,
            f"every replica runs {self.target} ({now - self.started_at:.1f} s, "
            f"at most {self.peak_serving} serving)",
        )

    def _check_start_failures(self, now: float, replicas: Sequence[ReplicaView]) -> None:
        if self.phase not in (P.CANARY, P.ROLLING):
            return
        failed = [
            r
            for r in replicas
            if r.version == self.new
            and r.state is ReplicaState.FAILED
            and r.ended_at is not None
            and r.ended_at >= self.started_at
        ]
        if len(failed) >= self.spec.max_start_failures:
            last = failed[-1]
            self.abort(
                now,
                f"{len(failed)} replicas of version {self.new} failed; last: {last.id} "
                f"{last.detail}",
                kind="stopped",
            )

    # -------------------------------------------------------------- internals

    def _retire(self, now: float, r: ReplicaView, why: str, out: list[RolloutAction]) -> None:
        self._retired.add(r.id)
        out.append(Retire(r.id, why))
        self._event(now, "retire", f"{r.id} ({r.version}): {why}")

    def _set_route(self, out: list[RolloutAction], version: str | None, share: float) -> None:
        if self.route != (version, share):
            self.route = (version, share)
            out.append(Route(version, share))

    def _move(self, new: Phase) -> None:
        ROLLOUT_TRANSITIONS.check(f"rollout of {self.pool}", self.phase, new)
        self.phase = new

    def _event(self, now: float, kind: str, detail: str) -> None:
        self.event_count += 1
        self.events.append(RolloutEvent(now, kind, detail))
