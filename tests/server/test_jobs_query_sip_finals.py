"""The SIP edge reports the final response it sent upstream to the admission
backend (what goes on the job's record), once per call, before the cancel or
release that ends the job: for each way a call can end (sans-IO)."""

from __future__ import annotations

from sip.sipkit import CALLER, DOWNSTREAM, FakeBackend, answer, config, drain, invite, seeded
from sip.sipkit import request_like as req

from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipRequest


class Ordered(FakeBackend):
    """A FakeBackend that also logs every call in order."""

    log: list[tuple[str, object]]

    def cancel(self, call_ref: str, reason: str) -> None:
        self.log.append(("cancel", reason))
        super().cancel(call_ref, reason)

    def release(self, call_ref: str, outcome: str) -> None:
        self.log.append(("release", outcome))
        super().release(call_ref, outcome)

    def final_sent(self, call_ref: str, status: int) -> None:
        self.log.append(("final", status))
        super().final_sent(call_ref, status)


def edge_of(**trunk: object) -> tuple[SipEdge, Ordered]:
    backend = Ordered()
    backend.log = []
    edge = SipEdge(config(None, **trunk), backend, random=seeded())
    backend.edge = edge
    return edge, backend


def placed(edge: SipEdge, backend: Ordered) -> SipRequest:
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.place(backend.only_ref, 0.1)
    (fwd,) = drain(edge)
    assert isinstance(fwd.msg, SipRequest)
    return fwd.msg


def test_refusal_reports_the_trunks_status() -> None:
    """A call the scheduler refuses reports the trunk's refusal code."""
    edge, backend = edge_of(refusal=486)
    edge.receive(invite(), CALLER, 0.0)
    backend.refuse(backend.only_ref, "no capacity", 0.2)
    assert [s.status for s in drain(edge)] == [100, 486]
    assert backend.log == [("final", 486)]


def test_cancel_while_queued_reports_487_before_the_cancel() -> None:
    """CANCEL while queued: 487 is reported, then the job is cancelled."""
    edge, backend = edge_of()
    edge.receive(invite(), CALLER, 0.0)
    edge.receive(req("CANCEL"), CALLER, 0.5)
    assert backend.log == [("final", 487), ("cancel", "caller_cancelled")]


def test_decision_timeout_reports_the_refusal_before_the_cancel() -> None:
    """No decision by max_wait + grace: the refusal, then the cancel."""
    edge, backend = edge_of(max_wait_s=0.5)
    edge.receive(invite(), CALLER, 0.0)
    edge.on_timer(10.0)
    assert backend.log == [("final", 503), ("cancel", "max_wait_exceeded")]


def test_answered_call_reports_200_once() -> None:
    """The downstream's 200 relayed upstream is reported once (not its
    retransmission); the BYE's release comes after."""
    edge, backend = edge_of()
    fwd = placed(edge, backend)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.3)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.4)
    assert backend.log == [("final", 200)]


def test_downstream_failure_reports_it_before_the_release() -> None:
    """A downstream 486 relayed upstream is reported, then the slot released."""
    edge, backend = edge_of()
    fwd = placed(edge, backend)
    edge.receive(answer(fwd, 486, "Busy Here"), DOWNSTREAM, 0.3)
    assert backend.log == [("final", 486), ("release", "downstream_486")]


def test_job_ending_before_the_answer_reports_480() -> None:
    """The agent's job ends while the downstream rings: 480 upstream, reported."""
    edge, backend = edge_of()
    placed(edge, backend)
    edge.on_job_ended("job-1", 0.5)
    assert ("final", 480) in backend.log
    assert all(kind != "release" for kind, _ in backend.log)
