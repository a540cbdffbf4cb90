"""The autoscale policy (`trunkline.core.autoscale`) on a fake clock.

Plain synchronous tests drive a `PoolScaler` the way the controller does:
evaluate with a demand, carry out the actions (here: by hand), report readiness
and exits. Hypothesis then drives random demand/time/failure sequences and
checks the contract's invariants after every step.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trunkline.core import Scheduler
from trunkline.core.autoscale import (
    REPLICA_TRANSITIONS,
    Demand,
    DrainReplica,
    IllegalReplicaTransition,
    PoolScaler,
    Replica,
    ReplicaState,
    ScaleAction,
    ScaleSpec,
    StartReplica,
    StopReplica,
)
from trunkline.core.config import PoolConfig

R = ReplicaState
EXAMPLES = int(os.environ.get("TRUNKLINE_PROPERTY_EXAMPLES", "800")) // 4


def spec(**kw: float) -> ScaleSpec:
    base: dict[str, float] = {
        "slots_per_replica": 4,
        "min_replicas": 1,
        "max_replicas": 5,
        "scale_down_delay_s": 30.0,
        "drain_timeout_s": 60.0,
    }
    base.update(kw)
    return ScaleSpec(**base)  # type: ignore[arg-type]


def q(n: int) -> Demand:
    return Demand(queued=n)


def starts(actions: list[ScaleAction]) -> list[Replica]:
    return [a.replica for a in actions if isinstance(a, StartReplica)]


def ready_all(s: PoolScaler, now: float) -> None:
    for r in s.serving():
        if r.state is R.STARTING:
            s.replica_ready(now, r.id, "W" + r.id)


def test_desired_formula_clamps_to_min_and_max() -> None:
    """desired = clamp(ceil((running+reserved+queued+refused+spare)/C), min, max)."""
    sp = spec(spare_slots=2)
    assert sp.desired(Demand()) == 1
    assert sp.desired(Demand(running=3, reserved=1, queued=1, refused=1)) == 2  # (6+2)/4
    assert sp.desired(Demand(running=7)) == 3  # (7+2)/4 -> 3
    assert sp.desired(Demand(queued=100)) == 5


def test_starts_min_replicas_at_once() -> None:
    """With no demand the pool starts min_replicas, labelled as such."""
    s = PoolScaler("p", spec(min_replicas=2))
    s.evaluate(0.0, Demand(), {})
    assert len(starts(s.take_actions())) == 2
    assert s.events[-1].kind == "up"
    assert "min_replicas" in s.events[-1].reason


def test_burst_of_13_starts_exactly_enough_replicas_once() -> None:
    """Jobs arriving one by one scale up as soon as the demand exceeds serving
    capacity; starting replicas count, so 13 calls at C=4 make 4 replicas, not 13."""
    s = PoolScaler("p", spec())
    s.evaluate(0.0, Demand(), {})
    s.take_actions()
    total = 0
    for i in range(13):
        placed = min(i, 4)  # only the warm replica takes jobs meanwhile
        s.evaluate(0.001 * i, Demand(running=placed, queued=i + 1 - placed), {})
        total += len(starts(s.take_actions()))
    assert total == 3
    assert len(s.serving()) == 4
    ups = [e for e in s.events if e.kind == "up"]
    assert [e.to_replicas for e in ups] == [1, 2, 3, 4]
    assert ups[-1].demand == Demand(running=4, queued=9)
    assert ups[-1].desired == 4


def test_scale_down_waits_for_the_window_and_drains_emptiest_first() -> None:
    """Demand must stay low for scale_down_delay_s; the emptiest ready replica is
    drained first, then stopped once its worker holds nothing."""
    s = PoolScaler("p", spec(scale_down_delay_s=30))
    s.evaluate(0.0, q(12), {})
    s.take_actions()
    ready_all(s, 1.0)
    ids = [r.id for r in s.serving()]
    used = {ids[0]: 4, ids[1]: 1, ids[2]: 3}
    s.evaluate(2.0, Demand(running=8), used)  # desired 2, window says 3
    assert s.take_actions() == []
    s.evaluate(29.9, Demand(running=8), used)
    assert s.take_actions() == []
    assert s.next_deadline() == pytest.approx(32.0)
    s.evaluate(32.0, Demand(running=8), used)
    actions = s.take_actions()
    assert actions == [DrainReplica(s.replicas[ids[1]])]
    assert s.events[-1].kind == "down"
    assert (s.events[-1].from_replicas, s.events[-1].to_replicas) == (3, 2)
    # still one job on it: not stopped; once it ends it is
    s.evaluate(33.0, Demand(running=7), {**used, ids[1]: 1})
    assert s.take_actions() == []
    s.evaluate(34.0, Demand(running=7), {**used, ids[1]: 0})
    (stop,) = s.take_actions()
    assert isinstance(stop, StopReplica)
    assert stop.replica.id == ids[1]
    s.replica_exited(35.0, ids[1], 0, "exited with code 0")
    assert s.replicas[ids[1]].state is R.STOPPED


def test_a_dip_shorter_than_the_window_drains_nothing() -> None:
    """Demand dropping and coming back within the window never scales down."""
    s = PoolScaler("p", spec(scale_down_delay_s=10))
    s.evaluate(0.0, q(8), {})
    s.take_actions()
    ready_all(s, 0.5)
    for t in range(1, 30):
        demand = Demand(running=0 if t % 9 else 8)
        s.evaluate(float(t), demand, {})
        assert not any(isinstance(a, DrainReplica) for a in s.take_actions())


def test_drain_timeout_stops_a_replica_with_a_live_job() -> None:
    """A draining replica whose job does not end is stopped at drain_timeout_s,
    not before."""
    s = PoolScaler("p", spec(scale_down_delay_s=0, drain_timeout_s=60, min_replicas=0))
    s.evaluate(0.0, q(1), {})
    (r,) = starts(s.take_actions())
    s.replica_ready(1.0, r.id, "W1")
    s.evaluate(5.0, Demand(), {r.id: 1})
    assert s.take_actions() == [DrainReplica(r)]
    assert s.next_deadline() == pytest.approx(65.0)
    s.evaluate(64.9, Demand(), {r.id: 1})
    assert s.take_actions() == []
    s.evaluate(65.0, Demand(), {r.id: 1})
    (stop,) = s.take_actions()
    assert isinstance(stop, StopReplica)
    assert "drain timeout" in stop.reason


def test_failed_replica_is_replaced_with_capped_exponential_backoff() -> None:
    """The first failure of a streak is replaced at once, then 1 s, 2 s, 4 s ...
    capped; each failure and replacement is an event with the reason."""
    s = PoolScaler("p", spec(backoff_base_s=1, backoff_cap_s=4))
    s.evaluate(0.0, Demand(), {})
    (r,) = starts(s.take_actions())
    now = 0.0
    delays = []
    for _ in range(5):
        now += 0.5
        s.replica_exited(now, r.id, 1, "exited with code 1")
        assert s.replicas[r.id].state is R.FAILED
        failed = s.events[-1]
        assert failed.kind == "failed"
        assert "exited with code 1" in failed.reason
        deadline = s.next_deadline()
        assert deadline is not None
        delays.append(deadline - now)
        s.evaluate(deadline - 0.01, Demand(), {})
        assert s.take_actions() == [] or deadline - now == 0
        now = deadline
        s.evaluate(now, Demand(), {})
        (r,) = starts(s.take_actions())
        assert s.events[-1].kind == "replace"
    assert delays == [0, 1, 2, 4, 4]


def test_streak_resets_after_a_replica_stays_ready() -> None:
    """A replica ready for failure_reset_s ends the failure streak."""
    s = PoolScaler("p", spec(failure_reset_s=30, min_replicas=1))
    s.evaluate(0.0, Demand(), {})
    (r,) = starts(s.take_actions())
    s.replica_exited(1.0, r.id, 1, "exited")
    s.evaluate(1.0, Demand(), {})
    (r,) = starts(s.take_actions())
    s.replica_ready(2.0, r.id, "W")
    s.evaluate(40.0, Demand(), {})
    s.replica_exited(41.0, r.id, -9, "killed")
    assert s.next_deadline() == 41.0  # first of a new streak: at once


def test_start_timeout_fails_the_replica_and_replaces_it() -> None:
    """A replica not ready within start_timeout_s is killed, failed and replaced."""
    s = PoolScaler("p", spec(start_timeout_s=20))
    s.evaluate(0.0, Demand(), {})
    (r,) = starts(s.take_actions())
    assert s.next_deadline() == 20.0
    s.evaluate(20.0, Demand(), {})
    stop, start = s.take_actions()
    assert isinstance(stop, StopReplica)
    assert stop.replica is r
    assert isinstance(start, StartReplica)
    assert r.state is R.FAILED
    assert "start_timeout_s" in r.detail
    assert [e.kind for e in s.events][-2:] == ["failed", "replace"]
    s.replica_exited(20.5, r.id, -15, "terminated")  # the later exit changes nothing
    assert r.state is R.FAILED


def test_replica_state_table_rejects_illegal_moves() -> None:
    """Replica states change only along the transition table."""
    r = Replica("x", "p", 0.0)
    with pytest.raises(IllegalReplicaTransition):
        r.move(R.STOPPED)
    for state, allowed in REPLICA_TRANSITIONS.items():
        for new in R:
            probe = Replica("x", "p", 0.0, state=state)
            if new in allowed:
                probe.move(new)
            else:
                with pytest.raises(IllegalReplicaTransition):
                    probe.move(new)


def test_scheduler_counts_recent_refusals_per_pool() -> None:
    """No_capacity endings are remembered with their time and counted over a
    window (the autoscaler's `recently_refused` demand); a soft refusal is not
    (its job is queued again, and counted there)."""
    sched = Scheduler([PoolConfig("a", max_jobs_per_worker=1, queue_max_wait_s=0)])
    sched.request(0.0, "j1", "a")  # no worker, max wait 0: no_capacity at once
    sched.worker_joined(1.0, "w1", "a")
    sched.request(2.0, "j2", "a", max_wait_s=30)
    sched.request(2.2, "j3", "a", max_wait_s=0)  # w1 holds j2's offer: no_capacity
    sched.answer(2.5, "w1", "j2", available=False, terminate=False)
    pool = sched.pools["a"]
    assert pool.recently_refused(3.0, 10.0) == 2
    assert pool.recently_refused(3.0, 1.0) == 1
    assert pool.recently_refused(20.0, 10.0) == 0
    assert sched.demand(3.0, "a", 10.0).queued == 1  # j2, counted once


def test_worker_gone_ends_its_jobs_without_waiting_for_the_grace() -> None:
    """A worker whose process is known dead loses its jobs at once (worker_lost)."""
    sched = Scheduler([PoolConfig("a", max_jobs_per_worker=2, reconnect_grace_s=30)])
    sched.worker_joined(0.0, "w1", "a")
    sched.request(0.0, "j1", "a")
    sched.answer(0.1, "w1", "j1", available=True)
    sched.worker_left(1.0, "w1")
    assert sched.jobs["j1"].state.value == "orphaned"
    sched.worker_gone(1.5, "w1", "replica exited")
    assert "j1" not in sched.jobs
    assert sched.ended[("a", "worker_lost")] == 1


# ------------------------------------------------------------------ properties


class Sim:
    """Carries out a scaler's actions like the controller would, with a model of
    each replica's used slots, checking the invariants after every step."""

    def __init__(self, sp: ScaleSpec) -> None:
        self.s = PoolScaler("p", sp)
        self.sp = sp
        self.now = 0.0
        self.used: dict[str, int] = {}
        self.stopped_with_jobs: list[tuple[str, float]] = []
        self.demand = Demand()

    def step(self, demand: Demand) -> None:
        self.demand = demand
        self.s.evaluate(self.now, demand, self.used)
        self.apply(self.s.take_actions())
        self.check()

    def apply(self, actions: list[ScaleAction]) -> None:
        for a in actions:
            r = a.replica
            if isinstance(a, StopReplica):
                held = self.used.get(r.id, 0)
                if held and r.state is not R.FAILED:
                    assert r.drain_started_at is not None
                    assert self.now >= r.drain_started_at + self.sp.drain_timeout_s, (
                        f"{r.id} stopped with {held} jobs before the drain timeout"
                    )

    def check(self) -> None:
        n = len(self.s.serving())
        assert n <= self.sp.max_replicas


ops = st.one_of(
    st.tuples(st.just("demand"), st.integers(0, 30), st.floats(0, 20)),
    st.tuples(st.just("ready"), st.integers(0, 9), st.floats(0, 3)),
    st.tuples(st.just("die"), st.integers(0, 9), st.floats(0, 3)),
    st.tuples(st.just("jobs"), st.integers(0, 9), st.integers(0, 4)),
    st.tuples(st.just("tick"), st.integers(0, 0), st.floats(0, 40)),
)


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
@given(
    mn=st.integers(0, 3),
    extra=st.integers(0, 4),
    delay=st.sampled_from([0.0, 5.0, 30.0]),
    drain=st.sampled_from([0.0, 10.0, 100.0]),
    spare=st.integers(0, 5),
    steps=st.lists(ops, max_size=60),
)
def test_policy_invariants(
    mn: int, extra: int, delay: float, drain: float, spare: int, steps: list[tuple[str, int, float]]
) -> None:
    """Whatever the demand, timing and failures: never above max, at min once
    out of backoff, no replica with a job stopped before its drain timeout, no
    scale-down inside the window after a scale-up, every start's numbers match."""
    sp = ScaleSpec(
        slots_per_replica=4,
        min_replicas=mn,
        max_replicas=mn + extra if mn + extra > 0 else 1,
        spare_slots=spare,
        scale_down_delay_s=delay,
        drain_timeout_s=drain,
        backoff_base_s=1.0,
        backoff_cap_s=8.0,
    )
    sim = Sim(sp)
    sim.step(Demand())
    for kind, arg, val in steps:
        live = [r for r in sim.s.replicas.values() if r.state not in (R.STOPPED, R.FAILED)]
        if kind == "demand":
            sim.now += float(val)
            sim.step(Demand(running=arg // 2, queued=arg - arg // 2))
        elif kind == "tick":
            sim.now += float(val)
            sim.step(sim.demand)
        elif kind == "ready" and live:
            r = live[arg % len(live)]
            sim.now += float(val)
            sim.s.replica_ready(sim.now, r.id, "W" + r.id)
            sim.step(sim.demand)
        elif kind == "die" and live:
            r = live[arg % len(live)]
            sim.now += float(val)
            sim.s.replica_exited(sim.now, r.id, 1, "crashed")
            sim.used.pop(r.id, None)
            sim.step(sim.demand)
        elif kind == "jobs" and live:
            r = live[arg % len(live)]
            if r.state is R.READY or (r.state is R.DRAINING and int(val) < sim.used.get(r.id, 0)):
                sim.used[r.id] = int(val)  # a draining replica only loses jobs
            sim.step(sim.demand)
        # Out of backoff with everything evaluated, the pool serves what is desired.
        deadline = sim.s.next_deadline()
        if deadline is None or deadline > sim.now:
            assert len(sim.s.serving()) >= min(sp.min_replicas, sp.max_replicas) or (
                sim.s._next_start_at > sim.now
            )
    ups: list[float] = []
    for e in sim.s.events:
        if e.kind in ("up", "replace"):
            ups.append(e.at)
        if e.kind == "down":
            assert all(e.at - t >= delay for t in ups), "scaled down inside the window"
            assert e.to_replicas >= sp.min_replicas
        if e.kind == "up":
            assert e.to_replicas == e.desired
            assert e.to_replicas <= sp.max_replicas
