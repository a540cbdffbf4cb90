"""Autoscaling policy for one replica pool: demand and the time in, decisions out.

Theory of operation
-------------------
A `PoolScaler` owns the replica records of one pool (an agent name whose
replicas trunkline starts itself) and decides, each time `evaluate(now,
demand, used)` is called, what should change. It performs no I/O and reads no
clock: the adapter (the autoscale controller) calls it when the pool's demand
changes and when `next_deadline()` passes, then carries out the actions from
`take_actions()` (start a process, stop offering to a worker, signal a
process) and reports back what happened (`replica_ready`, `replica_exited`).

The target is the design's formula::

    desired = clamp(ceil((running + reserved + queued + recently_refused + spare) / C),
                    min_replicas, max_replicas)

- Up at once. Serving replicas are STARTING plus READY: a replica still
  starting counts as capacity on its way, so a burst that needs four replicas
  starts four, not one per queued job.
- Down only after the stabilization window. The scale-down target is the
  largest `desired` seen over the last `scale_down_delay_s` (samples are kept
  only when the value changes; the one in effect at the window's start counts),
  so a dip shorter than the window never drains anything and an up is never
  followed by a down inside the window. Victims are the emptiest: starting
  replicas first (no jobs yet), then ready ones by used slots, newest first.
- Draining is two steps. DRAINING first means "no new offers" (the adapter
  calls `Scheduler.drain_worker`); the replica is stopped (SIGTERM) only when
  its worker holds no job, or when `drain_timeout_s` has passed since the drain
  began. No other path stops a replica that holds a job.
- Failures are replaced with capped exponential backoff. A serving replica
  that exits, or does not become ready within `start_timeout_s`, is FAILED and
  counted in a failure streak; the next start waits 0 s after the first failure
  of a streak, then `backoff_base_s`, doubling up to `backoff_cap_s`. A replica
  that stays ready for `failure_reset_s` ends the streak. Every failure is a
  `ScaleEvent` with the reason, and so is its replacement.

Replica states and their one transition table (a `common.fsm.Transitions`,
drawn in docs/autoscale.md) are below; `Replica.move` raises
`IllegalTransition` (alias `IllegalReplicaTransition`) on anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter, deque
from collections.abc import Mapping
from typing import NamedTuple

from trunkline.common.fsm import IllegalTransition, Transitions


class ReplicaState(enum.Enum):
    STARTING = "starting"  # process started, its worker has not registered yet
    READY = "ready"  # its worker registered: takes jobs
    DRAINING = "draining"  # no new offers; stopped when empty or at the drain timeout
    STOPPED = "stopped"  # exited after a stop we asked for
    FAILED = "failed"  # exited (or never became ready) without being asked to


R = ReplicaState

REPLICA_TRANSITIONS: Transitions[ReplicaState] = Transitions(
    R.STARTING,
    {
        R.STARTING: {R.READY, R.DRAINING, R.FAILED},
        R.READY: {R.DRAINING, R.FAILED},
        R.DRAINING: {R.STOPPED, R.FAILED},
        R.STOPPED: (),
        R.FAILED: (),
    },
)

SERVING: frozenset[ReplicaState] = frozenset({R.STARTING, R.READY})
FINISHED: frozenset[ReplicaState] = frozenset({R.STOPPED, R.FAILED})


# The one `IllegalTransition`, under the name older callers and tests use.
IllegalReplicaTransition = IllegalTransition


@dataclasses.dataclass(frozen=True, slots=True)
class ScaleSpec:
    """How one pool scales. `slots_per_replica` is C (the pool's
    `max_jobs_per_worker`); `min_replicas <= max_replicas` is the caller's
    duty (the config loader checks it)."""

    slots_per_replica: int
    min_replicas: int = 1
    max_replicas: int = 10
    spare_slots: int = 0
    scale_down_delay_s: float = 30.0
    drain_timeout_s: float = 600.0
    start_timeout_s: float = 60.0
    # After SIGTERM a replica gets this long to exit before SIGKILL.
    stop_grace_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    failure_reset_s: float = 30.0
    # Callers turned away (jobs ended no_capacity) this recent count as demand.
    refused_window_s: float = 10.0

    def desired(self, demand: Demand) -> int:
        """Replicas the demand calls for, clamped to [min, max]."""
        need = math.ceil((demand.total + self.spare_slots) / self.slots_per_replica)
        return max(self.min_replicas, min(self.max_replicas, need))


@dataclasses.dataclass(frozen=True, slots=True)
class Demand:
    """A pool's demand in slots at one instant, as the scheduler sees it."""

    running: int = 0  # jobs holding a slot (running, terminating, orphaned)
    reserved: int = 0  # offers not yet answered + accepted jobs not yet running
    queued: int = 0  # jobs waiting for a slot
    refused: int = 0  # callers turned away (ended no_capacity) in the recent window

    @property
    def total(self) -> int:
        return self.running + self.reserved + self.queued + self.refused


@dataclasses.dataclass(slots=True)
class Replica:
    """One replica of a pool. Times are the adapter's clock."""

    id: str
    pool: str
    created_at: float
    state: ReplicaState = R.STARTING
    ready_at: float | None = None
    worker_id: str | None = None  # the registered worker, while connected
    drain_started_at: float | None = None
    stop_issued_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    detail: str = ""  # why it is draining, stopped or failed

    def move(self, new: ReplicaState) -> None:
        REPLICA_TRANSITIONS.check(f"replica {self.id}", self.state, new)
        self.state = new


class ScaleEvent(NamedTuple):
    """One scaling decision with the numbers that triggered it.

    `kind` is `up`, `down`, `replace` (starts after failures), `failed` or
    `rollout` (a start or a drain a rollout asked for).
    `from_replicas`/`to_replicas` count serving replicas (starting + ready).
    """

    at: float
    pool: str
    kind: str
    from_replicas: int
    to_replicas: int
    demand: Demand
    desired: int
    capacity: int  # C, slots per replica
    spare_slots: int
    reason: str
    replicas: tuple[str, ...]


class StartReplica(NamedTuple):
    """Start a process for this (STARTING) replica."""

    replica: Replica


class DrainReplica(NamedTuple):
    """Stop offering jobs to this replica's worker (it is DRAINING)."""

    replica: Replica


class StopReplica(NamedTuple):
    """SIGTERM the replica's process; SIGKILL after `grace_s` if it lingers."""

    replica: Replica
    grace_s: float
    reason: str


ScaleAction = StartReplica | DrainReplica | StopReplica


class PoolScaler:
    """The policy state of one pool; see the module docstring."""

    def __init__(self, pool: str, spec: ScaleSpec, *, max_events: int = 200) -> None:
        self.pool = pool
        self.spec = spec
        self.replicas: dict[str, Replica] = {}  # live and recently finished, oldest first
        self.events: deque[ScaleEvent] = deque(maxlen=max_events)
        self.last_desired = 0
        self.event_count = 0  # events ever recorded (`events` keeps the latest)
        self.event_kinds: Counter[str] = Counter()  # events ever recorded, by kind
        self._finished: deque[str] = deque()
        self._max_finished = 50
        self._history: deque[tuple[float, int]] = deque()  # (since, desired), on change only
        self._actions: list[ScaleAction] = []
        self._seq = 0
        self._streak = 0  # failures in a row
        self._next_start_at = 0.0  # backoff: no start before this
        self._to_replace = 0  # failures not yet replaced (labels the next start)
        self._last_failure = ""
        # Set while a rollout runs (core/rollout.py): it, not the window, decides
        # which replicas are retired, so `evaluate` scales up but never down.
        self.hold_down = False

    # ------------------------------------------------------------------ outputs

    def take_actions(self) -> list[ScaleAction]:
        """Return and clear the actions produced so far, in order."""
        actions, self._actions = self._actions, []
        return actions

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state in SERVING]

    def by_worker(self, worker_id: str) -> Replica | None:
        for r in self.replicas.values():
            if r.worker_id == worker_id:
                return r
        return None

    def next_deadline(self) -> float | None:
        """When `evaluate` next has time-driven work (window, backoff, drain or
        start timeout); None when nothing is pending."""
        spec = self.spec
        times: list[float] = []
        if len(self._history) >= 2:
            times.append(self._history[1][0] + spec.scale_down_delay_s)
        if self.last_desired > len(self.serving()) and self._next_start_at > 0:
            times.append(self._next_start_at)
        for r in self.replicas.values():
            if r.state is R.STARTING:
                times.append(r.created_at + spec.start_timeout_s)
            elif r.state is R.DRAINING and r.stop_issued_at is None:
                assert r.drain_started_at is not None
                times.append(r.drain_started_at + spec.drain_timeout_s)
        return min(times) if times else None

    # ------------------------------------------------------------------- events

    def evaluate(self, now: float, demand: Demand, used: Mapping[str, int]) -> None:
        """Decide with the pool's current demand. `used` maps replica ids to the
        slots their workers hold (offers + jobs); absent means 0."""
        spec = self.spec
        self._check_start_timeouts(now)
        self._maybe_end_streak(now)
        desired = spec.desired(demand)
        self.last_desired = desired
        target_down = self._record(now, desired)
        serving = self.serving()
        n = len(serving)
        if desired > n:
            if now >= self._next_start_at:
                self._scale_up(now, demand, desired, n)
        elif target_down < n and not self.hold_down:
            self._scale_down(now, demand, desired, target_down, serving, used)
        self._progress_drains(now, used)

    def replica_ready(self, now: float, replica_id: str, worker_id: str) -> Replica | None:
        """The replica's worker registered. Returns the replica (None if unknown).
        A draining replica's new worker must be drained by the caller too."""
        r = self.replicas.get(replica_id)
        if r is None or r.state in FINISHED:
            return None
        r.worker_id = worker_id
        if r.state is R.STARTING:
            r.move(R.READY)
            r.ready_at = now
        return r

    def worker_gone(self, worker_id: str) -> None:
        """The replica's worker disconnected (its process may reconnect)."""
        r = self.by_worker(worker_id)
        if r is not None:
            r.worker_id = None

    def replica_exited(self, now: float, replica_id: str, code: int | None, detail: str) -> None:
        """The replica's process is gone. Expected after a stop; otherwise a
        failure: recorded, and a replacement is due after the backoff."""
        r = self.replicas.get(replica_id)
        if r is None:
            return
        r.exit_code = code
        r.worker_id = None
        if r.state in FINISHED:
            r.ended_at = r.ended_at if r.ended_at is not None else now
            return
        r.ended_at = now
        if r.state is R.DRAINING and r.stop_issued_at is not None:
            r.move(R.STOPPED)
            self._finish(r)
            return
        was_serving = r.state in SERVING
        phase = {R.STARTING: "before becoming ready", R.READY: "while ready"}.get(
            r.state, "while draining"
        )
        r.move(R.FAILED)
        r.detail = f"{detail} after {now - r.created_at:.1f} s ({phase})"
        self._finish(r)
        if was_serving:
            self._failed(now, r)

    # ---------------------------------------------------------------- internals

    def _record(self, now: float, desired: int) -> int:
        """Add a desired sample; the largest value over the window."""
        hist = self._history
        if not hist or hist[-1][1] != desired:
            hist.append((now, desired))
        cutoff = now - self.spec.scale_down_delay_s
        while len(hist) >= 2 and hist[1][0] <= cutoff:
            hist.popleft()
        return max(d for _, d in hist)

    def adopt(self, now: float, replica_id: str) -> Replica:
        """A replica an earlier server run started and that still runs (the
        provider listed it): tracked as STARTING until its worker registers
        again (a start timeout applies as to any start), counted as serving,
        never started twice. New replica ids continue past its number."""
        r = self.replicas.get(replica_id)
        if r is not None:
            return r
        r = Replica(id=replica_id, pool=self.pool, created_at=now)
        r.detail = "adopted from an earlier server run"
        self.replicas[r.id] = r
        _, _, tail = replica_id.rpartition("-")
        if tail.isdigit():
            self._seq = max(self._seq, int(tail))
        return r

    def window_target(self) -> int:
        """The largest desired count over the scale-down window: the fewest
        replicas the policy would keep now (what a rollout must not go below)."""
        return max((d for _, d in self._history), default=self.last_desired)

    def add_replica(self, now: float, reason: str) -> Replica:
        """Start one replica beyond the policy's own decisions (a rollout's)."""
        n = len(self.serving())
        r = self._new_replica(now)
        self._event(now, "rollout", n, n + 1, Demand(), self.last_desired, reason, (r.id,))
        return r

    def retire(self, now: float, replica_id: str, reason: str) -> Replica | None:
        """Drain one serving replica on a rollout's behalf (stopped once empty
        or at the drain timeout, like any drained replica); None if it is not
        serving."""
        r = self.replicas.get(replica_id)
        if r is None or r.state not in SERVING:
            return None
        n = len(self.serving())
        r.move(R.DRAINING)
        r.drain_started_at = now
        r.detail = reason
        self._actions.append(DrainReplica(r))
        self._event(now, "rollout", n, n - 1, Demand(), self.last_desired, reason, (r.id,))
        return r

    def _new_replica(self, now: float) -> Replica:
        self._seq += 1
        r = Replica(id=f"{self.pool}-{self._seq}", pool=self.pool, created_at=now)
        self.replicas[r.id] = r
        self._actions.append(StartReplica(r))
        return r

    def _scale_up(self, now: float, demand: Demand, desired: int, n: int) -> None:
        started = [self._new_replica(now) for _ in range(desired - n)]
        ids = tuple(r.id for r in started)
        if self._to_replace:
            kind = "replace"
            reason = f"replacing failed replica(s): {self._last_failure}"
            self._to_replace = max(0, self._to_replace - len(started))
        elif n < self.spec.min_replicas:
            kind, reason = "up", f"below min_replicas ({self.spec.min_replicas})"
        else:
            kind = "up"
            reason = (
                f"demand {demand.total} + spare {self.spec.spare_slots} slots needs "
                f"{desired} replicas of {self.spec.slots_per_replica}; {n} serving"
            )
        self._event(now, kind, n, n + len(started), demand, desired, reason, ids)

    def _scale_down(
        self,
        now: float,
        demand: Demand,
        desired: int,
        target: int,
        serving: list[Replica],
        used: Mapping[str, int],
    ) -> None:
        def emptiest(r: Replica) -> tuple[int, int, float]:
            if r.state is R.STARTING:
                return (0, 0, -r.created_at)
            return (1, used.get(r.id, 0), -(r.ready_at or 0.0))

        victims = sorted(serving, key=emptiest)[: len(serving) - target]
        window = self.spec.scale_down_delay_s
        reason = (
            f"demand stayed at or below {target} replicas' worth for {window:g} s "
            f"(now {demand.total} slots + spare {self.spec.spare_slots})"
        )
        for r in victims:
            r.move(R.DRAINING)
            r.drain_started_at = now
            r.detail = "scale-down"
            self._actions.append(DrainReplica(r))
        ids = tuple(r.id for r in victims)
        self._event(now, "down", len(serving), target, demand, desired, reason, ids)

    def _progress_drains(self, now: float, used: Mapping[str, int]) -> None:
        spec = self.spec
        for r in self.replicas.values():
            if r.state is not R.DRAINING or r.stop_issued_at is not None:
                continue
            held = used.get(r.id, 0) if r.worker_id is not None else 0
            assert r.drain_started_at is not None
            if held == 0:
                self._stop(now, r, "drained: no live job")
            elif now >= r.drain_started_at + spec.drain_timeout_s:
                self._stop(
                    now, r, f"drain timeout ({spec.drain_timeout_s:g} s) with {held} slots held"
                )

    def _stop(self, now: float, r: Replica, reason: str) -> None:
        r.stop_issued_at = now
        r.detail = reason
        self._actions.append(StopReplica(r, self.spec.stop_grace_s, reason))

    def _check_start_timeouts(self, now: float) -> None:
        limit = self.spec.start_timeout_s
        for r in list(self.replicas.values()):
            if r.state is R.STARTING and now >= r.created_at + limit:
                r.move(R.FAILED)
                r.ended_at = now
                r.detail = f"not ready within start_timeout_s ({limit:g} s)"
                r.stop_issued_at = now
                self._actions.append(StopReplica(r, 0.0, r.detail))
                self._finish(r)
                self._failed(now, r)

    def _failed(self, now: float, r: Replica) -> None:
        spec = self.spec
        self._streak += 1
        delay = (
            0.0
            if self._streak == 1
            else min(spec.backoff_cap_s, spec.backoff_base_s * 2 ** (self._streak - 2))
        )
        self._next_start_at = now + delay
        self._to_replace += 1
        self._last_failure = f"{r.id} {r.detail}"
        n = len(self.serving())
        reason = (
            f"replica {r.id} failed: {r.detail}; failure {self._streak} in a row, "
            f"next start in {delay:g} s"
        )
        self._event(now, "failed", n + 1, n, Demand(), self.last_desired, reason, (r.id,))

    def _maybe_end_streak(self, now: float) -> None:
        if not self._streak:
            return
        for r in self.replicas.values():
            ready_at = r.ready_at
            if r.state is R.READY and ready_at is not None:
                if now - ready_at < self.spec.failure_reset_s:
                    continue
                self._streak = 0
                self._next_start_at = 0.0
                return

    def _finish(self, r: Replica) -> None:
        """Keep finished replicas for display, dropping the oldest beyond a limit."""
        self._finished.append(r.id)
        while len(self._finished) > self._max_finished:
            self.replicas.pop(self._finished.popleft(), None)

    def _event(
        self,
        now: float,
        kind: str,
        before: int,
        after: int,
        demand: Demand,
        desired: int,
        reason: str,
        ids: tuple[str, ...],
    ) -> None:
        spec = self.spec
        self.event_count += 1
        self.event_kinds[kind] += 1
        self.events.append(
            ScaleEvent(
                now,
                self.pool,
                kind,
                before,
                after,
                demand,
                desired,
                spec.slots_per_replica,
                spec.spare_slots,
                reason,
                ids,
            )
        )
