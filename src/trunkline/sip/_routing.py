"""The stateful proxy's routing rules: who may act in a dialog, where responses go.

Theory of operation: the edge relays only what it can tie to something it
sent itself, and only between the two hops it recorded for the call (the
address the INVITE came from, and the trunk's downstream with every address
its host name resolved to):

* An in-dialog request (BYE, re-INVITE, INFO, ACK for 2xx, ...) is taken only
  from the hop on the side its From tag names; it is forwarded to the other
  hop with a branch derived from a per-edge secret (the same for each
  retransmission, unpredictable to anyone else), and a :class:`Relay` record
  remembers which hop sent it and where it went.
* A response is relayed only if its top Via branch is one of ours and it came
  from the hop its request was sent to: a live client transaction's peer, a
  relay record's target, or (for a 2xx retransmitted after the INVITE client
  transaction ended) the call's downstream. It then goes to the hop recorded
  for that request, never to an address read from a Via, so a forged
  response can not be bounced to a third party over UDP or a new TCP
  connection.

:class:`HopRouter` keeps those records (bounded, each expiring after 64*T1)
and answers the edge's questions; the edge owns the calls and what happens
to them. :class:`Downstreams` is where new calls of each trunk go. Sans-IO:
time is a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trunkline.common.timers import TimerQueue
from trunkline.sip._proxy import (
    BRANCH_PREFIX,
    IDENTITY_HEADERS,
    LocalAddress,
    forward_request,
    stateless_branch,
)
from trunkline.sip.calls import Call
from trunkline.sip.config import Trunk
from trunkline.sip.fields import Via, header_tag
from trunkline.sip.message import SipParseError, SipRequest, SipResponse, parse_cseq
from trunkline.sip.transaction import ClientTx, Outgoing, Peer, TransactionLayer

__all__ = ["Downstreams", "HopRouter", "Relay", "ResponseRoute"]

MAX_RELAYS = 65536


@dataclass(eq=False, slots=True)
class Relay:
    """An in-dialog request this edge relayed: where its responses may come
    from (``target``) and where they go (``upstream``)."""

    call: Call
    upstream: Peer
    target: Peer
    method: str


@dataclass(frozen=True, slots=True)
class ResponseRoute:
    """Where a response belongs; exactly one field is set."""

    client: ClientTx | None = None  # a live client transaction of ours
    relay: Relay | None = None  # an in-dialog request we relayed
    late_2xx: Call | None = None  # a 2xx for a call whose INVITE transaction ended


class HopRouter:
    """Hop checks, relay records and response matching for one edge."""

    def __init__(self, layer: TransactionLayer, secret: str) -> None:
        self.layer = layer
        self._secret = secret
        self._relays: dict[str, Relay] = {}
        self._by_branch: dict[str, Call] = {}
        self._aliases: dict[str, frozenset[str]] = {}
        self._expiry: TimerQueue[str] = TimerQueue()

    def __len__(self) -> int:
        return len(self._relays)

    # -- hops --------------------------------------------------------------

    def alias(self, addresses: Sequence[str]) -> None:
        """Requests and responses from any of ``addresses`` count as the hop
        whose Peer names ``addresses[0]`` (a downstream host name's addresses)."""
        self._aliases[addresses[0]] = frozenset(addresses)

    def hosts_of(self, hop: Peer) -> frozenset[str]:
        """Every address that counts as ``hop`` (its host and any aliases)."""
        return self._aliases.get(hop.host, frozenset()) | {hop.host}

    def from_hop(self, source: Peer, hop: Peer) -> bool:
        """True if ``source`` is the host of ``hop`` (any address it resolved to).
        Hosts, not ports: a PBX may send from several sockets."""
        return source.host == hop.host or source.host in self._aliases.get(hop.host, ())

    # -- in-dialog requests ------------------------------------------------

    def relay_request(
        self, call: Call, req: SipRequest, source: Peer, local: LocalAddress, now: float
    ) -> tuple[bool, Outgoing | None]:
        """Forward an in-dialog request of ``call`` to its other hop.

        Returns ``(from_caller, outgoing)``: the outgoing message to send, or
        None if the request must be refused with 503 (too many relays in flight).
        The caller of this method has checked the hop and Max-Forwards.
        """
        from_caller = self.sender_is_caller(call, req)
        target = call.downstream if from_caller else call.source
        branch = stateless_branch(req, "down" if from_caller else "up", self._secret)
        if req.method != "ACK":
            if branch not in self._relays and len(self._relays) >= MAX_RELAYS:
                return from_caller, None
            self._relays[branch] = Relay(call, source, target, req.method)
            self._expiry.set(branch, now + 64 * self.layer.timers.t1)
        number, _ = parse_cseq(req.headers.get("CSeq") or "")
        if from_caller:
            call.cseq = max(call.cseq, number)
        else:
            call.callee_cseq = max(call.callee_cseq, number)
        strip = IDENTITY_HEADERS if from_caller and not call.trunk.trusted else ()
        fwd = forward_request(
            req, source, local, transport=target.transport, branch=branch, strip=strip
        )
        return from_caller, Outgoing(fwd.to_bytes(), target)

    @staticmethod
    def sender_is_caller(call: Call, req: SipRequest) -> bool:
        """True if ``req``'s From tag is the caller's (else it is the callee's)."""
        return header_tag(req.headers.get("From") or "") == call.caller_tag

    def sender_hop(self, call: Call, req: SipRequest) -> Peer:
        """The hop ``req`` must come from, by the side its From tag names."""
        return call.source if self.sender_is_caller(call, req) else call.downstream

    # -- responses ---------------------------------------------------------

    def sent_invite(self, call: Call, branch: str) -> None:
        """Remember the branch of the INVITE forwarded for ``call``."""
        self._by_branch[branch] = call

    def forget(self, call: Call) -> None:
        """Drop what refers to ``call`` (its INVITE branch)."""
        if call.client_tx is not None:
            self._by_branch.pop(call.client_tx.key.branch, None)

    def route_response(self, resp: SipResponse, source: Peer) -> ResponseRoute | None:
        """Where ``resp`` from ``source`` belongs, or None (stray or forged: drop)."""
        try:
            via = Via.parse(resp.headers.get("Via") or "")
            _, method = parse_cseq(resp.headers.get("CSeq") or "")
        except SipParseError:
            return None
        branch = via.branch or ""
        if not branch.startswith(BRANCH_PREFIX):
            return None
        client = self.layer.find_client(branch, method)
        if client is not None:
            return ResponseRoute(client=client) if self.from_hop(source, client.peer) else None
        relay = self._relays.get(branch)
        if relay is not None:
            ok = relay.method == method and self.from_hop(source, relay.target)
            return ResponseRoute(relay=relay) if ok else None
        call = self._by_branch.get(branch)
        if (
            call is not None
            and method == "INVITE"
            and 200 <= resp.status < 300
            and self.from_hop(source, call.downstream)
        ):
            return ResponseRoute(late_2xx=call)
        return None

    # -- timers ------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next run."""
        return self._expiry.next_deadline()

    def on_timer(self, now: float) -> None:
        """Forget relay records older than 64*T1."""
        for branch in self._expiry.pop_due(now):
            self._relays.pop(branch, None)


def _peer(trunk: Trunk) -> Peer:
    return Peer(trunk.downstream_transport, trunk.downstream_host, trunk.downstream_port)


class Downstreams:
    """Each trunk's downstream hop, as its host name resolved (if it did)."""

    def __init__(self, trunks: Sequence[Trunk]) -> None:
        self._trunks = {t.name: t for t in trunks}
        self._peers = {t.name: _peer(t) for t in trunks}

    def __getitem__(self, trunk: str) -> Peer:
        return self._peers[trunk]

    def peers(self) -> frozenset[Peer]:
        return frozenset(self._peers.values())

    def resolved(self, trunk: str, address: str) -> bool:
        """New calls of ``trunk`` go to ``address``, what its downstream host
        resolved to; False (nothing changed) for a trunk no longer configured."""
        old = self._peers.get(trunk)
        if old is None:
            return False
        self._peers[trunk] = Peer(old.transport, address, old.port)
        return True

    def replace(self, trunks: Sequence[Trunk]) -> None:
        """A new trunk table; a trunk whose downstream did not change keeps its
        resolved address."""
        peers = {}
        for t in trunks:
            was = self._trunks.get(t.name)
            same = was is not None and _peer(was) == _peer(t)
            peers[t.name] = self._peers[t.name] if same else _peer(t)
        self._trunks, self._peers = {t.name: t for t in trunks}, peers
