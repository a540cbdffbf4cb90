"""The lease holder's state machine on a fake clock (core/lease.py)."""

from __future__ import annotations

import pytest

from trunkline.core.lease import EpochFence, LeaseCall, LeaseHolder, LeaseState


def leader(ttl: float = 1.0) -> LeaseHolder:
    h = LeaseHolder("p", "m", ttl)
    assert h.due(0.0) is LeaseCall.ACQUIRE
    assert h.acquired(0.0, 7, 0.01)
    return h


def test_authority_ends_before_the_store_expiry_counted_from_sending() -> None:
    """A leader may act until sent_at + ttl - safety, never up to the store's own expiry."""
    h = leader(1.0)
    assert h.may_act(0.89)
    assert not h.may_act(0.9)
    assert h.state is LeaseState.FOLLOWER


def test_paused_leader_steps_down_without_a_round_trip() -> None:
    """A holder resuming after a pause past its lease cannot act; its next call is an acquire."""
    h = leader(1.0)
    assert not h.may_act(5.0)
    assert h.due(5.0) is LeaseCall.ACQUIRE


def test_renewal_due_every_third_and_extends() -> None:
    """Renew is due ttl/3 after the last grant; a successful one moves valid_until."""
    h = leader(0.9)
    assert h.due(0.2) is None
    assert h.due(0.31) is LeaseCall.RENEW
    assert h.due(0.32) is None  # one call in flight at a time
    h.renewed(0.31, True, 0.33)
    assert h.valid_until == pytest.approx(0.31 + 0.9 - 0.09)


def test_failed_renewals_keep_authority_until_valid_until() -> None:
    """With the store unreachable the leader acts on until its bound, then steps down."""
    h = leader(1.0)
    assert h.due(0.4) is LeaseCall.RENEW
    h.failed(0.8)
    assert h.may_act(0.85)
    assert h.due(0.95) is LeaseCall.ACQUIRE  # stepped down at 0.9
    assert h.failures == 1


def test_lost_renewal_steps_down_at_once() -> None:
    """A renewal answered 'not yours' ends authority immediately."""
    h = leader(1.0)
    h.due(0.4)
    h.renewed(0.4, False, 0.41)
    assert not h.may_act(0.42)


def test_late_acquire_answer_is_not_leadership() -> None:
    """An acquire answered after its lease would already be over is not taken as leadership."""
    h = LeaseHolder("p", "m", 1.0)
    h.due(0.0)
    assert not h.acquired(0.0, 3, 0.95)
    assert h.state is LeaseState.FOLLOWER


def test_epoch_never_goes_back() -> None:
    """An acquire handing out an epoch not above the last one is a bug, refused loudly."""
    h = leader()
    h.released()
    h.due(10.0)
    with pytest.raises(ValueError, match="epoch went back"):
        h.acquired(10.0, 7, 10.01)


def test_epoch_fence_refuses_older_epochs() -> None:
    """The receiving fence admits the current and newer epochs per pool, refuses older ones."""
    f = EpochFence()
    assert f.admit("p", 3)
    assert f.admit("p", 3)
    assert f.admit("p", 4)
    assert not f.admit("p", 3)
    assert f.admit("q", 1)
    assert f.current("p") == 4


def test_follower_tries_again_when_the_lease_it_saw_runs_out() -> None:
    """A follower told the lease is held 0.3 s more acquires at that moment, not at its retry."""
    h = LeaseHolder("p", "m", 2.0)
    assert h.due(0.0) is LeaseCall.ACQUIRE
    assert not h.acquired(0.0, None, 0.01)  # held elsewhere: next try at 0.51
    h.held_elsewhere(0.1, 0.3)
    assert h.due(0.39) is None
    assert h.due(0.4) is LeaseCall.ACQUIRE
    h.held_elsewhere(0.41, 0.0)  # a hint while a call is in flight changes nothing
    assert h.due(0.41) is None
    assert h.acquired(0.4, 3, 0.42)
    h.held_elsewhere(0.5, 0.0)  # a leader ignores hints: its renewals are its own
    assert h.due(0.5) is None
