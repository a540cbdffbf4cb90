"""Hypothesis: leases, epochs and handover between three members sharing the
in-memory store on one fake clock, with calls that take time to reach the
store and to come back, members that pause (take no steps) for any time, and
leases that run out. At no instant may two members act; an acting member's
epoch is the store's current one; epochs only grow and each belongs to one
member; every write with a stale epoch is refused."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trunkline.cluster import MemoryCoordinator
from trunkline.core.lease import LeaseCall, LeaseHolder, LeaseState

T = TypeVar("T")
TTL = 1.0
POOL = "p"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the double's methods)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the in-memory coordinator suspended")


class Leases(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = MemoryCoordinator(lambda: self.now)
        self.members = [LeaseHolder(POOL, f"m{i}", TTL) for i in range(3)]
        self.epoch_owner: dict[int, str] = {}
        self.highest = 0
        self.writes: list[tuple[str, int, bool]] = []

    def _store_lease(self) -> tuple[str, int] | None:
        got = run(self.store.leases())
        return (got[0].member, got[0].epoch) if got else None

    @rule(dt=st.floats(0.0, 1.5 * TTL))
    def time_passes(self, dt: float) -> None:
        """Any member may be paused meanwhile: it takes no step."""
        self.now += dt

    @rule(
        i=st.integers(0, 2),
        there=st.floats(0.0, 0.6 * TTL),
        back=st.floats(0.0, 0.6 * TTL),
        lost=st.booleans(),
    )
    def step(self, i: int, there: float, back: float, lost: bool) -> None:
        """Member i makes its due call; it reaches the store `there` s later and
        its answer comes `back` s after that, or is lost (a timeout)."""
        m = self.members[i]
        sent = self.now
        call = m.due(sent)
        if call is None:
            return
        self.now += there
        floor = m.epoch
        if call is LeaseCall.ACQUIRE:
            epoch = run(self.store.acquire(POOL, m.member, m.ttl_ms, floor))
        else:
            ok = run(self.store.renew(POOL, m.member, m.epoch, m.ttl_ms))
        self.now += back
        if lost:
            m.failed(self.now)
            return
        if call is LeaseCall.ACQUIRE:
            if epoch is not None:
                assert epoch not in self.epoch_owner
                assert epoch > self.highest
                self.epoch_owner[epoch] = m.member
                self.highest = epoch
            m.acquired(sent, epoch, self.now)
        else:
            m.renewed(sent, ok, self.now)

    @rule(i=st.integers(0, 2), left=st.floats(-0.5 * TTL, 1.5 * TTL))
    def hint(self, i: int, left: float) -> None:
        """Member i reads that the lease is held elsewhere for `left` s more:
        right, stale or plain wrong, a hint only moves its next attempt."""
        self.members[i].held_elsewhere(self.now, left)

    @rule(i=st.integers(0, 2), there=st.floats(0.0, 0.6 * TTL))
    def act(self, i: int, there: float) -> None:
        """Member i, if it may act, writes a fenced record reaching the store `there` s later."""
        m = self.members[i]
        if not m.may_act(self.now):
            return
        self.now += there
        ok = run(self.store.put_fenced(POOL, m.member, m.epoch, "k", f"{m.member}@{m.epoch}"))
        held = self._store_lease()
        # Refused exactly when the lease in the store is no longer (m, epoch).
        assert ok == (held == (m.member, m.epoch))
        self.writes.append((m.member, m.epoch, ok))

    @precondition(lambda self: any(m.state is LeaseState.LEADER for m in self.members))
    @rule(i=st.integers(0, 2))
    def release(self, i: int) -> None:
        """A leader gives up its lease (shutdown)."""
        m = self.members[i]
        if m.state is LeaseState.LEADER and m.in_flight is None:
            run(self.store.release(POOL, m.member, m.epoch))
            m.released()

    @invariant()
    def at_most_one_actor_and_it_holds_the_store_lease(self) -> None:
        acting = [m for m in self.members if m.may_act(self.now)]
        assert len(acting) <= 1
        if acting:
            assert self._store_lease() == (acting[0].member, acting[0].epoch)
            assert self.epoch_owner[acting[0].epoch] == acting[0].member

    @invariant()
    def stale_writes_never_land(self) -> None:
        rec = run(self.store.records(POOL)).get("k")
        if rec is not None:
            member, _, epoch = rec.partition("@")
            assert self.epoch_owner[int(epoch)] == member
            assert int(epoch) <= self.highest


TestLeases = Leases.TestCase
TestLeases.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
