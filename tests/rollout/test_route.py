"""The scheduler's placement route (core/pool.py `_pick_routed`,
`Scheduler.set_route`, `set_worker_group`, `configure`): a preference that
orders eligible workers by version, never one that queues or refuses a job."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from trunkline.core import (
    AcceptInfo,
    Limits,
    Placement,
    PoolConfig,
    Scheduler,
    SendOffer,
)
from trunkline.core.entities import Job
from trunkline.core.pool import share_point

P = "p"
ACCEPT = AcceptInfo("agent", "agent", "", {})


def sched(cap: int = 4, **pool: object) -> Scheduler:
    return Scheduler([PoolConfig(agent_name=P, max_jobs_per_worker=cap, **pool)])  # type: ignore[arg-type]


def offers(s: Scheduler) -> list[tuple[str, str]]:
    return [(a.worker_id, a.job.id) for a in s.take_actions() if isinstance(a, SendOffer)]


def join(s: Scheduler, wid: str, group: str = "") -> None:
    s.worker_joined(0.0, wid, P)
    if group:
        s.set_worker_group(wid, group)


def test_without_a_route_placement_is_unchanged() -> None:
    """No route: pack fills the first worker whatever its group."""
    s = sched()
    join(s, "a1", "A")
    join(s, "b1", "B")
    for i in range(3):
        s.request(0.0, f"j{i}", P)
    assert {w for w, _ in offers(s)} == {"a1"}


def test_a_full_route_prefers_the_new_version_and_falls_back_when_it_is_full() -> None:
    """share 1.0 to B: B's slots first; the 5th call goes to A instead of waiting."""
    s = sched()
    join(s, "a1", "A")
    join(s, "b1", "B")
    s.set_route(0.0, P, "B", 1.0)
    for i in range(5):
        s.request(0.0, f"j{i}", P)
    got = offers(s)
    assert [w for w, _ in got] == ["b1"] * 4 + ["a1"]
    assert s.pools[P].queued == 0


def test_a_route_to_nobody_places_on_whoever_fits() -> None:
    """A route to a version no worker runs yet changes nothing for the caller."""
    s = sched()
    join(s, "a1", "A")
    s.set_route(0.0, P, "B", 1.0)
    s.request(0.0, "j", P)
    assert offers(s) == [("a1", "j")]


def test_a_share_splits_new_calls_by_the_job_id_hash() -> None:
    """share 0.25: exactly the jobs whose id hashes below 0.25 go to B (given room)."""
    s = sched(cap=1000)
    join(s, "a1", "A")
    join(s, "b1", "B")
    s.set_route(0.0, P, "B", 0.25)
    ids = [f"AJ_{i:04d}" for i in range(400)]
    for j in ids:
        s.request(0.0, j, P)
    got = dict((j, w) for w, j in offers(s))
    expect = {j: ("b1" if share_point(j) < 0.25 else "a1") for j in ids}
    assert got == expect
    on_b = sum(1 for w in got.values() if w == "b1")
    assert 70 <= on_b <= 130  # binomial(400, 0.25): mean 100, sd 8.7


def test_a_job_avoids_the_worker_that_refused_it_even_on_its_side() -> None:
    """A soft refusal still benches: the re-placed job goes to the other side."""
    s = sched()
    join(s, "a1", "A")
    join(s, "b1", "B")
    s.set_route(0.0, P, "B", 1.0)
    s.request(0.0, "j", P)
    assert offers(s) == [("b1", "j")]
    s.answer(0.1, "b1", "j", available=False)
    assert offers(s) == [("a1", "j")]


def test_spread_placement_keeps_its_order_within_a_side() -> None:
    """With spread, the emptiest worker of the preferred side comes first."""
    s = sched(placement=Placement.SPREAD)
    for wid in ("a1", "b1", "b2"):
        join(s, wid, "A" if wid.startswith("a") else "B")
    s.set_route(0.0, P, "B", 1.0)
    for i in range(2):
        s.request(0.0, f"j{i}", P)
    assert sorted(w for w, _ in offers(s)) == ["b1", "b2"]


def test_the_trace_names_the_version_of_the_worker_that_took_the_job() -> None:
    """An accepted job gets a `version` event naming its worker's group; an
    untagged worker adds none (traces of pools without versions are unchanged)."""
    s = sched()
    join(s, "b1", "B")
    join(s, "x1")
    s.request(0.0, "j1", P)
    s.answer(0.1, "b1", "j1", available=True, accept=ACCEPT)
    job = s.jobs["j1"]
    assert [(e.event, e.worker_id, e.detail) for e in job.trace if e.event == "version"] == [
        ("version", "b1", "B")
    ]
    s.set_route(0.2, P, None)
    s.set_worker_group("b1", "")  # untag: the next job on b1 carries no version
    s.request(0.3, "j2", P)
    ((w, _),) = offers(s)[-1:]
    s.answer(0.4, w, "j2", available=True, accept=ACCEPT)
    assert [e for e in s.jobs["j2"].trace if e.event == "version"] == []


def test_a_worker_that_leaves_loses_its_group() -> None:
    """The group map holds connected workers only."""
    s = sched()
    join(s, "b1", "B")
    s.worker_left(1.0, "b1")
    assert s.pools[P].groups == {}


def test_configure_applies_new_pool_settings_and_limits() -> None:
    """A reload: a pool's new queue wait applies to the next request, a pool
    configured only now exists, the limits change; a worker keeps its capacity."""
    s = sched(cap=2)
    join(s, "a1")
    new = PoolConfig(agent_name=P, max_jobs_per_worker=8, queue_max_wait_s=3.0)
    other = PoolConfig(agent_name="q", queue_max_wait_s=1.0)
    s.configure(1.0, [new, other], PoolConfig(agent_name=""), Limits(max_queued=5))
    assert s.pools[P].config == new
    assert s.pools["q"].config == other
    assert s.limits.max_queued == 5
    assert s.workers["a1"].capacity == 2
    job = s.request(1.0, "j", "q")
    assert job.deadline == 1.0 + 1.0


def test_configure_gives_an_unconfigured_pool_the_new_defaults() -> None:
    """A pool dropped from the file keeps running under the new [defaults]."""
    s = sched()
    join(s, "a1")
    default = PoolConfig(agent_name="", queue_max_wait_s=7.0)
    s.configure(0.0, [], default, Limits())
    assert s.pools[P].config == dataclasses.replace(default, agent_name=P)


@settings(max_examples=300, deadline=None)
@given(
    workers=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from(["A", "B", ""]), st.integers(0, 4)),
        min_size=0,
        max_size=6,
    ),
    share=st.sampled_from([0.0, 0.25, 1.0]),
    group=st.sampled_from(["A", "B", "C"]),
    spread=st.booleans(),
    job=st.integers(0, 10_000),
)
def test_a_route_never_leaves_a_job_unplaced_that_no_route_would_place(
    workers: list[tuple[int, str, int]], share: float, group: str, spread: bool, job: int
) -> None:
    """Any workers (caps, groups, slots in use), any route: a worker is picked
    with the route exactly when one is picked without it, and it fits."""
    placement = Placement.SPREAD if spread else Placement.PACK
    s = Scheduler([PoolConfig(agent_name=P, placement=placement)])
    n = 0
    for i, (cap, grp, busy) in enumerate(workers):
        s.worker_joined(0.0, f"w{i}", P, cap)
        if grp:
            s.set_worker_group(f"w{i}", grp)
        for _ in range(min(busy, cap)):
            n += 1
            s.request(0.0, f"busy{n}", P)
    s.take_actions()
    pool = s.pools[P]
    probe = Job(f"AJ_{job}", P, "", "", 0.0, 10.0)
    plain = pool.pick(probe)
    pool.route_group, pool.route_share = group, share
    routed = pool.pick(probe)
    assert (plain is None) == (routed is None)
    if routed is not None:
        assert routed.capacity is None or routed.used < routed.capacity
        mine = [w for w in pool.workers.values() if pool.eligible(w) and w.free > 0]
        side = share_point(probe.id) < share
        if any((pool.groups.get(w.id) == group) is side for w in mine):
            assert (pool.groups.get(routed.id) == group) is side
