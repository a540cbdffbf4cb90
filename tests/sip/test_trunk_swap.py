"""Replacing the edge's trunk table live (a config reload), sans-IO with a fake
clock: new calls go by the new table at once, calls in progress keep the trunk
they were admitted on to their end."""

from __future__ import annotations

from typing import Any

from sip.sipkit import CALLER, DOWNSTREAM, answer, drain, invite, make_edge
from sip.sipkit import request_like as req
from sip.test_trust import answered_call

from trunkline.sip.config import Trunk, diff_trunks, parse_sip_config
from trunkline.sip.message import SipRequest
from trunkline.sip.transaction import Peer

OTHER_DOWNSTREAM = Peer("udp", "10.0.0.8", 5090)


def trunks(**tables: dict[str, Any]) -> tuple[Trunk, ...]:
    """Trunks parsed from ``[sip.trunks.NAME]`` tables (each with a downstream)."""
    full = {
        name: {"pool": name, "downstream": "10.0.0.9:5080", **table}
        for name, table in tables.items()
    }
    return parse_sip_config({"host": "10.0.0.5", "trunks": full}).trunks


def test_removed_trunk_call_in_progress_ends_normally_new_call_is_refused_404() -> None:
    """A call answered on 'support' (its caller listed only there) survives a swap that
    removes the trunk: the caller's BYE is relayed downstream (not 403) and releases
    the slot; a new INVITE to the same number then gets 404 like an unknown number."""
    edge, backend = make_edge(allowed_addresses=["10.0.0.1"])
    answered_call(edge, backend)
    changes = edge.replace_trunks(
        trunks(sales={"numbers": ["+1666*"], "allowed_addresses": ["10.0.0.7"]})
    )
    assert (changes.added, changes.removed) == (("sales",), ("support",))
    edge.receive(req("BYE", branch="z9hG4bKb", cseq=2, to_tag="gw1"), CALLER, 2.0)
    (bye,) = drain(edge)
    assert (bye.method, bye.peer) == ("BYE", DOWNSTREAM)
    assert backend.released == [(backend.only_ref, "caller_bye")]
    # The downstream's 200 for the BYE goes back to the caller.
    assert isinstance(bye.msg, SipRequest)
    edge.receive(answer(bye.msg, 200, "OK"), DOWNSTREAM, 2.1)
    assert [(s.status, s.peer) for s in drain(edge)] == [(200, CALLER)]
    # Once the call is gone, the caller is a stranger to the new table.
    edge.on_timer(100.0)
    drain(edge)
    assert len(edge) == 0
    edge.receive(invite(branch="z9hG4bKnew", call_id="call-2@10.0.0.1"), CALLER, 101.0)
    assert [s.status for s in drain(edge)] == [403]
    # From an address the new table admits, the old number is unknown: 404.
    sales_caller = Peer("udp", "10.0.0.7", 5070)
    edge.receive(
        invite(branch="z9hG4bKn3", call_id="call-3@10.0.0.7", host="10.0.0.7"), sales_caller, 102.0
    )
    (refused,) = drain(edge)
    assert refused.status == 404
    assert "no trunk lists" in (refused.msg.headers.get("Reason") or "")
    assert len(backend.requests) == 1


def test_added_trunk_takes_calls_and_a_changed_one_routes_new_calls_only() -> None:
    """After a swap that changes 'support''s downstream and pool and adds 'sales': the
    call already placed keeps the old downstream for its BYE; a new call to 'support'
    asks the new pool and goes to the new downstream; a call to 'sales' is placed."""
    edge, backend = make_edge()
    answered_call(edge, backend)
    changes = edge.replace_trunks(
        trunks(
            support={"numbers": ["+1555*"], "pool": "vip", "downstream": "10.0.0.8:5090"},
            sales={"numbers": ["+1666*"]},
        )
    )
    assert changes.added == ("sales",)
    assert changes.changed == (("support", ("pool", "downstream")),)
    edge.receive(req("BYE", branch="z9hG4bKb", cseq=2, to_tag="gw1"), CALLER, 2.0)
    assert [(s.method, s.peer) for s in drain(edge)] == [("BYE", DOWNSTREAM)]
    edge.receive(invite(branch="z9hG4bK2", call_id="call-2@10.0.0.1"), CALLER, 3.0)
    assert [s.status for s in drain(edge)] == [100]
    (ref2,) = [r for r in backend.requests if r in backend.open]
    assert backend.requests[ref2][0] == "vip"
    backend.place(ref2, 3.1)
    (fwd,) = drain(edge)
    assert (fwd.method, fwd.peer) == ("INVITE", OTHER_DOWNSTREAM)
    edge.receive(invite(branch="z9hG4bK3", call_id="call-3@10.0.0.1", user="+16660100"), CALLER, 4)
    assert [s.status for s in drain(edge)] == [100]
    pools = sorted(pool for pool, _, _ in backend.requests.values())
    assert pools == ["sales", "support", "vip"]


def test_downstream_bye_reaches_the_caller_when_no_trunk_lists_the_downstream() -> None:
    """A live call's downstream may send in-dialog requests even though no trunk's
    allowed_addresses lists it; once no call has it as a hop, it gets the quick 403."""
    edge, backend = make_edge(allowed_addresses=["10.0.0.1"])
    fwd, _ = answered_call(edge, backend)
    bye = (
        "BYE sip:alice@10.0.0.1:5070 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.9:5080;branch=z9hG4bKdown\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {fwd.headers.get('To')};tag=gw1\r\n"
        f"To: {fwd.headers.get('From')}\r\n"
        f"Call-ID: {fwd.headers.get('Call-ID')}\r\n"
        "CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    edge.receive(bye, DOWNSTREAM, 2.0)
    assert [(s.method, s.peer) for s in drain(edge)] == [("BYE", CALLER)]
    assert backend.released == [(backend.only_ref, "downstream_bye")]
    edge.on_timer(100.0)
    drain(edge)
    edge.receive(bye.replace(b"z9hG4bKdown", b"z9hG4bKlater"), DOWNSTREAM, 101.0)
    assert [s.status for s in drain(edge)] == [403]


def test_diff_names_keys_only_never_a_secret() -> None:
    """diff_trunks names each changed key (downstream host/port as `downstream`) and the
    description never carries a value, so a new password is not echoed."""
    old = trunks(a={"numbers": ["1"], "auth_username": "u", "auth_password": "old-secret"})
    new = trunks(a={"numbers": ["1"], "auth_username": "u", "auth_password": "new-secret"})
    changes = diff_trunks(old, new)
    assert changes.changed == (("a", ("auth_password",)),)
    assert "secret" not in changes.describe()
    assert changes.describe() == (
        "sip.trunks: 0 added [], 0 removed [], 1 changed [a (auth_password)]"
    )
    assert not diff_trunks(new, new)
