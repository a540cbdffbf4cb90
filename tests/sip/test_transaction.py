"""RFC 3261 transaction tests on a fake clock (time is a parameter; nothing sleeps)."""

from __future__ import annotations

import itertools

import pytest
from sip.sipkit import CALLER, DOWNSTREAM, answer, invite, request_like

from trunkline.sip.message import SipRequest, SipResponse, parse_message
from trunkline.sip.transaction import (
    TABLES,
    Delivery,
    IllegalTransition,
    Peer,
    ServerTx,
    TransactionLayer,
    TxEvent,
    TxState,
    make_response,
    server_key,
)

T1 = 0.5


def req(data: bytes) -> SipRequest:
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    return msg


def new_invite(layer: TransactionLayer, peer: Peer = CALLER) -> ServerTx:
    r = req(invite())
    delivery, tx = layer.receive_request(r, server_key(r), peer, 0.0)
    assert delivery is Delivery.NEW
    assert tx is not None
    return tx


def run(layer: TransactionLayer, until: float) -> list[float]:
    """Fire every timer up to ``until``; return the times something was sent."""
    sent: list[float] = []
    layer.outbox.clear()
    while (d := layer.next_deadline()) is not None and d <= until:
        layer.on_timer(d)
        sent += [d] * len(layer.outbox)
        layer.outbox.clear()
    return sent


def test_tables_use_declared_states_and_terminated_is_final() -> None:
    """Every table maps known states; nothing leaves TERMINATED."""
    for table in TABLES.values():
        for (state, event), nxt in table.items():
            assert isinstance(state, TxState)
            assert isinstance(nxt, TxState)
            assert isinstance(event, TxEvent)
            assert state is not TxState.TERMINATED


def test_ack_and_cancel_keys_match_the_invite() -> None:
    """ACK keys to the INVITE transaction; CANCEL keys to its own but differs only by method."""
    inv = server_key(req(invite()))
    ack = server_key(req(request_like("ACK", to_tag="x")))
    cancel = server_key(req(request_like("CANCEL")))
    assert ack == inv
    assert cancel._replace(method="INVITE") == inv
    assert cancel != inv


def test_rfc2543_requests_key_by_dialog_fields() -> None:
    """Without a z9hG4bK branch the key comes from Call-ID, From tag and CSeq number."""
    a = server_key(req(invite(branch="old1")))
    b = server_key(req(invite(branch="old1", cseq=2)))
    assert a.branch.startswith("2543;")
    assert a != b


def test_retransmitted_invite_gets_last_response_and_is_absorbed() -> None:
    """An INVITE retransmission is absorbed and answered with the last provisional."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 100, "Trying"), 0.0)
    layer.outbox.clear()
    r = req(invite())
    delivery, same = layer.receive_request(r, server_key(r), CALLER, 0.2)
    assert (delivery, same) == (Delivery.ABSORBED, tx)
    assert [parse_message(o.data).status for o in layer.outbox] == [100]  # type: ignore[union-attr]


def test_final_is_retransmitted_with_timer_g_doubling_to_t2_until_timer_h() -> None:
    """Timer G fires at T1, 2T1, 4T1, ... capped at T2; Timer H ends it at 64*T1."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 503, "Service Unavailable", to_tag="t"), 0.0)
    sent = run(layer, 100.0)
    gaps = [b - a for a, b in zip([0.0, *sent], sent, strict=False)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert set(gaps[4:]) == {4.0}
    assert sent[-1] < 64 * T1
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0


def test_timer_h_is_reported_as_timeout() -> None:
    """A final never ACKed is reported to the TU as a Timer H timeout."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 486, "Busy Here", to_tag="t"), 0.0)
    layer.on_timer(31.9)
    out = layer.on_timer(32.0)
    assert [(t.tx, t.timer) for t in out] == [(tx, TxEvent.TIMER_H)]


def test_ack_stops_retransmission_and_timer_i_absorbs_acks() -> None:
    """ACK moves to Confirmed: no more retransmits; further ACKs absorbed until Timer I."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 503, "Service Unavailable", to_tag="t"), 0.0)
    ack = req(request_like("ACK", to_tag="t"))
    assert layer.receive_request(ack, server_key(ack), CALLER, 0.7)[0] is Delivery.ABSORBED
    assert tx.state is TxState.CONFIRMED
    assert run(layer, 4.0) == []
    assert layer.receive_request(ack, server_key(ack), CALLER, 4.0)[0] is Delivery.ABSORBED
    run(layer, 5.7)
    assert tx.state is TxState.TERMINATED


def test_reliable_transport_has_no_timer_g_and_immediate_timer_i() -> None:
    """Over TCP finals are sent once and Confirmed ends at once."""
    layer = TransactionLayer()
    tcp = Peer("tcp", "10.0.0.1", 5070)
    tx = new_invite(layer, tcp)
    layer.respond(tx, make_response(tx.request, 503, "Service Unavailable", to_tag="t"), 0.0)
    assert run(layer, 10.0) == []
    ack = req(request_like("ACK", to_tag="t"))
    layer.receive_request(ack, server_key(ack), tcp, 10.0)
    run(layer, 10.0)
    assert tx.state is TxState.TERMINATED


def test_2xx_enters_accepted_which_absorbs_invites_until_timer_l() -> None:
    """RFC 6026: after 2xx, INVITE retransmits are absorbed silently; Timer L ends it."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 200, "OK", to_tag="t"), 0.0)
    layer.outbox.clear()
    r = req(invite())
    assert layer.receive_request(r, server_key(r), CALLER, 1.0)[0] is Delivery.ABSORBED
    assert layer.outbox == []
    layer.respond(tx, make_response(tx.request, 200, "OK", to_tag="t"), 2.0)  # relayed retransmit
    run(layer, 64 * T1)
    assert tx.state is TxState.TERMINATED


def test_tu_sending_after_final_raises() -> None:
    """A second final through a Completed INVITE transaction is an illegal transition."""
    layer = TransactionLayer()
    tx = new_invite(layer)
    layer.respond(tx, make_response(tx.request, 486, "Busy Here", to_tag="t"), 0.0)
    with pytest.raises(IllegalTransition):
        layer.respond(tx, make_response(tx.request, 200, "OK", to_tag="t"), 0.1)


def test_non_invite_server_resends_final_and_ends_with_timer_j() -> None:
    """A retransmitted OPTIONS gets the same final; Timer J (64*T1) ends the transaction."""
    layer = TransactionLayer()
    r = req(request_like("OPTIONS"))
    _, tx = layer.receive_request(r, server_key(r), CALLER, 0.0)
    assert tx is not None
    layer.respond(tx, make_response(r, 200, "OK", to_tag="t"), 0.0)
    first = layer.outbox.pop().data
    assert layer.receive_request(r, server_key(r), CALLER, 1.0)[0] is Delivery.ABSORBED
    assert layer.outbox.pop().data == first
    run(layer, 64 * T1)
    assert len(layer) == 0


def client_invite() -> SipRequest:
    r = req(invite(branch="z9hG4bKtl.test.1"))
    return r


def test_invite_client_retransmits_with_timer_a_and_times_out_with_b() -> None:
    """Unanswered INVITE: resent at T1, 2T1, 4T1...; Timer B reports a timeout at 64*T1."""
    layer = TransactionLayer()
    layer.send_request(client_invite(), DOWNSTREAM, 0.0)
    layer.outbox.clear()
    sent = run(layer, 31.0)
    assert sent == [0.5, 1.5, 3.5, 7.5, 15.5]
    out = layer.on_timer(32.0)
    assert [t.timer for t in out] == [TxEvent.TIMER_B]


def test_invite_client_acks_non_2xx_and_reacks_retransmissions() -> None:
    """A 486 is ACKed once, delivered once; its retransmission is ACKed again, not delivered."""
    layer = TransactionLayer()
    inv = client_invite()
    tx = layer.send_request(inv, DOWNSTREAM, 0.0)
    layer.outbox.clear()
    busy = parse_message(answer(inv, 486, "Busy Here"))
    assert isinstance(busy, SipResponse)
    assert layer.receive_response(busy, 0.1) == (Delivery.NEW, tx)
    ack = parse_message(layer.outbox.pop().data)
    assert isinstance(ack, SipRequest)
    assert ack.method == "ACK"
    assert ack.headers.get("To") == busy.headers.get("To")
    assert layer.receive_response(busy, 0.2)[0] is Delivery.ABSORBED
    assert parse_message(layer.outbox.pop().data) == ack
    run(layer, 40.0)
    assert len(layer) == 0


def test_provisional_stops_invite_retransmission() -> None:
    """After a 1xx the INVITE is no longer retransmitted and Timer B no longer applies."""
    layer = TransactionLayer()
    inv = client_invite()
    layer.send_request(inv, DOWNSTREAM, 0.0)
    ringing = parse_message(answer(inv, 180, "Ringing"))
    assert isinstance(ringing, SipResponse)
    layer.receive_response(ringing, 0.1)
    assert run(layer, 100.0) == []


def test_non_invite_client_keeps_timer_f_in_proceeding() -> None:
    """A CANCEL answered 100 keeps retransmitting at T2 and still times out with F."""
    layer = TransactionLayer()
    cancel = req(request_like("CANCEL", branch="z9hG4bKtl.test.2"))
    layer.send_request(cancel, DOWNSTREAM, 0.0)
    trying = parse_message(answer(cancel, 100, "Trying"))
    assert isinstance(trying, SipResponse)
    layer.receive_response(trying, 0.1)
    layer.outbox.clear()
    sent = run(layer, 31.9)
    assert all(b - a == pytest.approx(4.0) for a, b in itertools.pairwise(sent[1:]))
    assert [t.timer for t in layer.on_timer(32.0)] == [TxEvent.TIMER_F]


def test_response_fitting_no_transition_is_absorbed_not_raised() -> None:
    """A 2xx after a non-2xx final is peer misbehaviour: absorbed and counted."""
    layer = TransactionLayer()
    inv = client_invite()
    layer.send_request(inv, DOWNSTREAM, 0.0)
    busy = parse_message(answer(inv, 486, "Busy Here"))
    ok = parse_message(answer(inv, 200, "OK"))
    assert isinstance(busy, SipResponse)
    assert isinstance(ok, SipResponse)
    layer.receive_response(busy, 0.1)
    assert layer.receive_response(ok, 0.2)[0] is Delivery.ABSORBED
    assert layer.absorbed == 1
