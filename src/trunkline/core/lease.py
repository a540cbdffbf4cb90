"""A fenced lease on one pool, from the holder's side: time in, calls out.

Theory of operation
-------------------
Several servers share a pool; at most one may decide for it at a time: the
holder of the pool's lease. The lease itself lives in a coordination store
(Redis, `trunkline.cluster`): a key with an expiry, taken only when absent
(SET NX PX) and stamped with an *epoch*, a counter the store increments on
every take-over. This module is the holder's half, with no I/O: `due(now)`
says which call to make (acquire or renew, or none), the adapter makes it and
reports the answer with the time it *sent* the call (`acquired`, `renewed`,
`failed`), and `may_act(now)` says whether the holder may act on its
authority right now.

Why the time of sending: the store starts the expiry when it receives the
call, which is after we sent it, so `sent_at + ttl` is an upper bound of the
store's expiry on our clock. We stop acting `safety_s` before that bound (for
clock-rate drift between us and the store). A paused process (SIGSTOP, a long
GC, a VM freeze) resumes with a monotonic clock that counted the pause, so
its first `may_act` is False and it steps down without a round trip: it never
acts on a lease that may already be someone else's. That bound is the fence
on the holder's side; the other fence is the epoch, which the store checks
on every write the holder makes (`trunkline.cluster`: a write carrying a
stale epoch is refused) and which relaying servers check on every frame
(`EpochFence`).

A failed renewal (the store unreachable) does not end authority at once: the
holder may act until `valid_until` and keeps retrying; past it, it steps
down. A renewal answered "not yours" (someone else holds it, or it expired
and was taken) steps down at once.

A follower tries to acquire every `retry_s`, and also right when a lease it
saw held elsewhere runs out (`held_elsewhere`, from the adapter's reads of
the store): a dead holder's lease is taken within a tick of its expiry.
"""

from __future__ import annotations

import dataclasses
import enum

from trunkline.common.fsm import Transitions

__all__ = ["EpochFence", "LeaseCall", "LeaseHolder", "LeaseState"]


class LeaseState(enum.Enum):
    FOLLOWER = "follower"  # not holding; tries to acquire when due
    LEADER = "leader"  # holding: may act until valid_until


LEASE_TRANSITIONS: Transitions[LeaseState] = Transitions(
    LeaseState.FOLLOWER,
    {
        LeaseState.FOLLOWER: {LeaseState.LEADER},
        LeaseState.LEADER: {LeaseState.FOLLOWER},
    },
)


class LeaseCall(enum.Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"


@dataclasses.dataclass(slots=True)
class LeaseHolder:
    """One member's view of its lease on `pool`. `ttl_s` is the lease's
    lifetime in the store; renewals are due every `ttl_s / 3`, acquire
    attempts every `retry_s` (default `ttl_s / 4`)."""

    pool: str
    member: str
    ttl_s: float
    safety_s: float = 0.0
    retry_s: float = 0.0
    state: LeaseState = LeaseState.FOLLOWER
    epoch: int = 0  # the epoch of the lease held (0: never held)
    valid_until: float = 0.0  # may act while now < this (leader only)
    acquired_at: float = 0.0  # when the current leadership began (our clock)
    renewed_at: float = 0.0  # when the last successful call was sent
    next_at: float = 0.0  # when the next call is due
    in_flight: LeaseCall | None = None
    failures: int = 0  # consecutive failed calls (store unreachable)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if not self.safety_s:
            self.safety_s = max(0.02, self.ttl_s * 0.1)
        if not self.retry_s:
            self.retry_s = self.ttl_s / 4
        if self.safety_s >= self.ttl_s:
            raise ValueError("safety_s must be below ttl_s")

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def _move(self, new: LeaseState) -> None:
        LEASE_TRANSITIONS.check(f"lease {self.pool!r}", self.state, new)
        self.state = new

    def may_act(self, now: float) -> bool:
        """True while this member holds the lease and it cannot have expired
        in the store; steps down (to FOLLOWER) the first time it is past."""
        if self.state is not LeaseState.LEADER:
            return False
        if now < self.valid_until:
            return True
        self._step_down(now)
        return False

    def due(self, now: float) -> LeaseCall | None:
        """The call to make now (marked in flight), or None (one in flight,
        or not yet due). The adapter must answer it with `acquired`,
        `renewed` or `failed`, passing the `now` it was sent at."""
        self.may_act(now)  # step down first if the lease ran out
        if self.in_flight is not None or now < self.next_at:
            return None
        self.in_flight = LeaseCall.RENEW if self.state is LeaseState.LEADER else LeaseCall.ACQUIRE
        return self.in_flight

    def acquired(self, sent_at: float, epoch: int | None, now: float) -> bool:
        """The answer to ACQUIRE sent at `sent_at`: the new epoch, or None
        (someone else holds it). True if we now lead."""
        self.in_flight = None
        self.failures = 0
        if epoch is None or sent_at + self.ttl_s - self.safety_s <= now:
            # Not ours, or the answer came too late to be worth anything (the
            # store will expire it; the next attempt takes it back if free).
            self.next_at = now + self.retry_s
            return False
        if epoch <= self.epoch:
            raise ValueError(f"epoch went back: {epoch} after {self.epoch}")
        self._move(LeaseState.LEADER)
        self.epoch = epoch
        self.acquired_at = sent_at
        self._granted(sent_at)
        return True

    def renewed(self, sent_at: float, ok: bool, now: float) -> None:
        """The answer to RENEW sent at `sent_at`: extended (`ok`) or lost."""
        self.in_flight = None
        self.failures = 0
        if self.state is not LeaseState.LEADER:
            self.next_at = now
            return
        if ok:
            self._granted(sent_at)
        else:
            self._step_down(now)
            self.next_at = now + self.retry_s

    def failed(self, now: float) -> None:
        """The call in flight failed (store unreachable or timed out): retry
        soon; a leader keeps acting until `valid_until` (checked by `may_act`)."""
        self.in_flight = None
        self.failures += 1
        self.next_at = now + min(self.retry_s, self.ttl_s / 10)
        self.may_act(now)

    def held_elsewhere(self, now: float, left_s: float) -> None:
        """The store says another member holds the lease for `left_s` more
        (read at `now`, after the answer came): a follower tries to acquire
        right when it runs out instead of at its next retry. Only the time
        of the next attempt changes; the store still takes the lease only
        when absent, so this cannot give two holders."""
        if self.state is LeaseState.FOLLOWER and self.in_flight is None:
            self.next_at = min(self.next_at, now + max(0.0, left_s))

    def released(self) -> None:
        """We gave the lease up (shutdown): no more authority."""
        self.in_flight = None
        if self.state is LeaseState.LEADER:
            self._move(LeaseState.FOLLOWER)
        self.valid_until = 0.0

    def age(self, now: float) -> float:
        """Seconds since the current leadership began (0 when not leading)."""
        return now - self.acquired_at if self.state is LeaseState.LEADER else 0.0

    def _granted(self, sent_at: float) -> None:
        self.renewed_at = sent_at
        self.valid_until = sent_at + self.ttl_s - self.safety_s
        self.next_at = sent_at + self.ttl_s / 3

    def _step_down(self, now: float) -> None:
        self._move(LeaseState.FOLLOWER)
        self.valid_until = 0.0
        self.next_at = min(self.next_at, now)


@dataclasses.dataclass(slots=True)
class EpochFence:
    """The receiving side's fence: the highest epoch seen per pool. An action
    stamped with an older epoch comes from a holder that has been replaced
    and is refused; a newer one raises the bar for everyone after it."""

    highest: dict[str, int] = dataclasses.field(default_factory=dict)

    def admit(self, pool: str, epoch: int) -> bool:
        """True if an action of `pool` stamped `epoch` may be carried out."""
        top = self.highest.get(pool, 0)
        if epoch < top:
            return False
        if epoch > top:
            self.highest[pool] = epoch
        return True

    def current(self, pool: str) -> int:
        return self.highest.get(pool, 0)
