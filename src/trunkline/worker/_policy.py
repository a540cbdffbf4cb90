"""Pure decisions of the worker SDK: admission, status and reconnect backoff.

Theory of operation: the worker keeps a small ledger of slots (jobs offered and
being decided, accepted but not yet running, running) and a load sample. Every
decision it makes about the server is a pure function of those numbers, kept
here so it can be tested without sockets, processes or clocks:

- `decide_availability` answers "may this offer go to `request_fnc`?"; a refusal
  is always soft (`terminate=false`) so the server places the job elsewhere.
- `compute_status` is what `UpdateWorkerStatus` carries.
- `Backoff` is the reconnect schedule: capped exponential with jitter drawn from
  an injected random source, never below half the nominal delay (no hot loop).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable


class Refusal(enum.Enum):
    """Why the worker refuses an offer before asking the application."""

    DRAINING = "draining"
    AT_CAPACITY = "at_capacity"
    OVERLOADED = "overloaded"
    DUPLICATE = "duplicate"


def decide_availability(
    *,
    draining: bool,
    used_slots: int,
    max_jobs: int,
    load: float,
    load_threshold: float,
) -> Refusal | None:
    """Return the reason to refuse an offer, or None if it may be considered.

    `used_slots` counts running jobs plus offers being decided plus accepted
    jobs not yet running; the new offer would take one more slot, so the worker
    refuses once `used_slots >= max_jobs`. Draining wins over every other reason
    so the server's trace says why the replica is going away.
    """
    if draining:
        return Refusal.DRAINING
    if used_slots >= max_jobs:
        return Refusal.AT_CAPACITY
    if load >= load_threshold:
        return Refusal.OVERLOADED
    return None


class Availability(enum.Enum):
    """The two worker states the protocol knows (WS_AVAILABLE / WS_FULL)."""

    AVAILABLE = "available"
    FULL = "full"


@dataclasses.dataclass(frozen=True, slots=True)
class StatusReport:
    """The content of one `UpdateWorkerStatus` message."""

    availability: Availability
    load: float
    job_count: int
    draining: bool


def compute_status(
    *,
    draining: bool,
    used_slots: int,
    running_jobs: int,
    max_jobs: int,
    load: float,
    load_threshold: float,
) -> StatusReport:
    """Status to report: FULL when draining, out of slots or overloaded.

    While draining the load is reported as 0 (as LiveKit workers do) so a load
    based scheduler does not read the replica's winding down as overload; the
    `draining` flag and FULL status already keep offers away.
    """
    if draining:
        return StatusReport(Availability.FULL, 0.0, running_jobs, True)
    full = used_slots >= max_jobs or load >= load_threshold
    availability = Availability.FULL if full else Availability.AVAILABLE
    return StatusReport(availability, load, running_jobs, False)


def slot_load(used_slots: int, max_jobs: int) -> float:
    """Default load: the fraction of declared slots in use, in [0, 1]."""
    if max_jobs <= 0:
        return 1.0
    return min(1.0, used_slots / max_jobs)


@dataclasses.dataclass(slots=True)
class Backoff:
    """Reconnect delays: `min(cap, base * 2**attempt)` scaled by a jitter factor.

    The factor is drawn uniformly from [0.5, 1.0) through `rand` (a callable
    returning floats in [0, 1), `random.random` by default), so replicas that lost
    the same server do not reconnect in lockstep and no delay is ever shorter than
    half its nominal value. `next_delay()` returns the delay for the current
    attempt and advances; `reset()` starts over (call it only once a connection
    has proven stable, not merely on connect: a server that accepts and then
    drops would otherwise be hammered).
    """

    base: float = 0.5
    cap: float = 10.0
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def nominal(self, attempt: int) -> float:
        """Delay before jitter for `attempt` (0-based)."""
        # Bound the exponent so huge attempt counts cannot overflow a float.
        return min(self.cap, self.base * 2.0 ** min(attempt, 32))

    def next_delay(self) -> float:
        """Delay to wait before the next connection attempt; advances the count."""
        delay = self.nominal(self.attempt) * (0.5 + 0.5 * self.rand())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Forget past failures: the next delay is the shortest again."""
        self.attempt = 0
