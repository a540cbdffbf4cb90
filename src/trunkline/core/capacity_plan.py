"""Capacity planning: from traffic and replica shape to slot and replica counts.

Theory of operation
-------------------
A `PlanRequest` describes the traffic (Poisson arrivals at ``λ`` calls/s, mean call
length ``h`` s), the replica shape (``cap`` slots per replica, ``cold_start_s`` from
start to ready) and the targets. `plan_capacity` turns it into a `CapacityPlan`:

1. **Offered load** ``A = λ·h`` erlangs: the mean number of calls in progress.
2. **Fixed pool** (no autoscaling). The smallest slot count meeting every target
   given: for ``blocking_target`` (no queue, an overflow caller is refused) the
   Erlang B inverse; for ``wait_target`` (callers queue up to ``max_wait_s``) the
   smallest n with ``P(wait > max_wait_s) ≤ wait_target`` under Erlang C. Replicas
   are ``ceil(slots / cap)``; the pool then really has ``replicas·cap`` slots, and
   all the figures reported for it (blocking, wait probability, mean wait,
   ``P(wait > max_wait_s)``) are for that deployed size.
3. **Autoscaler spare.** The autoscaler starts a replica the moment demand plus
   spare exceeds ready-plus-starting capacity, but the replica takes
   ``cold_start_s`` to become ready; meanwhile new callers can only use the warm
   spare slots. Arrivals in that window are ``N ~ Poisson(λ·T)``, and the spare is
   the smallest k with ``P(N > k) ≤ target``: the chance that a cold start leaves
   *any* caller without a slot is at most the target. This is conservative twice
   over: calls that end during the window free slots that are not counted, and the
   bound is per window, not per caller. With a queue, a caller who arrives within
   ``max_wait_s`` of the new replica being ready can wait for it, so only the
   first ``T = max(cold_start_s - max_wait_s, 0)`` seconds are exposed; without
   one, ``T = cold_start_s``. When both targets are given the larger spare wins.
   ``min_replicas = ceil(spare / cap)`` keeps that spare warm at zero traffic.

Pure and deterministic; invalid input raises `PlanInputError` (a `ValueError`)
naming the field, so a front end can map it to its own flag names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from trunkline.core import erlang

__all__ = [
    "DEFAULT_BLOCKING_TARGET",
    "DEFAULT_MAX_WAIT_S",
    "AutoscalePlan",
    "CapacityPlan",
    "FixedPool",
    "JSONValue",
    "PlanInputError",
    "PlanRequest",
    "plan_capacity",
]

DEFAULT_BLOCKING_TARGET = 0.01
DEFAULT_MAX_WAIT_S = 5.0

JSONValue = dict[str, "JSONValue"] | list["JSONValue"] | str | int | float | bool | None


class PlanInputError(ValueError):
    """A `PlanRequest` field is out of range.

    `field` is the dataclass field name, `requirement` what is allowed (for example
    "must be > 0"), `value` what was given. ``str(error)`` reads
    "<field> <requirement>, got <value>".
    """

    def __init__(self, field: str, requirement: str, value: object) -> None:
        super().__init__(f"{field} {requirement}, got {value!r}")
        self.field = field
        self.requirement = requirement
        self.value = value


def _finite(name: str, value: float, *, positive: bool) -> None:
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise PlanInputError(
            name, "must be a finite number " + ("> 0" if positive else ">= 0"), value
        )


def _probability(name: str, value: float | None) -> None:
    if value is not None and not (0.0 < value < 1.0):
        raise PlanInputError(name, "must be strictly between 0 and 1", value)


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What to plan for. Validated on construction (raises `PlanInputError`).

    If neither target is given, `blocking_target` defaults to
    `DEFAULT_BLOCKING_TARGET`. `max_wait_s` is the longest a queued caller is kept
    waiting (for a SIP trunk, its max wait); it is used for ``P(wait > max_wait_s)``,
    for sizing against `wait_target`, and for the autoscaler's exposure window.
    """

    arrival_rate_per_s: float
    mean_call_s: float
    cap: int
    cold_start_s: float
    blocking_target: float | None = None
    wait_target: float | None = None
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def __post_init__(self) -> None:
        _finite("arrival_rate_per_s", self.arrival_rate_per_s, positive=True)
        _finite("mean_call_s", self.mean_call_s, positive=True)
        if isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1:
            raise PlanInputError("cap", "must be an integer >= 1", self.cap)
        _finite("cold_start_s", self.cold_start_s, positive=False)
        _probability("blocking_target", self.blocking_target)
        _probability("wait_target", self.wait_target)
        _finite("max_wait_s", self.max_wait_s, positive=False)
        if self.blocking_target is None and self.wait_target is None:
            object.__setattr__(self, "blocking_target", DEFAULT_BLOCKING_TARGET)

    @property
    def offered_load(self) -> float:
        """Offered load in erlangs: arrival rate x mean call length."""
        return self.arrival_rate_per_s * self.mean_call_s


@dataclass(frozen=True, slots=True)
class FixedPool:
    """A fixed-size pool meeting every target; figures are for `capacity_slots`.

    `mean_wait_s` is ``math.inf`` when the queue is unstable (``capacity_slots <=
    offered load``); `to_dict` turns it into ``None``.
    """

    slots_for_blocking: int | None  # Erlang B minimum, if a blocking target was given
    slots_for_wait: int | None  # Erlang C minimum, if a wait target was given
    slots: int  # the larger of the two: the fewest slots meeting every target
    replicas: int  # ceil(slots / cap)
    capacity_slots: int  # replicas x cap: what the pool really has
    load_per_slot: float  # offered load / capacity_slots (> 1: a queue cannot keep up)
    blocking_probability: float  # Erlang B: refused at once when there is no queue
    wait_probability: float  # Erlang C: has to queue at all
    mean_wait_s: float  # over all callers, queued or not
    wait_exceeds_max_probability: float  # P(wait > max_wait_s)


@dataclass(frozen=True, slots=True)
class AutoscalePlan:
    """Warm spare needed by an autoscaler so cold starts do not strand callers."""

    exposure_s: float  # the part of a cold start callers cannot wait out
    arrivals_mean: float  # expected arrivals in that window: λ x exposure_s
    spare_slots: int  # smallest k with P(Poisson(arrivals_mean) > k) <= target
    min_replicas: int  # ceil(spare_slots / cap)


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The answer to a `PlanRequest`. Immutable; `to_dict` is JSON-ready."""

    request: PlanRequest
    offered_load_erlangs: float
    fixed: FixedPool
    autoscale: AutoscalePlan
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, JSONValue]:
        """Nested plain data; infinities become ``None`` so strict JSON accepts it."""
        raw = asdict(self)
        return {key: _json_safe(value) for key, value in raw.items()}


def _json_safe(value: object) -> JSONValue:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"not JSON-serializable: {value!r}")  # pragma: no cover


def plan_capacity(request: PlanRequest) -> CapacityPlan:
    """Size a fixed pool and an autoscaler's spare for `request` (see module doc).

    Raises ValueError only if the load needs more than `erlang.MAX_SERVERS` slots.
    """
    load = request.offered_load
    cap = request.cap
    notes: list[str] = []

    slots_b = slots_c = None
    if request.blocking_target is not None:
        slots_b = erlang.servers_for_blocking(load, request.blocking_target)
    if request.wait_target is not None:
        slots_c = erlang.servers_for_service_level(
            load, request.mean_call_s, request.max_wait_s, request.wait_target
        )
    slots = max(s for s in (slots_b, slots_c) if s is not None)
    replicas = -(-slots // cap)
    capacity = replicas * cap
    fixed = FixedPool(
        slots_for_blocking=slots_b,
        slots_for_wait=slots_c,
        slots=slots,
        replicas=replicas,
        capacity_slots=capacity,
        load_per_slot=load / capacity,
        blocking_probability=erlang.erlang_b(capacity, load),
        wait_probability=erlang.erlang_c(capacity, load),
        mean_wait_s=erlang.mean_wait(capacity, load, request.mean_call_s),
        wait_exceeds_max_probability=erlang.prob_wait_exceeds(
            capacity, load, request.mean_call_s, request.max_wait_s
        ),
    )
    if capacity <= load:
        notes.append(
            f"{capacity} slots cannot keep up with {load:.4g} erlangs: with a queue it "
            "would grow without bound; size for a wait target instead"
        )

    spare = 0
    exposure = 0.0
    if request.blocking_target is not None:
        exposure = request.cold_start_s
        spare = erlang.poisson_headroom(
            request.arrival_rate_per_s * exposure, request.blocking_target
        )
    if request.wait_target is not None:
        window = max(request.cold_start_s - request.max_wait_s, 0.0)
        spare_c = erlang.poisson_headroom(request.arrival_rate_per_s * window, request.wait_target)
        if spare_c > spare or request.blocking_target is None:
            spare, exposure = spare_c, window
    autoscale = AutoscalePlan(
        exposure_s=exposure,
        arrivals_mean=request.arrival_rate_per_s * exposure,
        spare_slots=spare,
        min_replicas=-(-spare // cap),
    )
    return CapacityPlan(
        request=request,
        offered_load_erlangs=load,
        fixed=fixed,
        autoscale=autoscale,
        notes=tuple(notes),
    )
