"""The rollout planner (core/rollout.py): examples and random interleavings.

The property test simulates a pool the way the autoscaler would run it during
a rollout: the policy starts replicas (of the planner's chosen version) while
fewer than `need` serve and never scales down; replicas become ready, fail,
finish draining, and the need moves, in any order hypothesis picks. After each
plan it checks the planner's promises: ready capacity never goes below the
need (or what there was), the surge bounds the extra replicas, and once every
start has become ready and every drain has finished, the rollout is over with
every replica on its target.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from trunkline.core.autoscale import ReplicaState
from trunkline.core.pool import share_point
from trunkline.core.rollout import (
    Phase,
    ReplicaView,
    Retire,
    Rollout,
    RolloutSpec,
    Route,
    StartReplicas,
)

R = ReplicaState


@dataclasses.dataclass
class Sim:
    """A pool as the planner sees it, moved by hand."""

    ro: Rollout
    replicas: dict[str, ReplicaView] = dataclasses.field(default_factory=dict)
    seq: int = 0
    now: float = 0.0
    route: tuple[str | None, float] | None = None

    def add(self, version: str, state: ReplicaState = R.STARTING, used: int = 0) -> str:
        self.seq += 1
        rid = f"r{self.seq}"
        self.replicas[rid] = ReplicaView(rid, version, state, used)
        return rid

    def set(self, rid: str, **kw: object) -> None:
        self.replicas[rid] = self.replicas[rid]._replace(**kw)  # type: ignore[arg-type]

    def serving(self) -> list[ReplicaView]:
        return [r for r in self.replicas.values() if r.state in (R.STARTING, R.READY)]

    def ready(self) -> int:
        return sum(1 for r in self.replicas.values() if r.state is R.READY)

    def step(self, need: int) -> list[object]:
        """The policy's pass (scale up only) and then the planner's."""
        self.now += 1.0
        while len(self.serving()) < need:
            self.add(self.ro.version_for_start(list(self.replicas.values()), need))
        actions = self.ro.plan(self.now, list(self.replicas.values()), need)
        for a in actions:
            if isinstance(a, StartReplicas):
                for _ in range(a.n):
                    self.add(a.version)
            elif isinstance(a, Retire):
                assert self.replicas[a.replica_id].state in (R.STARTING, R.READY)
                self.set(a.replica_id, state=R.DRAINING)
            else:
                assert isinstance(a, Route)
                self.route = (a.version, a.share)
        return actions


def pool_of(n: int, version: str = "A", spec: RolloutSpec | None = None, **kw: object) -> Sim:
    sim = Sim(Rollout(0.0, "p", "A", "B", spec or RolloutSpec(), **kw))  # type: ignore[arg-type]
    for _ in range(n):
        sim.add(version, R.READY, used=2)
    return sim


def settle(sim: Sim, need: int, rounds: int = 50) -> None:
    """Every start becomes ready and every drain finishes, until it is over."""
    for _ in range(rounds):
        sim.step(need)
        for r in list(sim.replicas.values()):
            if r.state is R.STARTING:
                sim.set(r.id, state=R.READY)
            elif r.state is R.DRAINING:
                sim.set(r.id, state=R.STOPPED, ended_at=sim.now)
        if not sim.ro.active:
            return


def test_a_rolling_update_replaces_one_replica_at_a_time_with_surge_one() -> None:
    """With surge 1 a pool of 3 never has more than 4 serving nor fewer than 3 ready."""
    sim = pool_of(3)
    peak = 0
    for _ in range(30):
        sim.step(3)
        peak = max(peak, len(sim.serving()))
        assert sim.ready() >= 3
        for r in list(sim.replicas.values()):
            if r.state is R.STARTING:
                sim.set(r.id, state=R.READY)
            elif r.state is R.DRAINING:
                sim.set(r.id, state=R.STOPPED, ended_at=sim.now)
        if not sim.ro.active:
            break
    assert sim.ro.phase is Phase.DONE
    assert peak == 4
    assert {r.version for r in sim.serving()} == {"B"}
    assert len(sim.serving()) == 3


def test_new_calls_prefer_the_new_version_while_rolling() -> None:
    """The first plan routes every new call to the target version."""
    sim = pool_of(2)
    sim.step(2)
    assert sim.route == ("B", 1.0)


def test_an_old_replica_is_not_retired_until_the_new_one_is_ready() -> None:
    """Capacity first: nothing old drains while the surge replica still starts."""
    sim = pool_of(2)
    sim.step(2)
    sim.step(2)
    assert not any(r.state is R.DRAINING for r in sim.replicas.values())
    starting = [r for r in sim.replicas.values() if r.state is R.STARTING]
    assert [r.version for r in starting] == ["B"]


def test_a_canary_runs_beside_the_old_replicas_and_routes_its_share() -> None:
    """canary_percent 25 with need 4: one new replica, no old one retired, route 0.25."""
    sim = pool_of(4, canary_percent=25)
    assert sim.ro.phase is Phase.CANARY
    for _ in range(5):
        sim.step(4)
        for r in list(sim.replicas.values()):
            if r.state is R.STARTING:
                sim.set(r.id, state=R.READY)
    assert sim.route == ("B", 0.25)
    versions = sorted(r.version for r in sim.serving())
    assert versions == ["A", "A", "A", "A", "B"]
    assert sim.ro.active


def test_a_canary_share_can_change_while_it_runs() -> None:
    """set_canary moves the route's share and the canary's replica count."""
    sim = pool_of(8, canary_percent=10)
    settle(sim, 8, rounds=3)
    assert sim.route == ("B", 0.1)
    assert sim.ro.set_canary(sim.now, 50)
    settle(sim, 8, rounds=3)
    assert sim.route == ("B", 0.5)
    assert sum(1 for r in sim.serving() if r.version == "B") == 4
    assert not sim.ro.set_canary(sim.now, 100)  # out of range: promote instead
    sim.ro.promote(sim.now)
    assert not sim.ro.set_canary(sim.now, 20)  # no longer a canary


def test_promote_then_finish_on_the_new_version() -> None:
    """A promoted canary rolls the rest and ends DONE."""
    sim = pool_of(4, canary_percent=25)
    settle(sim, 4, rounds=3)
    assert sim.ro.promote(sim.now)
    settle(sim, 4)
    assert sim.ro.phase is Phase.DONE
    assert {r.version for r in sim.serving()} == {"B"}


def test_abort_returns_every_replica_to_the_old_version() -> None:
    """An aborted canary drains its new replicas and routes calls to the old version."""
    sim = pool_of(4, canary_percent=25)
    settle(sim, 4, rounds=3)
    assert sim.ro.abort(sim.now)
    sim.step(4)
    assert sim.route == ("A", 1.0)
    settle(sim, 4)
    assert sim.ro.phase is Phase.ROLLED_BACK
    assert {r.version for r in sim.serving()} == {"A"}


def test_failed_starts_of_the_new_version_stop_the_rollout_with_the_reason() -> None:
    """max_start_failures failed new replicas abort it, the reason naming the last one."""
    sim = pool_of(2, spec=RolloutSpec(max_start_failures=2))
    for _ in range(2):
        sim.step(2)
        for r in list(sim.replicas.values()):
            if r.state is R.STARTING and r.version == "B":
                sim.set(r.id, state=R.FAILED, ended_at=sim.now, detail="exited with code 1")
    sim.step(2)
    # Nothing of B is left to drain, so the rollback is over in the same plan.
    assert sim.ro.phase is Phase.ROLLED_BACK
    assert [ev.kind for ev in sim.ro.events if ev.kind == "stopped"] == ["stopped"]
    assert "2 replicas of version B failed" in sim.ro.reason
    assert "exited with code 1" in sim.ro.reason


def test_failing_calls_on_the_new_version_stop_the_rollout() -> None:
    """More than max_failed_calls_percent failures over min_calls calls abort it."""
    ro = Rollout(0.0, "p", "A", "B", RolloutSpec(min_calls=4, max_failed_calls_percent=50))
    for failed in (False, True, True):
        ro.job_ended(1.0, "B", failed)
    assert ro.phase is Phase.ROLLING  # 3 calls: not judged yet
    ro.job_ended(1.0, "A", True)  # the old version's calls do not count
    assert ro.phase is Phase.ROLLING
    ro.job_ended(1.0, "B", True)
    assert ro.phase is Phase.ROLLING_BACK
    assert "3 of 4 calls on version B failed" in ro.reason


def test_an_empty_pool_is_done_at_once() -> None:
    """No replica and no need: nothing to replace."""
    sim = Sim(Rollout(0.0, "p", "A", "B", RolloutSpec()))
    sim.step(0)
    assert sim.ro.phase is Phase.DONE


def test_share_point_is_stable_and_spread() -> None:
    """The hash a route's share uses: same id same point, and about uniform."""
    assert share_point("job-1") == share_point("job-1")
    points = [share_point(f"AJ_{i}") for i in range(4000)]
    below = sum(1 for p in points if p < 0.25)
    assert 900 < below < 1100  # binomial(4000, 0.25): mean 1000, sd 27


ops = st.lists(
    st.tuples(
        st.sampled_from(["ready", "fail", "drained", "need", "nothing"]),
        st.integers(min_value=0, max_value=30),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=6),
    need0=st.integers(min_value=0, max_value=6),
    surge=st.integers(min_value=1, max_value=3),
    canary=st.sampled_from([0.0, 0.0, 25.0]),
    script=ops,
)
def test_random_interleavings_keep_capacity_and_the_surge(
    start: int, need0: int, surge: int, canary: float, script: list[tuple[str, int]]
) -> None:
    """Any order of readiness, failures, drains and need changes: ready replicas
    never drop below min(need, before), the planner never adds beyond need +
    surge (canary: its replicas), and settling ends on the target version."""
    spec = RolloutSpec(surge=surge, max_start_failures=10**6)
    sim = pool_of(start, spec=spec, canary_percent=canary)
    need = need0
    for op, arg in script:
        if op == "need":
            need = arg % 7
        elif op in ("ready", "fail", "drained"):
            want = R.DRAINING if op == "drained" else R.STARTING
            cands = sorted(r.id for r in sim.replicas.values() if r.state is want)
            if cands:
                rid = cands[arg % len(cands)]
                new = {"ready": R.READY, "fail": R.FAILED, "drained": R.STOPPED}[op]
                sim.set(rid, state=new, ended_at=None if new is R.READY else sim.now)
        before_ready = sim.ready()
        before_serving = len(sim.serving())
        sim.step(need)
        serving_after_policy = max(before_serving, need)
        assert sim.ready() >= min(need, before_ready)
        if sim.ro.phase is Phase.CANARY:  # its replicas run beside the old ones
            assert len(sim.serving()) <= serving_after_policy + sim.ro.canary_replicas(need)
        else:
            assert len(sim.serving()) <= max(serving_after_policy, need + surge)
    if sim.ro.phase is Phase.CANARY:
        sim.ro.promote(sim.now)
    settle(sim, need, rounds=200)
    assert sim.ro.phase is Phase.DONE
    assert all(r.version == "B" for r in sim.serving())
    assert len(sim.serving()) >= need
