"""Held SIP-call jobs and their binding to LiveKit SIP's room, in the pure layer:
the scheduler's held slots (`request(hold=True)`, `bind`) and `core.binding.Binder`.

Plain synchronous tests with a float clock.
"""

from __future__ import annotations

import pytest

from trunkline.core import JobEnded, JobState, PoolConfig, Scheduler, SendOffer
from trunkline.core.actions import SlotHeld
from trunkline.core.binding import (
    CALL_ID_ATTRIBUTE,
    HEADER_ATTRIBUTE,
    JOB_ATTRIBUTE,
    Binder,
    HoldState,
    Sighting,
    Verdict,
)

AGENT = "support"


def sched(cap: int = 1) -> Scheduler:
    s = Scheduler([PoolConfig(agent_name=AGENT, max_jobs_per_worker=cap)])
    s.worker_joined(0.0, "w1", AGENT)
    s.take_actions()
    return s


def sip(job_id: str = "", call_id: str = "", *, is_sip: bool = True, room: str = "r1") -> Sighting:
    attrs = {}
    if job_id:
        attrs[JOB_ATTRIBUTE] = job_id
    if call_id:
        attrs[CALL_ID_ATTRIBUTE] = call_id
    return Sighting(room, "sip_+15550100", is_sip, attrs, "webhook")


# ------------------------------------------------------------- scheduler


def test_a_held_job_takes_the_slot_and_sends_no_offer() -> None:
    """hold=True reserves the slot (a second call finds the worker full) with SlotHeld, no offer."""
    s = sched(cap=1)
    s.request(1.0, "j1", AGENT, hold=True, max_wait_s=0)
    (held,) = s.take_actions()
    assert isinstance(held, SlotHeld)
    assert held.worker_id == "w1"
    assert s.jobs["j1"].state is JobState.OFFERED
    assert s.jobs["j1"].held
    s.request(1.0, "j2", AGENT, max_wait_s=0)
    (ended,) = s.take_actions()
    assert isinstance(ended, JobEnded)
    assert ended.job.state is JobState.NO_CAPACITY
    assert s.next_deadline() is None  # no offer timeout runs for a held slot


def test_bind_offers_the_held_job_in_its_room() -> None:
    """bind moves the job to the room named and offers it on the held slot, with a timeout."""
    s = sched()
    s.request(1.0, "j1", AGENT, room="sip-placeholder", hold=True)
    s.take_actions()
    assert s.bind(2.0, "j1", "call-room_+1555", "via webhook")
    (offer,) = s.take_actions()
    assert isinstance(offer, SendOffer)
    assert offer.worker_id == "w1"
    job = s.jobs["j1"]
    assert job.room == "call-room_+1555"
    assert not job.held
    assert "call-room_+1555" in s.by_room
    assert "sip-placeholder" not in s.by_room
    assert [e.event for e in job.trace][-3:] == ["held", "bound", "offered"]
    assert s.next_deadline() is not None
    assert not s.bind(2.0, "j1", "other")  # bound once only


def test_an_answer_for_a_held_job_changes_nothing() -> None:
    """A worker cannot answer an offer it never got: the held job stays held."""
    s = sched()
    s.request(1.0, "j1", AGENT, hold=True)
    s.take_actions()
    s.answer(1.5, "w1", "j1", available=True)
    assert s.jobs["j1"].state is JobState.OFFERED
    assert s.jobs["j1"].held
    assert s.counters.offer_answers[(AGENT, "late")] == 1


def test_a_held_job_whose_worker_left_is_held_on_the_next_one() -> None:
    """The worker holding the slot disconnects: the job is held again elsewhere, not offered."""
    s = sched()
    s.request(1.0, "j1", AGENT, hold=True)
    s.take_actions()
    s.worker_joined(1.1, "w2", AGENT)
    s.worker_left(1.2, "w1")
    actions = s.take_actions()
    assert [type(a) for a in actions] == [SlotHeld]
    assert actions[0].worker_id == "w2"


def test_cancelling_a_held_job_frees_its_slot() -> None:
    """A hold cancelled (deadline, caller gone) ends cancelled and the next call gets the slot."""
    s = sched()
    s.request(1.0, "j1", AGENT, hold=True)
    s.take_actions()
    assert s.cancel(3.0, "j1", "no room")
    (ended,) = s.take_actions()
    assert isinstance(ended, JobEnded)
    assert ended.job.state is JobState.CANCELLED
    s.request(3.0, "j2", AGENT)
    assert isinstance(s.take_actions()[0], SendOffer)


# ---------------------------------------------------------------- binder


def test_the_job_attribute_binds_once_then_duplicates() -> None:
    """A SIP participant naming the held job binds it; the next sighting is a duplicate."""
    b = Binder()
    b.hold("AJ_1", "call-1", 0.0, 10.0)
    verdict, h = b.sighted(sip("AJ_1"), 0.5)
    assert verdict is Verdict.BIND
    assert h is not None
    assert h.room == "r1"
    assert h.state is HoldState.BOUND
    assert h.source == "webhook"
    assert b.sighted(sip("AJ_1", room="r2"), 0.6)[0] is Verdict.DUPLICATE
    assert b.bound_in("r1") is h
    assert b.bound_in("r2") is None


def test_the_header_attribute_and_the_call_id_also_name_the_call() -> None:
    """sip.h.x-trunkline-job (include_headers) and sip.callIDFull (the Call-ID) bind too."""
    b = Binder()
    b.hold("AJ_1", "call-1", 0.0, 10.0)
    b.hold("AJ_2", "call-2", 0.0, 10.0)
    by_header = Sighting("r1", "sip_a", True, {HEADER_ATTRIBUTE: "AJ_1"}, "poll")
    assert b.sighted(by_header, 0.1)[0] is Verdict.BIND
    verdict, h = b.sighted(sip(call_id="call-2", room="r2"), 0.2)
    assert verdict is Verdict.BIND
    assert h is not None
    assert h.job_id == "AJ_2"


@pytest.mark.parametrize(
    "sighting",
    [sip("AJ_1", is_sip=False), sip("AJ_9"), sip(call_id="call-9"), sip()],
    ids=["not a SIP participant", "unknown job", "unknown Call-ID", "no attribute"],
)
def test_what_names_no_waiting_hold_is_not_ours(sighting: Sighting) -> None:
    """Standard participants (who may set their own attributes) and unknown ids never bind."""
    b = Binder()
    b.hold("AJ_1", "call-1", 0.0, 10.0)
    assert b.sighted(sighting, 0.1) == (Verdict.NOT_OURS, None)
    assert b.holds["AJ_1"].state is HoldState.WAITING


def test_an_unbound_hold_expires_at_its_deadline_once() -> None:
    """on_timer returns the hold at its deadline (not before), once; a bound one never."""
    b = Binder()
    b.hold("AJ_1", "c1", 0.0, 5.0)
    b.hold("AJ_2", "c2", 0.0, 5.0)
    b.sighted(sip("AJ_2"), 1.0)
    assert b.on_timer(4.9) == []
    (expired,) = b.on_timer(5.0)
    assert expired.job_id == "AJ_1"
    assert expired.state is HoldState.EXPIRED
    assert b.on_timer(6.0) == []
    assert b.sighted(sip("AJ_1"), 6.0)[0] is Verdict.NOT_OURS
    assert b.release("AJ_2") is not None
    assert b.holds == {}


def test_polls_are_due_after_the_wait_and_stop_when_nothing_waits() -> None:
    """First poll poll_after_s after the hold, then every poll_interval_s, none once bound."""
    b = Binder(poll_after_s=1.0, poll_interval_s=0.5)
    b.hold("AJ_1", "c1", 10.0, 30.0)
    assert b.next_deadline() == 11.0
    assert b.take_poll(10.9) is None
    assert b.take_poll(11.0) == 10.0
    assert b.take_poll(11.2) is None
    assert b.take_poll(11.5) == 10.0
    b.sighted(sip("AJ_1"), 11.6)
    assert b.take_poll(12.0) is None
    assert b.next_deadline() == 40.0  # only the (stale) deadline entry is left


def test_the_binder_is_bounded() -> None:
    """Past max_holds a new hold is refused; an existing one is idempotent."""
    b = Binder(max_holds=1)
    assert b.hold("AJ_1", "c1", 0.0, 1.0)
    assert b.hold("AJ_1", "c1", 0.5, 1.0)
    assert not b.hold("AJ_2", "c2", 0.0, 1.0)
