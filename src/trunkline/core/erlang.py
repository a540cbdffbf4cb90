"""Teletraffic math: Erlang B, Erlang C and Poisson headroom.

Theory of operation
-------------------
Calls arrive as a Poisson process at rate λ and hold a slot for a mean time h, so
the offered load is ``A = λ·h`` erlangs. With ``n`` slots:

* **Erlang B** (M/M/n/n, a caller who finds every slot busy is refused at once):
  the blocking probability ``B(n, A) = (Aⁿ/n!) / Σₖ₌₀ⁿ Aᵏ/k!``. It is evaluated with
  the recurrence ``B(0) = 1``, ``B(n) = A·B(n-1) / (n + A·B(n-1))``, which stays in
  [0, 1] at every step, so it never overflows (no factorials, no powers) and works
  for fractional load and a million slots alike. Holding times need not be
  exponential: Erlang B depends on h only through A.
* **Erlang C** (M/M/n with an unbounded queue): the probability that a caller has
  to wait, ``C(n, A) = n·B / (n - A·(1 - B))`` for ``n > A``; for ``n ≤ A`` the queue
  grows without bound and every caller waits (C = 1). The wait of a caller who
  waits is exponential with rate ``(n - A)/h``, hence the mean wait
  ``C·h/(n - A)`` and ``P(wait > t) = C·exp(-(n - A)·t/h)``. These assume
  exponential call lengths and patient callers; callers who give up shorten the
  queue, so real waits are no worse than these.
* **Poisson headroom**: the smallest k with ``P(N > k) ≤ target`` for a Poisson
  count N, computed in log space so a large mean neither underflows ``e^(-mean)``
  nor loses the small tail to cancellation.

Every inverse ("smallest number of slots such that ...") walks the same recurrence
upward, so it costs O(answer) and is exact: the returned count meets the target and
one fewer does not. Everything here is pure and deterministic; bad input raises
`ValueError` naming the parameter and the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

__all__ = [
    "MAX_SERVERS",
    "erlang_b",
    "erlang_c",
    "mean_wait",
    "poisson_headroom",
    "prob_wait_exceeds",
    "servers_for_blocking",
    "servers_for_service_level",
    "servers_for_wait_probability",
]

# Bounds the O(n) recurrence (about a tenth of a second per million steps). A pool
# of a million concurrent calls is far beyond what one trunkline deployment plans.
MAX_SERVERS = 1_000_000


def _check_servers(servers: int) -> None:
    if isinstance(servers, bool) or not isinstance(servers, int):
        raise ValueError(f"servers must be an int, got {servers!r}")
    if not 0 <= servers <= MAX_SERVERS:
        raise ValueError(f"servers must be between 0 and {MAX_SERVERS}, got {servers}")


def _check_nonnegative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_probability(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):  # also false for NaN
        raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")


def _erlang_b_sequence(load: float) -> Iterator[tuple[int, float]]:
    """Yield (n, B(n, load)) for n = 0 .. MAX_SERVERS, then raise ValueError."""
    b = 1.0
    yield 0, b
    for n in range(1, MAX_SERVERS + 1):
        b = load * b / (n + load * b)
        yield n, b
    raise ValueError(
        f"load of {load} erlangs needs more than {MAX_SERVERS} servers for this target; "
        "lower the arrival rate or call length, or relax the target"
    )


def _erlang_c_from_b(servers: int, load: float, blocking: float) -> float:
    if servers <= load:
        return 1.0
    return servers * blocking / (servers - load * (1.0 - blocking))


def erlang_b(servers: int, load: float) -> float:
    """Probability that a caller is refused when `load` erlangs meet `servers` slots.

    `servers` is an int in [0, MAX_SERVERS]; `load` is a finite float >= 0. Returns a
    float in [0, 1]: 1.0 for zero servers, 0.0 for zero load with at least one server.
    """
    _check_servers(servers)
    _check_nonnegative("load", load)
    b = 1.0
    for n in range(1, servers + 1):
        b = load * b / (n + load * b)
    return b


def servers_for_blocking(load: float, target: float) -> int:
    """Smallest n with ``erlang_b(n, load) <= target``.

    `target` must be strictly between 0 and 1. Raises ValueError if the answer would
    exceed MAX_SERVERS.
    """
    _check_nonnegative("load", load)
    _check_probability("target", target)
    for n, b in _erlang_b_sequence(load):
        if b <= target:
            return n
    raise AssertionError("unreachable: _erlang_b_sequence raises when exhausted")


def erlang_c(servers: int, load: float) -> float:
    """Probability that a caller waits (all `servers` busy) in an M/M/n queue.

    Returns a float in [0, 1]; 1.0 when ``servers <= load`` (the queue is unstable and
    grows without bound, so in the long run everyone waits).
    """
    _check_servers(servers)
    _check_nonnegative("load", load)
    return _erlang_c_from_b(servers, load, erlang_b(servers, load))


def mean_wait(servers: int, load: float, mean_service_s: float) -> float:
    """Mean time in queue, over all callers, in seconds: ``C·h / (n - A)``.

    `mean_service_s` (h) must be > 0. Returns ``math.inf`` when ``servers <= load``.
    """
    _check_positive("mean_service_s", mean_service_s)
    c = erlang_c(servers, load)
    if servers <= load:
        return math.inf
    return c * mean_service_s / (servers - load)


def prob_wait_exceeds(servers: int, load: float, mean_service_s: float, t: float) -> float:
    """``P(wait > t)`` for a caller in an M/M/n queue: ``C·exp(-(n - A)·t/h)``.

    `t` is in seconds, >= 0 (t = 0 gives Erlang C itself). Returns 1.0 when
    ``servers <= load``.
    """
    _check_positive("mean_service_s", mean_service_s)
    _check_nonnegative("t", t)
    c = erlang_c(servers, load)
    if servers <= load:
        return 1.0
    return c * math.exp(-(servers - load) * t / mean_service_s)


def servers_for_wait_probability(load: float, target: float) -> int:
    """Smallest n with ``erlang_c(n, load) <= target`` (always more than `load`).

    `target` must be strictly between 0 and 1. Erlang C falls as n grows past the
    load, so every larger n also meets the target.
    """
    _check_nonnegative("load", load)
    _check_probability("target", target)
    for n, b in _erlang_b_sequence(load):
        if n > load and _erlang_c_from_b(n, load, b) <= target:
            return n
    raise AssertionError("unreachable: _erlang_b_sequence raises when exhausted")


def servers_for_service_level(
    load: float, mean_service_s: float, max_wait_s: float, target: float
) -> int:
    """Smallest n with ``prob_wait_exceeds(n, load, mean_service_s, max_wait_s) <= target``.

    That is, at most a `target` fraction of callers waits longer than `max_wait_s`
    (a service level of ``1 - target`` answered within `max_wait_s`). With
    ``max_wait_s == 0`` this equals `servers_for_wait_probability`.
    """
    _check_nonnegative("load", load)
    _check_positive("mean_service_s", mean_service_s)
    _check_nonnegative("max_wait_s", max_wait_s)
    _check_probability("target", target)
    for n, b in _erlang_b_sequence(load):
        if n <= load:
            continue
        c = _erlang_c_from_b(n, load, b)
        if c * math.exp(-(n - load) * max_wait_s / mean_service_s) <= target:
            return n
    raise AssertionError("unreachable: _erlang_b_sequence raises when exhausted")


def poisson_headroom(mean: float, target: float) -> int:
    """Smallest k >= 0 with ``P(N > k) <= target`` for N ~ Poisson(`mean`).

    `mean` must be finite, >= 0 and at most MAX_SERVERS; `target` strictly between
    0 and 1. The tail is summed from the top down in log space, so small targets
    (say 1e-12) are resolved as well as 0.01; terms dropped above the cut-off sum
    to less than a billionth of `target`.
    """
    _check_nonnegative("mean", mean)
    _check_probability("target", target)
    if mean > MAX_SERVERS:
        raise ValueError(f"mean must be at most {MAX_SERVERS}, got {mean!r}")
    if mean == 0.0:
        return 0
    log_mean = math.log(mean)

    def log_pmf(j: int) -> float:
        return -mean + j * log_mean - math.lgamma(j + 1)

    # Find a cut-off `top` past the mode where everything above it is negligible:
    # beyond the mode pmf(j+1)/pmf(j) = mean/(j+1) = r < 1, so the tail above `top`
    # is at most pmf(top)·r/(1 - r).
    top = math.floor(mean) + 1
    negligible = math.log(target) - math.log(1e9)
    while True:
        # log(r/(1 - r)) without forming r, which underflows for subnormal means.
        log_ratio = log_mean - math.log(top + 1) - math.log1p(-mean / (top + 1))
        if log_pmf(top) + log_ratio <= negligible:
            break
        top += 1
    tail = 0.0  # P(N > k), built from the top down
    for k in range(top - 1, -1, -1):
        tail += math.exp(log_pmf(k + 1))
        if tail > target:
            return k + 1
    return 0
