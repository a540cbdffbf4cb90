"""Erlang B/C math and the capacity planner built on it (trunkline.core)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trunkline.core import erlang
from trunkline.core.capacity_plan import (
    DEFAULT_BLOCKING_TARGET,
    PlanInputError,
    PlanRequest,
    plan_capacity,
)
from trunkline.core.erlang import (
    erlang_b,
    erlang_c,
    mean_wait,
    poisson_headroom,
    prob_wait_exceeds,
    servers_for_blocking,
    servers_for_service_level,
    servers_for_wait_probability,
)

# Published Erlang B table (offered erlangs for N servers at 1 %, 2 %, 5 % blocking),
# as printed, to two decimals (three significant digits below 1).
ERLANG_B_TABLE = {
    1: ("0.0101", "0.0204", "0.0526"),
    2: ("0.153", "0.223", "0.381"),
    5: ("1.36", "1.66", "2.22"),
    10: ("4.46", "5.08", "6.22"),
    20: ("12.03", "13.18", "15.25"),
    30: ("20.34", "21.93", "24.80"),
    50: ("37.90", "40.26", "44.53"),
    100: ("84.06", "87.97", "95.24"),
}
TABLE_POINTS = [
    (n, target, printed)
    for n, row in ERLANG_B_TABLE.items()
    for target, printed in zip((0.01, 0.02, 0.05), row, strict=True)
]

loads = st.floats(min_value=0.0, max_value=300.0, allow_nan=False)
positive_loads = st.floats(min_value=0.01, max_value=300.0, allow_nan=False)
servers = st.integers(min_value=0, max_value=600)
targets = st.floats(min_value=1e-6, max_value=0.5, allow_nan=False)


def _half_ulp_of_print(printed: str) -> float:
    """Half a unit in the last printed digit: the rounding window of a table entry."""
    return 0.5 * 10.0 ** -len(printed.split(".")[1])


def _exact_erlang_b(n: int, load: Fraction) -> Fraction:
    """The textbook formula (A^n/n!) / sum_k A^k/k!, in exact arithmetic."""
    terms = [load**k / math.factorial(k) for k in range(n + 1)]
    return terms[-1] / sum(terms)


# --- Erlang B ---------------------------------------------------------------


def test_twenty_servers_at_12_03_erlangs_block_one_percent() -> None:
    """Pins the issue's reference point: 20 servers at 12.03 erlangs give B = 1.00 %."""
    assert erlang_b(20, 12.03) == pytest.approx(0.0100, abs=5e-6)
    assert servers_for_blocking(12.03, 0.01) == 20


@pytest.mark.parametrize(("n", "target", "printed"), TABLE_POINTS)
def test_erlang_b_matches_published_table(n: int, target: float, printed: str) -> None:
    """Pins B against the published table: the target lies inside the entry's rounding window."""
    load, half = float(printed), _half_ulp_of_print(printed)
    assert erlang_b(n, load - half) <= target <= erlang_b(n, load + half)
    assert erlang_b(n, load) == pytest.approx(target, rel=0.02)


@pytest.mark.parametrize(("n", "target", "printed"), TABLE_POINTS)
def test_servers_for_blocking_reproduces_table(n: int, target: float, printed: str) -> None:
    """Pins the inverse: just below a table load N servers suffice, just above N+1 are needed."""
    load, half = float(printed), _half_ulp_of_print(printed)
    assert servers_for_blocking(load - half, target) == n
    assert servers_for_blocking(load + half, target) == n + 1


def test_erlang_b_edges() -> None:
    """Pins B(0, A) = 1, B(n, 0) = 0 for n >= 1, and B(1, A) = A/(1+A)."""
    assert erlang_b(0, 7.5) == 1.0
    assert erlang_b(0, 0.0) == 1.0
    assert erlang_b(3, 0.0) == 0.0
    assert erlang_b(1, 3.0) == pytest.approx(0.75)


def test_erlang_b_thousands_of_servers_no_overflow() -> None:
    """Pins stability at scale: 5,000 servers with fractional load stay finite and sane."""
    light = erlang_b(5000, 4700.5)
    heavy = erlang_b(5000, 6000.25)
    assert 0.0 < light < 1e-3
    # Carried load cannot exceed the servers: A(1-B) <= n, so B >= 1 - n/A.
    assert 1 - 5000 / 6000.25 <= heavy < 1.0
    assert erlang_b(erlang.MAX_SERVERS, 999_000.5) < 1e-3


@given(st.integers(min_value=0, max_value=40), st.fractions(min_value=0, max_value=60))
def test_recurrence_equals_textbook_formula(n: int, load: Fraction) -> None:
    """Pins the stable recurrence to the factorial formula it replaces."""
    exact = float(_exact_erlang_b(n, load))
    assert erlang_b(n, float(load)) == pytest.approx(exact, rel=1e-9, abs=1e-300)


@given(servers, loads)
def test_erlang_b_is_a_probability(n: int, load: float) -> None:
    """Pins 0 <= B <= 1 for every input."""
    assert 0.0 <= erlang_b(n, load) <= 1.0


@given(servers, positive_loads)
def test_erlang_b_decreases_with_servers(n: int, load: float) -> None:
    """Pins monotonicity in servers: one more server never raises blocking."""
    assert erlang_b(n + 1, load) <= erlang_b(n, load)
    if erlang_b(n, load) > 1e-250:
        assert erlang_b(n + 1, load) < erlang_b(n, load)


@given(servers, loads, st.floats(min_value=0.0, max_value=50.0))
def test_erlang_b_increases_with_load(n: int, load: float, extra: float) -> None:
    """Pins monotonicity in load: more traffic never lowers blocking."""
    assert erlang_b(n, load + extra) >= erlang_b(n, load)


@given(loads, targets)
def test_servers_for_blocking_is_minimal(load: float, target: float) -> None:
    """Pins the inverse: the answer meets the target and one server fewer does not."""
    n = servers_for_blocking(load, target)
    assert erlang_b(n, load) <= target
    assert n == 0 or erlang_b(n - 1, load) > target


# --- Erlang C ---------------------------------------------------------------


def test_erlang_c_call_centre_example() -> None:
    """Pins the classic example: 10 erlangs, 180 s calls, 11 agents -> Pw 68.21 %, ASA 122.8 s."""
    assert erlang_c(11, 10.0) == pytest.approx(0.6821, abs=5e-5)
    assert mean_wait(11, 10.0, 180.0) == pytest.approx(122.8, abs=0.05)
    # Service level for a 20 s answer target: 39.0 % with 11 agents, 88.8 % with 14.
    assert 1 - prob_wait_exceeds(11, 10.0, 180.0, 20.0) == pytest.approx(0.390, abs=5e-4)
    assert 1 - prob_wait_exceeds(14, 10.0, 180.0, 20.0) == pytest.approx(0.888, abs=5e-4)
    assert servers_for_service_level(10.0, 180.0, 20.0, 0.2) == 14


def test_erlang_c_textbook_six_erlangs_ten_servers() -> None:
    """Pins the textbook value: 6 erlangs on 10 servers wait with probability ~0.10."""
    assert erlang_c(10, 6.0) == pytest.approx(0.1013, abs=5e-5)
    assert servers_for_wait_probability(6.0, 0.11) == 10


def test_erlang_c_unstable_queue() -> None:
    """Pins n <= A: everyone waits, the mean wait is infinite, P(wait > t) = 1."""
    assert erlang_c(10, 10.0) == 1.0
    assert erlang_c(3, 7.5) == 1.0
    assert mean_wait(10, 12.0, 60.0) == math.inf
    assert prob_wait_exceeds(10, 12.0, 60.0, 30.0) == 1.0


@given(st.integers(min_value=1, max_value=30), st.fractions(min_value=0, max_value=40))
def test_erlang_c_equals_textbook_formula(n: int, load: Fraction) -> None:
    """Pins C = (A^n/n! * n/(n-A)) / (sum_{k<n} A^k/k! + A^n/n! * n/(n-A)) for n > A."""
    if n <= load:
        return
    head = sum(load**k / math.factorial(k) for k in range(n))
    top = load**n / math.factorial(n) * n / (n - load)
    assert erlang_c(n, float(load)) == pytest.approx(float(top / (head + top)), rel=1e-9)


@given(st.integers(min_value=1, max_value=600), positive_loads)
def test_erlang_c_bounds(n: int, load: float) -> None:
    """Pins B <= C <= 1: queueing makes a caller at least as likely to meet a full pool."""
    assert erlang_b(n, load) <= erlang_c(n, load) <= 1.0


@given(
    positive_loads,
    st.floats(min_value=1.0, max_value=600.0),
    st.floats(min_value=0.0, max_value=60.0),
    targets,
)
def test_servers_for_service_level_is_minimal(
    load: float, hold: float, wait: float, target: float
) -> None:
    """Pins the service-level inverse: the answer meets P(wait > t) <= target, one fewer fails."""
    n = servers_for_service_level(load, hold, wait, target)
    assert n > load
    assert prob_wait_exceeds(n, load, hold, wait) <= target
    assert prob_wait_exceeds(n - 1, load, hold, wait) > target
    assert prob_wait_exceeds(n + 1, load, hold, wait) <= target


@given(positive_loads, targets)
def test_servers_for_wait_probability_is_minimal(load: float, target: float) -> None:
    """Pins the Erlang C inverse and its equality with the t = 0 service level."""
    n = servers_for_wait_probability(load, target)
    assert erlang_c(n, load) <= target < erlang_c(n - 1, load)
    assert n == servers_for_service_level(load, 100.0, 0.0, target)


# --- Poisson headroom ---------------------------------------------------------


def test_poisson_headroom_known_values() -> None:
    """Pins Poisson(1): P(N > 3) = 1.9 % and P(N > 4) = 0.37 %, so 1 % needs 4."""
    assert poisson_headroom(1.0, 0.01) == 4
    assert poisson_headroom(1.0, 0.02) == 3
    assert poisson_headroom(0.0, 0.01) == 0
    assert poisson_headroom(1e-9, 0.5) == 0


@given(st.floats(min_value=0.0, max_value=60.0), targets)
def test_poisson_headroom_is_minimal(mean: float, target: float) -> None:
    """Pins the headroom against the exact tail: P(N > k) <= target and P(N > k-1) > target."""
    k = poisson_headroom(mean, target)

    def tail(j: int) -> float:
        # 1 - CDF, summed from the top so small tails keep their precision.
        return math.fsum(
            math.exp(-mean + i * math.log(mean) - math.lgamma(i + 1)) if mean else float(i == 0)
            for i in range(j + 1, j + 400)
        )

    assert tail(k) <= target * (1 + 1e-9)
    assert k == 0 or tail(k - 1) > target * (1 - 1e-9)


def test_poisson_headroom_large_mean() -> None:
    """Pins large means: no underflow of e^-mean, answer near mean + z*sqrt(mean)."""
    k = poisson_headroom(100_000.0, 1e-6)
    # Normal approximation: z(1e-6) ~ 4.75, sqrt(1e5) ~ 316.
    assert 100_000 + 4.5 * 316 < k < 100_000 + 5.1 * 316


# --- input validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: erlang_b(-1, 1.0), "servers"),
        (lambda: erlang_b(2.5, 1.0), "servers"),  # type: ignore[arg-type]
        (lambda: erlang_b(True, 1.0), "servers"),
        (lambda: erlang_b(erlang.MAX_SERVERS + 1, 1.0), "servers"),
        (lambda: erlang_b(3, -0.5), "load"),
        (lambda: erlang_b(3, math.nan), "load"),
        (lambda: erlang_b(3, math.inf), "load"),
        (lambda: servers_for_blocking(5.0, 0.0), "target"),
        (lambda: servers_for_blocking(5.0, 1.0), "target"),
        (lambda: servers_for_blocking(5.0, math.nan), "target"),
        (lambda: mean_wait(5, 1.0, 0.0), "mean_service_s"),
        (lambda: prob_wait_exceeds(5, 1.0, 60.0, -1.0), "t"),
        (lambda: servers_for_service_level(1.0, 60.0, -2.0, 0.1), "max_wait_s"),
        (lambda: poisson_headroom(-1.0, 0.1), "mean"),
        (lambda: servers_for_blocking(2e6, 0.01), "load"),
    ],
)
def test_bad_input_raises_value_error_naming_parameter(
    call: Callable[[], object], names: str
) -> None:
    """Pins validation: bad input raises ValueError whose message starts with the parameter."""
    with pytest.raises(ValueError, match=rf"^{names} |^load of"):
        call()


# --- capacity planner --------------------------------------------------------------


def test_plan_sizes_fixed_pool_with_erlang_b() -> None:
    """Pins the planner at the reference point: 12.03 erl at 1 % -> 20 slots, 5 replicas of 4."""
    plan = plan_capacity(
        PlanRequest(arrival_rate_per_s=12.03 / 60, mean_call_s=60.0, cap=4, cold_start_s=2.0)
    )
    assert plan.request.blocking_target == DEFAULT_BLOCKING_TARGET
    assert plan.offered_load_erlangs == pytest.approx(12.03)
    assert plan.fixed.slots_for_blocking == 20
    assert plan.fixed.slots_for_wait is None
    assert (plan.fixed.slots, plan.fixed.replicas, plan.fixed.capacity_slots) == (20, 5, 20)
    assert plan.fixed.blocking_probability == pytest.approx(erlang_b(20, 12.03))
    assert plan.fixed.wait_probability == pytest.approx(erlang_c(20, 12.03))
    assert plan.fixed.wait_exceeds_max_probability == pytest.approx(
        prob_wait_exceeds(20, 12.03, 60.0, 5.0)
    )


def test_plan_rounds_slots_up_to_whole_replicas() -> None:
    """Pins replicas = ceil(slots / cap) and that figures describe the deployed replicas x cap."""
    plan = plan_capacity(PlanRequest(0.5, 180.0, cap=4, cold_start_s=1.5))
    assert plan.fixed.slots == servers_for_blocking(90.0, 0.01) == 107
    assert (plan.fixed.replicas, plan.fixed.capacity_slots) == (27, 108)
    assert plan.fixed.blocking_probability == pytest.approx(erlang_b(108, 90.0))
    assert plan.fixed.load_per_slot == pytest.approx(90 / 108)


def test_plan_spare_covers_cold_start_arrivals() -> None:
    """Pins the spare: Poisson(lambda*T) quantile at the target; min_replicas = ceil(spare/C)."""
    plan = plan_capacity(PlanRequest(2.0, 60.0, cap=4, cold_start_s=10.0, blocking_target=0.01))
    assert plan.autoscale.exposure_s == 10.0
    assert plan.autoscale.arrivals_mean == pytest.approx(20.0)
    assert plan.autoscale.spare_slots == poisson_headroom(20.0, 0.01)
    assert plan.autoscale.min_replicas == math.ceil(plan.autoscale.spare_slots / 4)


def test_plan_wait_target_uses_erlang_c_and_shortens_exposure() -> None:
    """Pins wait-target sizing (P(wait > max wait) <= target); exposure = cold start - max wait."""
    request = PlanRequest(2.0, 180.0, cap=4, cold_start_s=20.0, wait_target=0.05, max_wait_s=5.0)
    plan = plan_capacity(request)
    assert request.blocking_target is None
    assert plan.fixed.slots_for_blocking is None
    assert plan.fixed.slots == servers_for_service_level(360.0, 180.0, 5.0, 0.05)
    assert plan.fixed.wait_exceeds_max_probability <= 0.05
    assert plan.autoscale.exposure_s == 15.0
    assert plan.autoscale.spare_slots == poisson_headroom(30.0, 0.05)
    quick = plan_capacity(
        PlanRequest(2.0, 180.0, cap=4, cold_start_s=1.5, wait_target=0.05, max_wait_s=5.0)
    )
    assert (quick.autoscale.spare_slots, quick.autoscale.min_replicas) == (0, 0)


def test_plan_with_both_targets_meets_both() -> None:
    """Pins that pool and spare are the larger of the blocking and wait answers."""
    plan = plan_capacity(
        PlanRequest(1.0, 120.0, cap=3, cold_start_s=8.0, blocking_target=0.02, wait_target=0.001)
    )
    assert plan.fixed.slots_for_blocking is not None
    assert plan.fixed.slots_for_wait is not None
    assert plan.fixed.slots == max(plan.fixed.slots_for_blocking, plan.fixed.slots_for_wait)
    assert plan.fixed.blocking_probability <= 0.02
    assert plan.fixed.wait_exceeds_max_probability <= 0.001
    assert plan.autoscale.spare_slots == max(
        poisson_headroom(8.0, 0.02), poisson_headroom(3.0, 0.001)
    )


def test_plan_to_dict_is_strict_json_even_when_unstable() -> None:
    """Pins to_dict: strict JSON (no NaN/inf), infinite mean wait as null, with a note."""
    plan = plan_capacity(PlanRequest(1.0, 180.0, cap=4, cold_start_s=1.5, blocking_target=0.9))
    assert plan.fixed.mean_wait_s == math.inf
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["fixed"]["mean_wait_s"] is None
    assert data["fixed"]["replicas"] == plan.fixed.replicas
    assert data["request"]["cap"] == 4
    assert len(data["notes"]) == 1
    assert "without bound" in data["notes"][0]


@given(
    st.floats(min_value=0.001, max_value=20.0),
    st.floats(min_value=1.0, max_value=600.0),
    st.integers(min_value=1, max_value=16),
    st.floats(min_value=0.0, max_value=120.0),
    targets,
)
def test_plan_invariants(rate: float, hold: float, cap: int, cold: float, target: float) -> None:
    """Pins planner invariants: whole replicas just cover the slots, targets met, JSON-clean."""
    plan = plan_capacity(
        PlanRequest(rate, hold, cap=cap, cold_start_s=cold, blocking_target=target)
    )
    fixed = plan.fixed
    assert (fixed.replicas - 1) * cap < fixed.slots <= fixed.replicas * cap == fixed.capacity_slots
    assert fixed.blocking_probability <= target
    assert plan.autoscale.min_replicas * cap >= plan.autoscale.spare_slots
    json.dumps(plan.to_dict(), allow_nan=False)
    assert plan == plan_capacity(plan.request)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arrival_rate_per_s": 0.0}, "arrival_rate_per_s"),
        ({"mean_call_s": -3.0}, "mean_call_s"),
        ({"cap": 0}, "cap"),
        ({"cold_start_s": math.nan}, "cold_start_s"),
        ({"blocking_target": 1.5}, "blocking_target"),
        ({"wait_target": 0.0}, "wait_target"),
        ({"max_wait_s": -1.0}, "max_wait_s"),
    ],
)
def test_plan_request_rejects_bad_fields(kwargs: dict[str, float], field: str) -> None:
    """Pins PlanRequest validation: PlanInputError (a ValueError) names the offending field."""
    base: dict[str, float] = {
        "arrival_rate_per_s": 1.0,
        "mean_call_s": 60.0,
        "cap": 4,
        "cold_start_s": 2.0,
    }
    with pytest.raises(PlanInputError) as info:
        PlanRequest(**(base | kwargs))  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert isinstance(info.value, ValueError)
