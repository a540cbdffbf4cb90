"""The edge's trust boundary, sans-IO with a fake clock: ACLs, digest, proxy rules, bounds."""

from __future__ import annotations

from sip.sipkit import (
    CALLER,
    DOWNSTREAM,
    FakeBackend,
    Sent,
    answer,
    digest_header,
    drain,
    invite,
    make_edge,
)
from sip.sipkit import request_like as req

from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipRequest, SipResponse
from trunkline.sip.transaction import Peer

STRANGER = Peer("udp", "10.6.6.6", 5060)
AUTH = {"auth_username": "carrier", "auth_password": "pw-of-the-carrier"}
ROUTE = "<sip:10.0.0.5:5060;lr>"


def until_idle(edge: SipEdge, until: float) -> list[Sent]:
    """Fire the edge's timers up to ``until``; everything sent meanwhile."""
    sent: list[Sent] = []
    while (d := edge.next_deadline()) is not None and d <= until:
        edge.on_timer(d)
        sent += drain(edge)
    return sent


def answered_call(
    edge: SipEdge, backend: FakeBackend, extra_200: str = ""
) -> tuple[SipRequest, SipResponse]:
    """One call placed at 0.1 and answered 200 at 0.4; the forwarded INVITE and the 200."""
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.place(backend.only_ref, 0.1)
    (fwd,) = drain(edge)
    assert isinstance(fwd.msg, SipRequest)
    ok = answer(fwd.msg, 200, "OK").replace(
        b"Content-Length: 0", extra_200.encode() + b"Content-Length: 0"
    )
    edge.receive(ok, DOWNSTREAM, 0.4)
    (up,) = drain(edge)
    assert isinstance(up.msg, SipResponse)
    return fwd.msg, up.msg


# -- allowed_addresses -------------------------------------------------------


def test_unlisted_source_gets_one_403_and_never_reaches_the_backend() -> None:
    """An INVITE from outside allowed_addresses: one 403, no 100, no transaction, no
    retransmission, no job; its retransmission gets one more 403 (never more)."""
    edge, backend = make_edge(allowed_addresses=["10.0.0.0/24"])
    edge.receive(invite(host="10.6.6.6", port=5060), STRANGER, 0.0)
    (sent,) = drain(edge)
    assert (sent.status, sent.peer) == (403, STRANGER)
    assert "not allowed" in (sent.msg.headers.get("Reason") or "")
    assert len(edge.layer) == 0
    assert until_idle(edge, 100.0) == []
    edge.receive(invite(host="10.6.6.6", port=5060), STRANGER, 1.0)
    assert [s.status for s in drain(edge)] == [403]
    assert backend.requests == {}
    assert edge.stats.forbidden == 2
    edge.receive(invite(), CALLER, 2.0)  # 10.0.0.1 is in 10.0.0.0/24
    assert [s.status for s in drain(edge)] == [100]
    assert len(backend.requests) == 1


def test_a_stranger_learns_nothing_about_which_numbers_exist() -> None:
    """An unlisted source gets 403 for a known and an unknown number alike (never 404)."""
    edge, _ = make_edge(allowed_addresses=["10.0.0.1"])
    edge.receive(invite(user="+4420", host="10.6.6.6"), STRANGER, 0.0)
    edge.receive(invite(user="+15550100", host="10.6.6.6", call_id="c2"), STRANGER, 0.0)
    assert [s.status for s in drain(edge)] == [403, 403]
    edge.receive(invite(user="+4420"), CALLER, 0.0)
    assert [s.status for s in drain(edge)] == [404]


def test_options_and_other_methods_are_answered_without_a_transaction() -> None:
    """OPTIONS, REGISTER and out-of-dialog BYE are answered once, statelessly."""
    edge, _ = make_edge(allowed_addresses=["10.0.0.1"])
    edge.receive(req("OPTIONS", branch="z9hG4bKo1"), STRANGER, 0.0)
    edge.receive(req("OPTIONS", branch="z9hG4bKo2"), CALLER, 0.0)
    edge.receive(req("REGISTER", branch="z9hG4bKr"), CALLER, 0.0)
    edge.receive(req("BYE", branch="z9hG4bKb"), CALLER, 0.0)
    assert [s.status for s in drain(edge)] == [403, 200, 405, 481]
    assert len(edge.layer) == 0


# -- digest authentication -----------------------------------------------------


def challenge_of(edge: SipEdge, call_id: str = "call-1@10.0.0.1") -> list[str]:
    """Send an INVITE without credentials; the Proxy-Authenticate values of the 407."""
    edge.receive(invite(call_id=call_id), CALLER, 0.0)
    (sent,) = drain(edge)
    assert sent.status == 407
    assert sent.msg.reason == "Proxy Authentication Required"
    return sent.msg.headers.get_all("Proxy-Authenticate")


def authed_invite(challenge: str, **kw: object) -> bytes:
    header = digest_header(challenge, **kw)  # type: ignore[arg-type]
    return invite(cseq=2, branch="z9hG4bKinv2", extra=f"Proxy-Authorization: {header}\r\n")


def test_digest_challenge_then_authenticated_invite_is_placed() -> None:
    """No credentials: 407 with SHA-256 then MD5 challenges and no job. With them (either
    algorithm): 100, one job, and the credentials are not forwarded downstream."""
    edge, backend = make_edge(**AUTH)
    sha, md5 = challenge_of(edge)
    assert "algorithm=SHA-256" in sha
    assert "algorithm=MD5" in md5
    assert backend.requests == {}
    edge.receive(req("ACK", to_tag="x"), CALLER, 0.05)  # the ACK of the 407: absorbed
    assert drain(edge) == []
    edge.receive(authed_invite(md5), CALLER, 0.1)
    assert [s.status for s in drain(edge)] == [100]
    backend.place(backend.only_ref, 0.2)
    (fwd,) = drain(edge)
    assert fwd.msg.headers.get("Proxy-Authorization") is None
    assert edge.stats.authenticated == 1
    assert edge.stats.challenged == 1


def test_a_replayed_authenticated_invite_is_challenged_not_placed() -> None:
    """The same credentials on a new INVITE (a capture replayed): 407 stale=true, no job."""
    edge, backend = make_edge(**AUTH)
    sha, _ = challenge_of(edge)
    header = digest_header(sha)
    edge.receive(invite(cseq=2, extra=f"Proxy-Authorization: {header}\r\n"), CALLER, 0.1)
    drain(edge)
    replay = invite(call_id="other", branch="z9hG4bKx", extra=f"Proxy-Authorization: {header}\r\n")
    edge.receive(replay, STRANGER, 0.2)
    (sent,) = drain(edge)
    assert sent.status == 407
    assert "stale=true" in (sent.msg.headers.get("Proxy-Authenticate") or "")
    assert len(backend.requests) == 1


def test_wrong_password_gets_403_and_an_expired_nonce_a_stale_challenge() -> None:
    """Bad credentials are refused 403; a nonce older than auth_nonce_ttl_s is re-challenged."""
    edge, backend = make_edge({"auth_nonce_ttl_s": 5}, **AUTH)
    sha, _ = challenge_of(edge)
    edge.receive(authed_invite(sha, password="guess"), CALLER, 0.1)
    assert [s.status for s in drain(edge)] == [403]
    edge.receive(authed_invite(sha), CALLER, 6.0)
    (sent,) = drain(edge)
    assert sent.status == 407
    assert "stale=true" in (sent.msg.headers.get("Proxy-Authenticate") or "")
    assert backend.requests == {}


def test_acl_and_digest_both_apply_when_both_are_set() -> None:
    """With both set, right credentials from an unlisted address still get 403."""
    edge, backend = make_edge(allowed_addresses=["10.0.0.1"], **AUTH)
    sha, _ = challenge_of(edge)
    edge.receive(authed_invite(sha).replace(b"10.0.0.1:5070", b"10.6.6.6:5060"), STRANGER, 0.1)
    assert [s.status for s in drain(edge)] == [403]
    assert backend.requests == {}


# -- identity headers ------------------------------------------------------------


def forwarded_headers(trusted: bool) -> SipRequest:
    edge, backend = make_edge(trusted=trusted)
    pai = (
        "P-Asserted-Identity: <sip:+18005550000@carrier>\r\n"
        "Remote-Party-ID: <sip:+18005550000@carrier>;party=calling\r\n"
        "P-Preferred-Identity: <sip:boss@corp>\r\n"
    )
    edge.receive(invite(extra=pai), CALLER, 0.0)
    backend.place(backend.only_ref, 0.1)
    fwd = drain(edge)[-1].msg
    assert isinstance(fwd, SipRequest)
    return fwd


def test_identity_headers_are_stripped_unless_the_trunk_is_trusted() -> None:
    """P-Asserted-Identity, Remote-Party-ID and P-Preferred-Identity go only from trusted trunks."""
    untrusted = forwarded_headers(trusted=False)
    for name in ("P-Asserted-Identity", "Remote-Party-ID", "P-Preferred-Identity"):
        assert untrusted.headers.get(name) is None, name
    trusted = forwarded_headers(trusted=True)
    assert trusted.headers.get("P-Asserted-Identity") == "<sip:+18005550000@carrier>"
    assert trusted.headers.get("Remote-Party-ID") is not None


def test_identity_headers_in_dialog_are_stripped_too() -> None:
    """A re-INVITE from the caller of an untrusted trunk loses its P-Asserted-Identity."""
    edge, backend = make_edge()
    answered_call(edge, backend)
    reinvite = req("INVITE", branch="z9hG4bKre", cseq=2, to_tag="gw1").replace(
        b"Content-Length", b"P-Asserted-Identity: <sip:x@y>\r\nContent-Length"
    )
    edge.receive(reinvite, CALLER, 1.0)
    (fwd,) = drain(edge)
    assert fwd.peer == DOWNSTREAM
    assert fwd.msg.headers.get("P-Asserted-Identity") is None


# -- stateful proxy rules ------------------------------------------------------


def forged_response(branch: str, victim: str = "10.66.6.6:9999", transport: str = "UDP") -> bytes:
    return (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch={branch}\r\n"
        f"Via: SIP/2.0/{transport} {victim};branch=z9hG4bKvictim\r\n"
        "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: spam\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_a_forged_response_naming_a_victim_is_never_relayed() -> None:
    """A response with our branch prefix and a victim in the second Via goes nowhere
    (UDP or TCP victim); neither does one carrying a live call's branch from another
    address. The real downstream's answer still gets through."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.place(backend.only_ref, 0.1)
    fwd = drain(edge)[0].msg
    assert isinstance(fwd, SipRequest)
    live = (fwd.headers.get("Via") or "").split("branch=")[1]
    edge.receive(forged_response("z9hG4bKtl.x.1"), STRANGER, 0.2)
    edge.receive(forged_response("z9hG4bKtl.s.abc", transport="TCP"), STRANGER, 0.2)
    edge.receive(answer(fwd, 200, "OK"), STRANGER, 0.3)  # live branch, wrong source
    assert drain(edge) == []
    assert edge.stats.stray == 3
    edge.receive(answer(fwd, 200, "OK"), DOWNSTREAM, 0.4)
    (ok,) = drain(edge)
    assert (ok.status, ok.peer) == (200, CALLER)
    assert live in (fwd.headers.get("Via") or "")


def test_bye_from_a_third_address_does_not_end_the_call() -> None:
    """A BYE with the right Call-ID and tags from neither hop: 403, nothing relayed, the
    slot kept. The caller's own BYE then ends it."""
    edge, backend = make_edge()
    answered_call(edge, backend)
    bye = req("BYE", branch="z9hG4bKevil", cseq=2, to_tag="gw1", route=ROUTE)
    edge.receive(bye, STRANGER, 1.0)
    (sent,) = drain(edge)
    assert (sent.status, sent.peer) == (403, STRANGER)
    assert backend.released == []
    assert edge.pending_calls() == 1
    assert edge.stats.foreign_hop == 1
    edge.receive(req("ACK", to_tag="gw1", branch="z9hG4bKevack"), STRANGER, 1.0)
    assert drain(edge) == []
    edge.receive(req("BYE", branch="z9hG4bKb", cseq=2, to_tag="gw1"), CALLER, 2.0)
    assert [(s.method, s.peer) for s in drain(edge)] == [("BYE", DOWNSTREAM)]
    assert backend.released == [(backend.only_ref, "caller_bye")]


def test_in_dialog_responses_go_to_the_recorded_hop_not_the_via() -> None:
    """The 200 for a relayed BYE goes to the hop that sent the BYE, whatever Via says."""
    edge, backend = make_edge()
    answered_call(edge, backend)
    edge.receive(req("BYE", branch="z9hG4bKb", cseq=2, to_tag="gw1"), CALLER, 1.0)
    (bye,) = drain(edge)
    assert isinstance(bye.msg, SipRequest)
    vias = bye.msg.headers.get_all("Via")
    bye.msg.headers.items = [(n, v) for n, v in bye.msg.headers.items if n != "Via"]
    bye.msg.headers.add("Via", vias[0])
    bye.msg.headers.add("Via", "SIP/2.0/UDP 10.66.6.6:9999;branch=z9hG4bKv")
    edge.receive(answer(bye.msg, 200, "OK"), DOWNSTREAM, 1.1)
    (ok,) = drain(edge)
    assert (ok.status, ok.peer) == (200, CALLER)
    edge.receive(answer(bye.msg, 200, "OK"), STRANGER, 1.2)  # same branch, wrong source
    assert drain(edge) == []


def test_cancel_from_another_address_is_not_matched() -> None:
    """A CANCEL for a queued call from a third address gets 481 and cancels nothing."""
    edge, backend = make_edge()
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    edge.receive(req("CANCEL"), STRANGER, 0.1)
    assert [s.status for s in drain(edge)] == [481]
    assert backend.cancelled == []
    edge.receive(req("CANCEL"), CALLER, 0.2)
    assert [s.status for s in drain(edge)] == [200, 487]


# -- session expiry ------------------------------------------------------------


def test_session_expires_without_refresh_ends_the_call_with_bye_both_ways() -> None:
    """RFC 4028: a 2xx with Session-Expires 120 and no refresh: at 120 s a BYE goes to
    the downstream (as from the caller) and to the caller (as from the callee), and the
    slot is released once."""
    edge, backend = make_edge()
    answered_call(edge, backend, "Session-Expires: 120;refresher=uac\r\n")
    assert until_idle(edge, 120.3) == []
    sent = until_idle(edge, 120.5)
    byes = {s.peer: s.msg for s in sent}
    down, up = byes[DOWNSTREAM], byes[CALLER]
    assert isinstance(down, SipRequest)
    assert isinstance(up, SipRequest)
    assert (down.method, up.method) == ("BYE", "BYE")
    assert down.uri == "sip:gw@10.0.0.9:5080"  # the downstream's Contact
    assert "tag=ft1" in (down.headers.get("From") or "")
    assert "tag=gw1" in (down.headers.get("To") or "")
    assert down.headers.get("CSeq") == "2 BYE"
    assert up.uri == "sip:alice@10.0.0.1:5070"  # the caller's Contact
    assert "tag=gw1" in (up.headers.get("From") or "")
    assert "tag=ft1" in (up.headers.get("To") or "")
    assert backend.released == [(backend.only_ref, "session_expired")]
    assert edge.stats.expired == 1
    until_idle(edge, 400.0)
    assert len(edge) == 0
    assert edge.pending_calls() == 0


def test_a_session_refresh_pushes_the_expiry_back() -> None:
    """A re-INVITE whose 2xx carries Session-Expires restarts the session timer."""
    edge, backend = make_edge()
    answered_call(edge, backend, "Session-Expires: 120\r\n")
    until_idle(edge, 60.0)
    edge.receive(req("INVITE", branch="z9hG4bKre", cseq=2, to_tag="gw1"), CALLER, 60.0)
    (reinvite,) = drain(edge)
    assert isinstance(reinvite.msg, SipRequest)
    refreshed = answer(reinvite.msg, 200, "OK").replace(
        b"Content-Length", b"Session-Expires: 120\r\nContent-Length"
    )
    edge.receive(refreshed, DOWNSTREAM, 60.1)
    assert [(s.status, s.peer) for s in drain(edge)] == [(200, CALLER)]
    assert until_idle(edge, 180.0) == []
    assert backend.released == []
    assert {s.peer for s in until_idle(edge, 180.2)} == {CALLER, DOWNSTREAM}
    assert backend.released == [(backend.only_ref, "session_expired")]


def test_max_call_duration_ends_a_call_whose_bye_never_comes() -> None:
    """With max_call_duration_s, an answered call nobody hangs up is ended (BYE both ways)
    and its slot released when the limit passes, counted from placement."""
    edge, backend = make_edge(max_call_duration_s=600)
    answered_call(edge, backend)
    assert until_idle(edge, 600.0) == []
    sent = until_idle(edge, 600.2)
    assert sorted((s.method, s.peer.host) for s in sent) == [
        ("BYE", "10.0.0.1"),
        ("BYE", "10.0.0.9"),
    ]
    assert "max_call_duration_s=600" in (sent[0].msg.headers.get("Reason") or "")
    assert backend.released == [(backend.only_ref, "max_call_duration")]


def test_max_call_duration_before_the_answer_cancels_and_refuses() -> None:
    """A call still ringing at the limit: CANCEL downstream, 480 upstream, slot released."""
    edge, backend = make_edge(max_call_duration_s=10)
    edge.receive(invite(), CALLER, 0.0)
    drain(edge)
    backend.place(backend.only_ref, 0.0)
    (fwd,) = drain(edge)
    assert isinstance(fwd.msg, SipRequest)
    edge.receive(answer(fwd.msg, 180, "Ringing"), DOWNSTREAM, 0.5)
    drain(edge)
    sent = until_idle(edge, 10.1)
    assert ("CANCEL", DOWNSTREAM) in [(getattr(s.msg, "method", None), s.peer) for s in sent]
    assert 480 in [s.status for s in sent if isinstance(s.msg, SipResponse)]
    assert backend.released == [(backend.only_ref, "max_call_duration")]


# -- rate and retransmission limits --------------------------------------------


def test_invites_over_the_source_rate_are_dropped_with_one_503_a_second() -> None:
    """Over invite_rate_per_source: no job, no transaction, one 503 + Retry-After a second
    per source; a listed source is not limited."""
    edge, backend = make_edge(
        {"invite_rate_per_source": 10, "invite_burst_per_source": 5},
        allowed_addresses=["10.0.0.0/24", "10.6.6.6"],
    )
    for n in range(20):
        edge.receive(
            invite(call_id=f"s{n}", branch=f"z9hG4bKs{n}", host="10.6.6.7"),
            Peer("udp", "10.6.6.7", 5060),
            0.0,
        )
    # 10.6.6.7 is unlisted: 403 for the 5 the bucket let through, one 503 for the rest.
    assert [s.status for s in drain(edge)] == [403] * 5 + [503]
    edge.receive(
        invite(call_id="s99", branch="z9hG4bKs99", host="10.6.6.7"),
        Peer("udp", "10.6.6.7", 5060),
        0.05,
    )
    assert drain(edge) == []
    assert edge.stats.rate_limited == 16
    for n in range(50):  # listed: never limited
        edge.receive(invite(call_id=f"c{n}", branch=f"z9hG4bKc{n}"), CALLER, 0.0)
    assert len(backend.requests) == 50


def test_retransmission_budget_caps_timer_g_without_breaking_reliability() -> None:
    """With max_retransmitting=2, only 2 refusals retransmit on Timer G; the others are
    sent once and resent only when their INVITE is (one response per request)."""
    edge, backend = make_edge({"max_retransmitting": 2})
    for n in range(5):
        edge.receive(invite(call_id=f"c{n}", branch=f"z9hG4bKc{n}"), CALLER, 0.0)
    drain(edge)
    for ref in list(backend.requests):
        backend.refuse(ref, "full", 0.0)
    assert [s.status for s in drain(edge)] == [503] * 5
    assert edge.layer.retransmitting() == 2
    resent = until_idle(edge, 2.0)
    assert {s.msg.headers.get("Call-ID") for s in resent} == {"c0", "c1"}
    edge.receive(invite(call_id="c4", branch="z9hG4bKc4"), CALLER, 2.0)
    assert [(s.status, s.msg.headers.get("Call-ID")) for s in drain(edge)] == [(503, "c4")]
    assert edge.layer.unretransmitted == 3


# -- TLS callers -----------------------------------------------------------------


def test_a_tls_caller_to_a_udp_downstream_is_record_routed_twice() -> None:
    """TLS in, UDP out: two Record-Route entries (RFC 5658), and the downstream's BYE
    (routed through both) goes back over TLS with our TLS Via."""
    edge, backend = make_edge({"tls_port": 5061, "tls_cert": "c.pem", "tls_key": "k.pem"})
    tls = Peer("tls", "10.0.0.1", 40000)
    edge.receive(invite(transport="TLS", port=40000), tls, 0.0)
    assert [s.status for s in drain(edge)] == [100]
    backend.place(backend.only_ref, 0.1)
    (fwd,) = drain(edge)
    assert isinstance(fwd.msg, SipRequest)
    rr = fwd.msg.headers.get_all("Record-Route")
    assert rr == [
        "<sip:10.0.0.5:5060;transport=udp;lr>",
        "<sip:10.0.0.5:5061;transport=tls;lr>",
    ]
    edge.receive(answer(fwd.msg, 200, "OK"), DOWNSTREAM, 0.2)
    assert [(s.status, s.peer) for s in drain(edge)] == [(200, tls)]
    bye = (
        "BYE sip:alice@10.0.0.1:40000;transport=tls SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.9:5080;branch=z9hG4bKgwbye\r\n"
        f"Route: {rr[0]}\r\nRoute: {rr[1]}\r\nMax-Forwards: 70\r\n"
        "From: <sip:+15550100@10.0.0.5>;tag=gw1\r\nTo: <sip:alice@10.0.0.1>;tag=ft1\r\n"
        "Call-ID: call-1@10.0.0.1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    edge.receive(bye, DOWNSTREAM, 1.0)
    (out,) = drain(edge)
    assert out.peer == tls
    assert out.msg.headers.get("Route") is None
    assert (out.msg.headers.get("Via") or "").startswith("SIP/2.0/TLS 10.0.0.5:5061;")
