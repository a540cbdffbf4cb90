"""Admission edge tests: sans-IO, fake clock, fake admission backend."""

from __future__ import annotations

import pytest
from sip.sipkit import CALLER, DOWNSTREAM, FakeBackend, Sent, answer, drain, invite, make_edge
from sip.sipkit import request_like as req

from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipRequest, SipResponse

ROUTE = "<sip:10.0.0.5:5060;lr>"


def until_idle(edge: SipEdge, until: float) -> list[Sent]:
    """Fire the edge's timers up to ``until``; everything sent meanwhile."""
    sent: list[Sent] = []
    while (d := edge.next_deadline()) is not None and d <= until:
        edge.on_timer(d)
        sent += drain(edge)
    return sent


def placed_call(edge: SipEdge, backend: FakeBackend) -> SipRequest:
    """Drive one INVITE to placement; return the INVITE sent downstream."""
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.place(backend.only_ref, 0.1)
    (fwd,) = drain(edge)
    assert isinstance(fwd.msg, SipRequest)
    return fwd.msg


def test_invite_gets_100_trying_at_once_and_one_job_request() -> None:
    """A new INVITE is answered 100 immediately and asks the backend once."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    (sent,) = drain(edge)
    assert sent.status == 100
    assert sent.peer == CALLER
    pool, max_wait, meta = backend.requests[backend.only_ref]
    assert (pool, max_wait) == ("support", 2.0)
    assert meta["sip.called"] == "+15550100"
    assert meta["sip.trunk"] == "support"


def test_retransmitted_invite_never_makes_a_second_job() -> None:
    """INVITE retransmits (queued, placed, answered, refused) never reach the backend again."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    for t in (0.5, 1.5):
        edge.receive(invite(), CALLER, t)
    assert [s.status for s in drain(edge)] == [100, 100, 100]
    fwd = None
    backend.place(backend.only_ref, 1.6)
    fwd = drain(edge)[0].msg
    assert isinstance(fwd, SipRequest)
    edge.receive(invite(), CALLER, 1.7)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 1.8)
    edge.receive(invite(), CALLER, 1.9)
    edge.receive(invite(), CALLER, 40.0)  # after Timer L ended the transaction
    assert len(backend.requests) == 1
    assert edge.stats.retransmissions == 5


def test_nothing_but_100_is_sent_while_the_decision_is_open() -> None:
    """No 180 or anything else goes upstream while the call is queued."""
    edge, _ = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    assert until_idle(edge, 2.0) == []


def test_backend_refusal_sends_503_with_retry_after_and_reason() -> None:
    """A refusal is the trunk's 503 with Retry-After and a Reason naming the cause."""
    edge, backend = make_edge(retry_after_s=7)
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.refuse(backend.only_ref, "pool 'support' full; 3 queued", 0.3)
    (sent,) = drain(edge)
    assert sent.status == 503
    assert sent.msg.headers.get("Retry-After") == "7"
    assert sent.msg.headers.get("Reason") == "SIP;cause=503;text=\"pool 'support' full; 3 queued\""
    assert ";tag=" in (sent.msg.headers.get("To") or "")
    assert edge.pending_calls() == 0


@pytest.mark.parametrize(("code", "phrase"), [(486, "Busy Here"), (480, "Temporarily Unavailable")])
def test_trunk_refusal_code_is_used(code: int, phrase: str) -> None:
    """Trunks configured with 486 or 480 refuse with that code."""
    edge, backend = make_edge(refusal=code)
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.refuse(backend.only_ref, "full", 0.1)
    (sent,) = drain(edge)
    assert isinstance(sent.msg, SipResponse)
    assert (sent.msg.status, sent.msg.reason) == (code, phrase)


def test_undecided_call_is_refused_at_max_wait_plus_grace_and_cancelled() -> None:
    """If the backend never answers, the edge refuses at max_wait_s + grace and cancels."""
    edge, backend = make_edge(max_wait_s=1.0)
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    edge.on_timer(1.04)
    assert drain(edge) == []
    edge.on_timer(1.05)
    (sent,) = drain(edge)
    assert sent.status == 503
    assert "max_wait_s=1" in (sent.msg.headers.get("Reason") or "")
    assert backend.cancelled == [(backend.only_ref, "max_wait_exceeded")]
    backend.place(backend.only_ref, 1.2)  # a placement racing the deadline
    assert backend.released == [(backend.only_ref, "placed_after_call_gone")]
    assert backend.held == set()


def test_backend_refusing_inside_cancel_at_the_deadline_refuses_once() -> None:
    """A backend that answers on_refused from inside cancel() at the decision deadline
    gets exactly one 503 out, no internal error, and other due timers still run."""
    edge, backend = make_edge(max_wait_s=1.0)
    plain_cancel = backend.cancel

    def refusing_cancel(call_ref: str, reason: str) -> None:
        plain_cancel(call_ref, reason)
        assert backend.edge is not None
        backend.edge.on_refused(call_ref, "job cancelled", 1.05)

    backend.cancel = refusing_cancel  # type: ignore[method-assign]
    edge.receive(invite(call_id="c1", branch="z9hG4bK1"), CALLER, 0.0)
    edge.receive(invite(call_id="c2", branch="z9hG4bK2"), CALLER, 0.0)
    drain(edge)
    edge.on_timer(1.05)
    sent = drain(edge)
    assert [s.status for s in sent] == [503, 503]
    assert edge.stats.internal_errors == 0
    assert len(backend.cancelled) == 2


def test_refusal_retransmits_until_ack_then_call_is_forgotten() -> None:
    """The final is resent with Timer G until ACK; then the edge empties itself."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.refuse(backend.only_ref, "full", 0.0)
    final = drain(edge)[0].msg
    resent = until_idle(edge, 1.6)
    assert [s.status for s in resent] == [503, 503]
    tag = (final.headers.get("To") or "").split("tag=")[1]
    edge.receive(req("ACK", to_tag=tag), CALLER, 1.7)
    assert until_idle(edge, 100.0) == []
    assert len(edge) == 0
    assert len(edge.layer) == 0


def test_placed_invite_is_forwarded_as_a_stateful_proxy() -> None:
    """The downstream INVITE carries our Via, job/worker headers, RR and Max-Forwards-1."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    vias = fwd.headers.get_all("Via")
    assert vias[0].startswith("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKtl.")
    assert "received=10.0.0.1;rport=5070" in vias[1]
    assert fwd.headers.get("X-Trunkline-Job") == "job-1"
    assert fwd.headers.get("X-Trunkline-Worker") == "worker-1"
    assert fwd.headers.get("Max-Forwards") == "69"
    assert fwd.headers.get("Record-Route") == ROUTE
    assert fwd.uri == "sip:+15550100@10.0.0.5"
    assert fwd.body == b"v=0\r\n"


def test_caller_cannot_forge_trunkline_headers() -> None:
    """X-Trunkline-* headers from the caller are stripped before forwarding."""
    edge, backend = make_edge()
    edge.receive(invite(extra="X-Trunkline-Job: evil\r\n"), CALLER, 0.0)
    backend.place(backend.only_ref, 0.1)
    fwd = drain(edge)[-1].msg
    assert fwd.headers.get_all("X-Trunkline-Job") == ["job-1"]


def test_downstream_answer_is_relayed_and_dialog_requests_flow_both_ways() -> None:
    """180/200 go upstream (Via popped), ACK and BYE go downstream; BYE releases the slot."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(answer(fwd, 100, "Trying"), DOWNSTREAM, 0.2)
    edge.receive(answer(fwd, 180, "Ringing"), DOWNSTREAM, 0.3)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.4)
    up = drain(edge)
    assert [s.status for s in up] == [180, 200]
    assert all(s.peer == CALLER for s in up)
    assert len(up[1].msg.headers.get_all("Via")) == 1
    edge.receive(req("ACK", branch="z9hG4bKack", to_tag="gw1", route=ROUTE), CALLER, 0.5)
    edge.receive(req("BYE", branch="z9hG4bKbye", cseq=2, to_tag="gw1", route=ROUTE), CALLER, 9.0)
    down = drain(edge)
    assert [(s.method, s.peer) for s in down] == [("ACK", DOWNSTREAM), ("BYE", DOWNSTREAM)]
    assert down[1].msg.headers.get("Route") is None
    assert backend.released == [(backend.only_ref, "caller_bye")]
    bye_ok = answer(down[1].msg, 200, "OK")  # type: ignore[arg-type]
    edge.receive(bye_ok, DOWNSTREAM, 9.1)
    (relayed,) = drain(edge)
    assert relayed.status == 200
    assert relayed.peer == CALLER
    until_idle(edge, 200.0)
    assert len(edge) == 0


def test_bye_from_downstream_is_relayed_to_the_caller() -> None:
    """A BYE from the media gateway goes to the caller and releases the slot."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.4)
    drain(edge)
    bye = (
        "BYE sip:alice@10.0.0.1:5070 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.9:5080;branch=z9hG4bKgwbye\r\n"
        f"Route: {ROUTE}\r\nMax-Forwards: 70\r\n"
        "From: <sip:+15550100@10.0.0.5>;tag=gw1\r\nTo: <sip:alice@10.0.0.1>;tag=ft1\r\n"
        "Call-ID: call-1@10.0.0.1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    edge.receive(bye, DOWNSTREAM, 5.0)
    (sent,) = drain(edge)
    assert (sent.method, sent.peer) == ("BYE", CALLER)
    assert backend.released == [(backend.only_ref, "downstream_bye")]


def test_downstream_rejection_is_acked_relayed_and_releases_the_slot() -> None:
    """A 486 from downstream is ACKed hop by hop, relayed upstream, and the slot released."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(answer(fwd, 486, "Busy Here"), DOWNSTREAM, 0.3)
    sent = drain(edge)
    assert (sent[0].peer, sent[0].method) == (DOWNSTREAM, "ACK")
    assert sent[1].status == 486
    assert backend.released == [(backend.only_ref, "downstream_486")]
    edge.receive(answer(fwd, 486, "Busy Here"), DOWNSTREAM, 0.6)  # retransmission
    assert [s.peer for s in drain(edge)] == [DOWNSTREAM]  # ACK again, not relayed twice


def test_cancel_while_queued_gives_200_and_487_and_frees_the_request() -> None:
    """CANCEL before placement: 200 for CANCEL, 487 for INVITE, backend cancel."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    edge.receive(req("CANCEL"), CALLER, 0.5)
    sent = drain(edge)
    assert [(s.status, s.msg.headers.get("CSeq")) for s in sent] == [
        (200, "1 CANCEL"),
        (487, "1 INVITE"),
    ]
    assert backend.cancelled == [(backend.only_ref, "caller_cancelled")]
    assert edge.pending_calls() == 0
    backend.place(backend.only_ref, 0.6)
    assert backend.held == set()


def test_cancel_after_placement_is_relayed_after_a_provisional() -> None:
    """CANCEL of a placed call waits for a downstream 1xx, then goes downstream; 487 relayed."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(req("CANCEL"), CALLER, 0.2)
    assert [s.status for s in drain(edge)] == [200]
    edge.receive(answer(fwd, 180, "Ringing"), DOWNSTREAM, 0.3)
    sent = drain(edge)
    assert [(type(s.msg).__name__, s.peer) for s in sent] == [
        ("SipRequest", DOWNSTREAM),
        ("SipResponse", CALLER),
    ]
    assert sent[0].method == "CANCEL"
    assert sent[0].msg.headers.get("Via") == fwd.headers.get("Via")
    edge.receive(answer(fwd, 487, "Request Terminated"), DOWNSTREAM, 0.4)
    assert [s.status for s in drain(edge) if isinstance(s.msg, SipResponse)] == [487]
    assert backend.released == [(backend.only_ref, "caller_cancelled")]


def test_unknown_cancel_gets_481() -> None:
    """A CANCEL matching no INVITE is answered 481."""
    edge, _ = make_edge()
    edge.receive(req("CANCEL"), CALLER, 0.0)
    assert [s.status for s in drain(edge)] == [481]


def test_options_reports_capacity() -> None:
    """OPTIONS is 200 while the pool has capacity and 503 with Retry-After when it has none."""
    edge, backend = make_edge()
    edge.receive(req("OPTIONS", branch="z9hG4bKo1"), CALLER, 0.0)
    backend.capacity["support"] = False
    edge.receive(req("OPTIONS", branch="z9hG4bKo2"), CALLER, 0.1)
    sent = drain(edge)
    assert [s.status for s in sent] == [200, 503]
    assert sent[1].msg.headers.get("Retry-After") == "5"


def test_downstream_silence_gives_408_and_releases() -> None:
    """A downstream that never answers: Timer B, 408 upstream, slot released."""
    edge, backend = make_edge()
    placed_call(edge, backend)
    sent = until_idle(edge, 40.0)
    assert 408 in [s.status for s in sent if isinstance(s.msg, SipResponse)]
    assert backend.released == [(backend.only_ref, "downstream_timeout")]


def test_job_ended_before_answer_ends_the_call_without_release() -> None:
    """on_job_ended before 2xx: 480 upstream, nothing released twice."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(answer(fwd, 180, "Ringing"), DOWNSTREAM, 0.2)
    drain(edge)
    edge.on_job_ended("job-1", 0.3)
    sent = drain(edge)
    assert sorted(type(s.msg).__name__ for s in sent) == ["SipRequest", "SipResponse"]
    assert [s.status for s in sent if isinstance(s.msg, SipResponse)] == [480]
    until_idle(edge, 200.0)
    assert backend.released == []
    assert edge.pending_calls() == 0


def test_job_ended_after_answer_means_bye_releases_nothing() -> None:
    """Once the backend said the job ended, a later BYE is relayed but not released again."""
    edge, backend = make_edge()
    fwd = placed_call(edge, backend)
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.2)
    edge.on_job_ended("job-1", 3.0)
    edge.receive(req("BYE", branch="z9hG4bKb", cseq=2, to_tag="gw1"), CALLER, 3.1)
    assert [s.method for s in drain(edge) if isinstance(s.msg, SipRequest)] == ["BYE"]
    assert backend.released == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (invite(max_forwards=0), 483),
        (invite(user="+4420"), 404),
        (req("BYE", to_tag="nope"), 481),
        (req("REGISTER"), 405),
    ],
)
def test_requests_the_edge_cannot_take(data: bytes, status: int) -> None:
    """Loops, unknown numbers, unknown dialogs and other methods get their final code."""
    edge, backend = make_edge()
    edge.receive(data, CALLER, 0.0)
    assert [s.status for s in drain(edge)][-1] == status
    assert backend.requests == {}


def test_malformed_requests_get_400_and_garbage_is_dropped() -> None:
    """Readable-but-bad requests get 400; unreadable bytes are dropped and counted."""
    edge, backend = make_edge()
    no_callid = b"\r\n".join(ln for ln in invite().split(b"\r\n") if not ln.startswith(b"Call"))
    edge.receive(invite().replace(b"Max-Forwards: 70", b"Max-Forwards: lots"), CALLER, 0.0)
    edge.receive(invite()[:-2], CALLER, 0.0)
    edge.receive(no_callid, CALLER, 0.0)  # a 400 without Call-ID could not be matched
    edge.receive(b"\x16\x03\x01garbage", CALLER, 0.0)
    edge.receive(b"X" * 70000, CALLER, 0.0)
    edge.receive(b"\r\n\r\n", CALLER, 0.0)  # keep-alive: ignored, not counted
    sent = drain(edge)
    assert [s.status for s in sent] == [400, 400]
    assert "Max-Forwards" in sent[0].msg.reason  # type: ignore[union-attr]
    assert "truncated" in sent[1].msg.reason  # type: ignore[union-attr]
    assert edge.stats.dropped == 3
    assert edge.stats.internal_errors == 0
    assert backend.requests == {}


def test_backend_errors_refuse_the_call_instead_of_raising() -> None:
    """A backend that raises yields the trunk's refusal, never an exception."""
    edge, backend = make_edge()
    backend.fail = True
    edge.receive(invite(), CALLER, 0.0)
    edge.receive(req("OPTIONS", branch="z9hG4bKo"), CALLER, 0.0)
    assert [s.status for s in drain(edge)] == [100, 503, 503]
    assert edge.pending_calls() == 0


def test_synchronous_placement_inside_request_is_safe() -> None:
    """A backend that places from within request() gets 100 then the forwarded INVITE."""
    edge, backend = make_edge()
    backend.auto_place_at = 0.0
    edge.receive(invite(), CALLER, 0.0)
    sent = drain(edge)
    assert sent[0].status == 100
    assert (sent[1].method, sent[1].peer) == ("INVITE", DOWNSTREAM)


def test_merged_request_on_another_branch_gets_482() -> None:
    """Same Call-ID/CSeq on a new branch is a merged request (8.2.2.2), not a new call."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    edge.receive(invite(branch="z9hG4bKother"), CALLER, 0.1)
    assert [s.status for s in drain(edge)] == [100, 482]
    assert len(backend.requests) == 1
