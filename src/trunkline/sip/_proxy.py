"""Message rewriting for the edge's proxy role (RFC 3261 section 16), pure functions.

Theory of operation: the edge forwards an admitted INVITE to the trunk's
downstream as a stateful proxy, and relays in-dialog requests (ACK for 2xx, BYE,
re-INVITE, ...) between the call's two hops. Forwarding pushes a Via whose
branch starts with :data:`BRANCH_PREFIX`, stamps ``received``/``rport`` on the
previous hop's Via, decrements Max-Forwards, removes the Route entries naming
this edge, and removes headers the sender may not set (``X-Trunkline-*`` always;
identity headers from untrusted trunks). A response is relayed by popping our
Via (:func:`pop_via`); where it goes is decided by the edge from the hop it
recorded when it sent the request, never from the Via that remains, so a
forged response can not be bounced to a third party.

When the caller's transport differs from the downstream's (a TLS caller, a UDP
gateway), the edge record-routes twice (RFC 5658): the entry the downstream
sees first names the downstream-side transport and port, the other the
caller's, so each side sends in-dialog requests over its own transport.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from trunkline.sip.fields import MAGIC_COOKIE, Via, uri_host_port
from trunkline.sip.message import SipParseError, SipRequest, SipResponse
from trunkline.sip.transaction import Peer

__all__ = [
    "BRANCH_PREFIX",
    "IDENTITY_HEADERS",
    "LocalAddress",
    "forward_request",
    "pop_via",
    "stateless_branch",
]

BRANCH_PREFIX = MAGIC_COOKIE + "tl."
# Headers a caller must not be able to forge towards the downstream.
_OWN_HEADERS = ("X-Trunkline-Job", "X-Trunkline-Worker")
# Asserted identity (RFC 3325, draft-ietf-sip-privacy-04): kept only from trusted trunks.
IDENTITY_HEADERS = ("P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID")


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """How this edge names itself in Via and Record-Route."""

    host: str
    port: int
    tls_port: int | None = None

    def port_for(self, transport: str) -> int:
        """The port this edge listens on for ``transport``."""
        if transport.lower() == "tls" and self.tls_port is not None:
            return self.tls_port
        return self.port

    def via(self, transport: str, branch: str) -> str:
        """A Via value for a request this edge sends over ``transport``."""
        port = self.port_for(transport)
        return f"SIP/2.0/{transport.upper()} {self.host}:{port};branch={branch}"

    def record_route(self, transport: str | None = None) -> str:
        """A Record-Route value that keeps this edge on the dialog's path; with
        ``transport``, one that names it (for double record-routing)."""
        if transport is None:
            return f"<sip:{self.host}:{self.port};lr>"
        t = transport.lower()
        return f"<sip:{self.host}:{self.port_for(t)};transport={t};lr>"

    def record_routes(self, inbound: str, outbound: str) -> tuple[str, ...]:
        """The Record-Route values to push, top first, for a call that came in over
        ``inbound`` and goes out over ``outbound``."""
        if inbound == outbound:
            return (self.record_route(None if inbound == "udp" else inbound),)
        return (self.record_route(outbound), self.record_route(inbound))

    def is_me(self, route: str) -> bool:
        """True if a Route value names this edge."""
        try:
            host, port = uri_host_port(route)
        except SipParseError:
            return False
        return host == self.host.lower() and (port or 5060) in (self.port, self.tls_port)


def stateless_branch(request: SipRequest, direction: str, secret: str) -> str:
    """A branch that is the same for every retransmission of ``request`` (16.11),
    and that nobody without ``secret`` can predict."""
    seed = "|".join(
        [
            secret,
            direction,
            request.headers.get("Via") or "",
            request.headers.get("Call-ID") or "",
            request.headers.get("CSeq") or "",
            request.method,
        ]
    )
    return BRANCH_PREFIX + "s." + hashlib.sha256(seed.encode()).hexdigest()[:24]


def forward_request(
    request: SipRequest,
    source: Peer,
    local: LocalAddress,
    *,
    transport: str,
    branch: str,
    record_route: tuple[str, ...] = (),
    strip: tuple[str, ...] = (),
    extra: tuple[tuple[str, str], ...] = (),
) -> SipRequest:
    """A copy of ``request`` ready to send on (RFC 3261 16.6), with the
    ``record_route`` values pushed (top first), the ``strip`` headers removed and
    the ``extra`` ones added.

    Raises SipParseError if the top Via is unreadable; callers check Max-Forwards
    (it must be > 0) before calling.
    """
    headers = request.headers.copy()
    top = Via.parse(headers.get("Via") or "")
    top.set_param("received", source.host)
    top.set_param("rport", str(source.port))
    headers.replace_first("Via", str(top))
    headers.prepend("Via", local.via(transport, branch))
    while (route := headers.get("Route")) is not None and local.is_me(route):
        headers.pop_first("Route")
    mf = headers.get("Max-Forwards")
    headers.replace_first("Max-Forwards", str(int(mf) - 1 if mf is not None else 69))
    for value in reversed(record_route):
        headers.prepend("Record-Route", value)
    headers.remove(*_OWN_HEADERS, *strip)
    for name, value in extra:
        headers.add(name, value)
    return SipRequest(request.method, request.uri, headers, request.body)


def pop_via(response: SipResponse) -> SipResponse | None:
    """``response`` without our top Via; None if no Via would remain (it was
    addressed to us, not to be relayed)."""
    headers = response.headers.copy()
    headers.pop_first("Via")
    if headers.get("Via") is None:
        return None
    return SipResponse(response.status, response.reason, headers, response.body)
