"""The edge's view of a confirmed dialog: session timers and the BYEs that end it.

Theory of operation: the edge is a proxy, not a user agent, so it never ends a
dialog on its own unless the dialog has outlived its bound: the RFC 4028
session interval the downstream's ``2xx`` named passed without a refresh (a
re-INVITE or UPDATE whose ``2xx`` carries ``Session-Expires`` restarts it; one
without switches the timer off), or the trunk's ``max_call_duration_s``. Then
it sends a BYE each way, built from what it saw pass: the caller's INVITE
(From, Contact, Record-Route) and the downstream's ``2xx`` (To with its tag,
Contact), with a CSeq above any it relayed on that side, so each side sees a
BYE from its peer and tears the call down. Pure functions.
"""

from __future__ import annotations

from trunkline.sip._proxy import LocalAddress
from trunkline.sip.calls import Call
from trunkline.sip.fields import addr_spec, quote
from trunkline.sip.message import Headers, SipParseError, SipRequest, SipResponse

__all__ = ["MIN_SE", "bye_to_caller", "bye_to_downstream", "session_interval"]

MIN_SE = 90  # RFC 4028 section 5: the smallest interval a session timer may have


def session_interval(message: SipRequest | SipResponse) -> float | None:
    """The ``Session-Expires`` delta-seconds of ``message``, at least :data:`MIN_SE`;
    None if it has none (or an unreadable one)."""
    value = message.headers.get("Session-Expires")
    if value is None:
        return None
    delta = value.split(";", 1)[0].strip()
    if not delta.isdigit() or len(delta) > 9:
        return None
    return float(max(MIN_SE, int(delta)))


def _uri(value: str | None, fallback: str) -> str:
    if not value:
        return fallback
    try:
        return addr_spec(value) or fallback
    except SipParseError:
        return fallback


def _bye(
    uri: str,
    frm: str,
    to: str,
    call: Call,
    cseq: int,
    routes: list[str],
    via: str,
    why: str,
) -> SipRequest:
    h = Headers()
    h.add("Via", via)
    for route in routes:
        h.add("Route", route)
    h.add("Max-Forwards", "70")
    h.add("From", frm)
    h.add("To", to)
    h.add("Call-ID", call.invite.headers.get("Call-ID") or "")
    h.add("CSeq", f"{cseq} BYE")
    h.add("Reason", f"SIP;cause=408;text={quote(why)}")
    return SipRequest("BYE", uri, h)


def bye_to_downstream(call: Call, local: LocalAddress, branch: str, why: str) -> SipRequest:
    """The BYE the caller would send the downstream (call answered: ``call.answer``)."""
    assert call.answer is not None
    answer = call.answer
    fallback = call.forwarded.uri if call.forwarded is not None else call.invite.uri
    uri = _uri(answer.headers.get("Contact"), fallback)
    # Record-Route entries above ours lie between us and the downstream.
    routes: list[str] = []
    for rr in answer.headers.get_all("Record-Route"):
        if local.is_me(rr):
            break
        routes.append(rr)
    return _bye(
        uri,
        call.invite.headers.get("From") or "",
        answer.headers.get("To") or "",
        call,
        call.cseq + 1,
        routes,
        local.via(call.downstream.transport, branch),
        why,
    )


def bye_to_caller(call: Call, local: LocalAddress, branch: str, why: str) -> SipRequest:
    """The BYE the downstream would send the caller (call answered: ``call.answer``)."""
    assert call.answer is not None
    src = call.source
    uri = _uri(call.invite.headers.get("Contact"), f"sip:{src.host}:{src.port}")
    return _bye(
        uri,
        call.answer.headers.get("To") or "",
        call.invite.headers.get("From") or "",
        call,
        call.callee_cseq + 1,
        call.invite.headers.get_all("Record-Route"),
        local.via(src.transport, branch),
        why,
    )
