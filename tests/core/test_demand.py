"""Demand as the autoscaler reads it (`trunkline.core.demand`): each caller once."""

from __future__ import annotations

import math

from trunkline.core import Scheduler
from trunkline.core.autoscale import ScaleSpec
from trunkline.core.config import PoolConfig

CAP = 4
WINDOW_S = 10.0


def _burst_with_soft_refusals() -> tuple[Scheduler, list[int]]:
    """13 calls on replicas capped at 4 whose own load guard soft-refuses some
    offers (as default livekit-agents workers do in a burst); every refused job
    is then queued or placed elsewhere. Returns the scheduler and the demand
    total seen after every step."""
    s = Scheduler([PoolConfig("a", max_jobs_per_worker=CAP, refusal_backoff_s=0.5)])
    totals: list[int] = []

    def look(now: float) -> None:
        totals.append(s.demand(now, "a", WINDOW_S).total)

    s.worker_joined(0.0, "w1", "a")
    for i in range(13):
        s.request(0.0, f"j{i}", "a", max_wait_s=30)
    look(0.0)
    now = 0.0
    refusals = 0
    for n, wid in enumerate(("w1", "w2", "w3", "w4")):
        if wid != "w1":
            now += 0.3
            s.worker_joined(now, wid, "a")
            look(now)
        # The worker refuses its first two offers (its load guard), accepts the rest.
        offered = sorted(s.workers[wid].offers)
        for k, job_id in enumerate(offered):
            now += 0.01
            refuse = k < 2 and n < 3
            s.answer(now, wid, job_id, available=not refuse, terminate=False)
            refusals += refuse
            look(now)
    # Benches expire, status reports come in: the refused jobs find slots.
    for _ in range(6):
        now += 1.0
        s.advance(now)
        for wid in list(s.workers):
            for job_id in sorted(s.workers[wid].offers):
                s.answer(now, wid, job_id, available=True)
        look(now)
    assert refusals == 6
    return s, totals


def test_soft_refused_then_placed_burst_asks_for_ceil_demand_over_cap() -> None:
    """A burst partly soft-refused and then placed counts each caller once:
    the policy asks for exactly ceil(13 / 4) = 4 replicas, at every step."""
    s, totals = _burst_with_soft_refusals()
    assert set(totals) == {13}
    spec = ScaleSpec(slots_per_replica=CAP, min_replicas=1, max_replicas=10)
    assert spec.desired(s.demand(10.0, "a", WINDOW_S)) == math.ceil(13 / CAP) == 4
    assert sum(len(w.jobs) for w in s.workers.values()) == 13


def test_no_capacity_endings_are_refused_demand() -> None:
    """A caller turned away (ended no_capacity) counts as demand for the window."""
    s = Scheduler([PoolConfig("a", max_jobs_per_worker=CAP, queue_max_wait_s=0)])
    s.request(0.0, "j1", "a")
    d = s.demand(1.0, "a", WINDOW_S)
    assert (d.running, d.reserved, d.queued, d.refused) == (0, 0, 0, 1)
    assert s.demand(11.5, "a", WINDOW_S).refused == 0


def test_demand_of_unknown_pool_is_empty_and_creates_nothing() -> None:
    """Asking for an unknown pool's demand answers zero and creates no pool."""
    s = Scheduler()
    assert s.demand(0.0, "nobody", WINDOW_S).total == 0
    assert "nobody" not in s.pools
