"""`Metrics.placed` / `Metrics.ended` with the per-pool histogram children cached."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trunkline.core import Job, JobState
from trunkline.runtime.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def job(pool: str, *, placed_after: float | None, waited: float) -> Job:
    j = Job(f"AJ_{pool}", pool, "room", "", 100.0, 5.0)
    j.queue_wait_s = waited
    if placed_after is None:
        j.state = JobState.NO_CAPACITY
    else:
        j.placed_at = 100.0 + placed_after
    return j


def test_cached_children_count_every_observation_per_pool() -> None:
    """Repeated observations of a pool all reach the scrape, and pools stay apart."""
    m = Metrics()
    for _ in range(3):
        m.placed(job("a", placed_after=0.004, waited=0.001))
    m.placed(job("b", placed_after=2.0, waited=1.5))
    m.ended(job("a", placed_after=None, waited=5.0))
    s = samples(m)
    pool = frozenset({("pool", "a")})
    assert s[("trunkline_placement_latency_seconds_count", pool)] == 3
    assert s[("trunkline_placement_latency_seconds_sum", pool)] == pytest.approx(3 * 0.004)
    assert s[("trunkline_queue_wait_seconds_count", pool)] == 4
    assert s[("trunkline_queue_wait_seconds_sum", pool)] == pytest.approx(3 * 0.001 + 5.0)
    b = frozenset({("pool", "b")})
    assert s[("trunkline_placement_latency_seconds_count", b)] == 1
    assert s[("trunkline_queue_wait_seconds_sum", b)] == 1.5


def test_refused_only_pool_has_no_placement_series() -> None:
    """A pool whose jobs were only refused (never placed) shows queue wait, no placement."""
    m = Metrics()
    m.ended(job("r", placed_after=None, waited=5.0))
    s = samples(m)
    pool = frozenset({("pool", "r")})
    assert s[("trunkline_queue_wait_seconds_count", pool)] == 1
    assert ("trunkline_placement_latency_seconds_count", pool) not in s
