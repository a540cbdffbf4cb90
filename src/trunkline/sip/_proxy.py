"""Message rewriting for the edge's proxy role (RFC 3261 section 16), pure functions.

Theory of operation: the edge forwards an admitted INVITE to the trunk's
downstream as a stateful proxy, and relays in-dialog requests (ACK for 2xx, BYE,
re-INVITE, ...) and their responses statelessly. Forwarding pushes a Via whose
branch starts with :data:`BRANCH_PREFIX`, stamps ``received``/``rport`` on the
previous hop's Via so responses find their way back, decrements Max-Forwards and
removes the Route entry naming this edge. A response is ours to relay when its
top Via carries our branch prefix; relaying pops that Via and sends the response
to the address the next Via names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from trunkline.sip.fields import MAGIC_COOKIE, Via, uri_host_port
from trunkline.sip.message import SipParseError, SipRequest, SipResponse
from trunkline.sip.transaction import Peer

__all__ = [
    "BRANCH_PREFIX",
    "LocalAddress",
    "forward_request",
    "relay_target",
    "stateless_branch",
]

BRANCH_PREFIX = MAGIC_COOKIE + "tl."
# Headers a caller must not be able to forge towards the downstream.
_OWN_HEADERS = ("X-Trunkline-Job", "X-Trunkline-Worker")


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """How this edge names itself in Via and Record-Route."""

    host: str
    port: int

    def via(self, transport: str, branch: str) -> str:
        """A Via value for a request this edge sends over ``transport``."""
        return f"SIP/2.0/{transport.upper()} {self.host}:{self.port};branch={branch}"

    def record_route(self) -> str:
        """The Record-Route value that keeps this edge on the dialog's path."""
        return f"<sip:{self.host}:{self.port};lr>"

    def is_me(self, route: str) -> bool:
        """True if a Route value names this edge."""
        try:
            host, port = uri_host_port(route)
        except SipParseError:
            return False
        return host == self.host.lower() and (port or 5060) == self.port


def stateless_branch(request: SipRequest, direction: str) -> str:
    """A branch that is the same for every retransmission of ``request`` (16.11)."""
    seed = "|".join(
        [
            direction,
            request.headers.get("Via") or "",
            request.headers.get("Call-ID") or "",
            request.headers.get("CSeq") or "",
            request.method,
        ]
    )
    return (
        BRANCH_PREFIX + "s." + hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()[:20]
    )


def forward_request(
    request: SipRequest,
    source: Peer,
    local: LocalAddress,
    *,
    transport: str,
    branch: str,
    record_route: bool,
    extra: tuple[tuple[str, str], ...] = (),
) -> SipRequest:
    """A copy of ``request`` ready to send on (RFC 3261 16.6).

    Raises SipParseError if the top Via is unreadable; callers check Max-Forwards
    (it must be > 0) before calling.
    """
    headers = request.headers.copy()
    top = Via.parse(headers.get("Via") or "")
    top.set_param("received", source.host)
    top.set_param("rport", str(source.port))
    headers.replace_first("Via", str(top))
    headers.prepend("Via", local.via(transport, branch))
    route = headers.get("Route")
    if route is not None and local.is_me(route):
        headers.pop_first("Route")
    mf = headers.get("Max-Forwards")
    headers.replace_first("Max-Forwards", str(int(mf) - 1 if mf is not None else 69))
    if record_route:
        headers.prepend("Record-Route", local.record_route())
    for name in _OWN_HEADERS:
        headers.remove(name)
    for name, value in extra:
        headers.add(name, value)
    return SipRequest(request.method, request.uri, headers, request.body)


def relay_target(response: SipResponse) -> tuple[SipResponse, Peer] | None:
    """Pop our top Via and name the next hop; None if there is no next Via."""
    headers = response.headers.copy()
    headers.pop_first("Via")
    nxt = headers.get("Via")
    if nxt is None:
        return None
    try:
        via = Via.parse(nxt)
    except SipParseError:
        return None
    host, port = via.response_address("")
    if not host:
        return None
    transport = "tcp" if via.transport == "TCP" else "udp"
    return SipResponse(response.status, response.reason, headers, response.body), Peer(
        transport, host, port
    )
