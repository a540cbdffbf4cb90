"""RFC 3261 section 17 transactions (with RFC 6026's Accepted states), sans-IO.

Theory of operation: a :class:`TransactionLayer` holds server transactions
(requests received) and client transactions (requests this element sends),
each a small record whose ``state`` only changes through one transition table
per kind (``IST``, ``NIST``, ``ICT``, ``NICT``). Events are messages in, responses
the transaction user (TU, here the admission edge) sends, and timers. Time is a
parameter: every call takes ``now`` and the layer reports its earliest timer
through :meth:`TransactionLayer.next_deadline`; the adapter calls
:meth:`TransactionLayer.on_timer` when it passes. Bytes to send are appended to
``outbox`` as :class:`Outgoing`; the adapter drains it.

What this gives the TU: a retransmitted request never reaches it (it is
absorbed, and the last response is sent again); a final 3xx-6xx response to an
INVITE is retransmitted with Timer G (T1 doubling up to T2) until the ACK comes
or Timer H (64*T1) gives up, and Timer I then absorbs stray ACKs; a 2xx puts the
INVITE transaction in Accepted, where further INVITE retransmissions are
absorbed and 2xx retransmissions relayed from downstream are sent on, until
Timer L. Client transactions retransmit over UDP (Timers A/E), ACK non-2xx
finals themselves and report timeouts (Timers B/F, and the proxy's Timer C).

Retransmission budget: at most ``max_retransmitting`` INVITE server
transactions retransmit a final response on Timer G at once. A final sent
while the budget is spent is sent once and not rescheduled; the transaction
still lives until Timer H and answers each retransmitted INVITE with it again
(one response per request received), so a caller that never ACKs can not
make the edge send more than it receives beyond that budget.

Matching (17.2.3): the key is top Via branch + sent-by + method, where ACK
matches the INVITE. Requests without an RFC 3261 branch (no ``z9hG4bK``) are
keyed by Call-ID, From tag, CSeq number and sent-by instead.

Transitions requested by the TU that the table does not allow raise
:class:`IllegalTransition` (a bug in the TU). Input from the network that does
not fit the current state is absorbed and counted, never raised. The tables are
:class:`trunkline.common.fsm.EventTable` values; docs/sip.md draws them.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import NamedTuple

from trunkline.common.fsm import EventTable, IllegalTransition
from trunkline.common.timers import TimerQueue
from trunkline.sip.fields import MAGIC_COOKIE, Via, header_tag, with_tag
from trunkline.sip.message import Headers, SipParseError, SipRequest, SipResponse, parse_cseq

__all__ = [
    "ICT",
    "IST",
    "NICT",
    "NIST",
    "ClientTx",
    "Delivery",
    "IllegalTransition",
    "Outgoing",
    "Peer",
    "ServerTx",
    "TimerConfig",
    "TransactionLayer",
    "TxEvent",
    "TxKey",
    "TxKind",
    "TxState",
    "TxTimeout",
    "build_cancel",
    "make_response",
    "server_key",
]


class TxState(enum.Enum):
    """States of every transaction kind; each table uses the subset it needs."""

    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class TxEvent(enum.Enum):
    """What can happen to a transaction."""

    REQUEST = "request retransmission received"
    ACK = "ACK received"
    SEND_1XX = "TU sends 1xx"
    SEND_2XX = "TU sends 2xx"
    SEND_FINAL = "TU sends final (3xx-6xx; any final for non-INVITE)"
    RECV_1XX = "1xx received"
    RECV_2XX = "2xx received"
    RECV_FINAL = "final received (3xx-6xx; any final for non-INVITE)"
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_C = "Timer C"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_K = "Timer K"
    TIMER_L = "Timer L"
    TIMER_M = "Timer M"


class TxKind(enum.Enum):
    """The four transaction machines."""

    IST = "INVITE server"
    NIST = "non-INVITE server"
    ICT = "INVITE client"
    NICT = "non-INVITE client"


S, E = TxState, TxEvent
Table = EventTable[TxState, TxEvent]

IST: Table = EventTable(
    S.PROCEEDING,
    {
        (S.PROCEEDING, E.REQUEST): S.PROCEEDING,
        (S.PROCEEDING, E.ACK): S.PROCEEDING,
        (S.PROCEEDING, E.SEND_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.SEND_2XX): S.ACCEPTED,
        (S.PROCEEDING, E.SEND_FINAL): S.COMPLETED,
        (S.ACCEPTED, E.REQUEST): S.ACCEPTED,
        (S.ACCEPTED, E.ACK): S.ACCEPTED,
        (S.ACCEPTED, E.SEND_2XX): S.ACCEPTED,
        (S.ACCEPTED, E.TIMER_L): S.TERMINATED,
        (S.COMPLETED, E.REQUEST): S.COMPLETED,
        (S.COMPLETED, E.ACK): S.CONFIRMED,
        (S.COMPLETED, E.TIMER_G): S.COMPLETED,
        (S.COMPLETED, E.TIMER_H): S.TERMINATED,
        (S.CONFIRMED, E.REQUEST): S.CONFIRMED,
        (S.CONFIRMED, E.ACK): S.CONFIRMED,
        (S.CONFIRMED, E.TIMER_I): S.TERMINATED,
    },
)
NIST: Table = EventTable(
    S.TRYING,
    {
        (S.TRYING, E.REQUEST): S.TRYING,
        (S.TRYING, E.SEND_1XX): S.PROCEEDING,
        (S.TRYING, E.SEND_FINAL): S.COMPLETED,
        (S.PROCEEDING, E.REQUEST): S.PROCEEDING,
        (S.PROCEEDING, E.SEND_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.SEND_FINAL): S.COMPLETED,
        (S.COMPLETED, E.REQUEST): S.COMPLETED,
        (S.COMPLETED, E.TIMER_J): S.TERMINATED,
    },
)
ICT: Table = EventTable(
    S.CALLING,
    {
        (S.CALLING, E.TIMER_A): S.CALLING,
        (S.CALLING, E.TIMER_B): S.TERMINATED,
        (S.CALLING, E.RECV_1XX): S.PROCEEDING,
        (S.CALLING, E.RECV_2XX): S.ACCEPTED,
        (S.CALLING, E.RECV_FINAL): S.COMPLETED,
        (S.PROCEEDING, E.RECV_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.RECV_2XX): S.ACCEPTED,
        (S.PROCEEDING, E.RECV_FINAL): S.COMPLETED,
        (S.PROCEEDING, E.TIMER_C): S.TERMINATED,
        (S.ACCEPTED, E.RECV_2XX): S.ACCEPTED,
        (S.ACCEPTED, E.TIMER_M): S.TERMINATED,
        (S.COMPLETED, E.RECV_FINAL): S.COMPLETED,
        (S.COMPLETED, E.TIMER_D): S.TERMINATED,
    },
)
NICT: Table = EventTable(
    S.TRYING,
    {
        (S.TRYING, E.TIMER_E): S.TRYING,
        (S.TRYING, E.TIMER_F): S.TERMINATED,
        (S.TRYING, E.RECV_1XX): S.PROCEEDING,
        (S.TRYING, E.RECV_FINAL): S.COMPLETED,
        (S.PROCEEDING, E.TIMER_E): S.PROCEEDING,
        (S.PROCEEDING, E.TIMER_F): S.TERMINATED,
        (S.PROCEEDING, E.RECV_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.RECV_FINAL): S.COMPLETED,
        (S.COMPLETED, E.TIMER_K): S.TERMINATED,
    },
)
TABLES: dict[TxKind, Table] = {
    TxKind.IST: IST,
    TxKind.NIST: NIST,
    TxKind.ICT: ICT,
    TxKind.NICT: NICT,
}
# Timers reported to the TU as a timeout when they end a transaction.
_TIMEOUTS = frozenset({E.TIMER_B, E.TIMER_C, E.TIMER_F, E.TIMER_H})
_TIMERS = tuple(e for e in TxEvent if e.name.startswith("TIMER_"))


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 timer base values in seconds; ``timer_c`` is the proxy INVITE timeout."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 180.0


@dataclass(frozen=True, slots=True)
class Peer:
    """A transport address: ``transport`` is ``"udp"``, ``"tcp"`` or ``"tls"``."""

    transport: str
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        """True for stream transports (no retransmission timers)."""
        return self.transport != "udp"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Bytes the adapter must send to ``peer``."""

    data: bytes
    peer: Peer


class TxKey(NamedTuple):
    """Transaction identity (RFC 3261 17.2.3); ``method`` is INVITE for ACK."""

    branch: str
    sent_by: str
    method: str


def server_key(request: SipRequest) -> TxKey:
    """The key of the server transaction ``request`` belongs to; raise SipParseError."""
    top = request.headers.get("Via")
    if top is None:
        raise SipParseError("missing Via")
    via = Via.parse(top)
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch
    if branch is None or not branch.startswith(MAGIC_COOKIE):
        # RFC 2543 peer: no usable branch; identify by the dialog-ish fields.
        number, _ = parse_cseq(request.headers.get("CSeq") or "")
        frm = header_tag(request.headers.get("From") or "") or ""
        branch = f"2543;{request.headers.get('Call-ID')};{frm};{number}"
    return TxKey(branch, via.sent_by, method)


def make_response(
    request: SipRequest,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> SipResponse:
    """A response to ``request`` (RFC 3261 8.2.6): Vias, From, To, Call-ID and CSeq
    copied, a To tag added when given, then ``extra`` headers."""
    h = Headers()
    for via in request.headers.get_all("Via"):
        h.add("Via", via)
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is not None:
            h.add(name, with_tag(value, to_tag) if name == "To" and to_tag else value)
    for name, value in extra:
        h.add(name, value)
    return SipResponse(status, reason, h)


def build_cancel(invite: SipRequest) -> SipRequest:
    """The CANCEL for a client INVITE (RFC 3261 9.1): same Request-URI, Call-ID,
    From, To, CSeq number and top Via; Route copied."""
    h = Headers()
    h.add("Via", invite.headers.get("Via") or "")
    for name in ("From", "To", "Call-ID"):
        h.add(name, invite.headers.get(name) or "")
    number, _ = parse_cseq(invite.headers.get("CSeq") or "")
    h.add("CSeq", f"{number} CANCEL")
    h.add("Max-Forwards", "70")
    for route in invite.headers.get_all("Route"):
        h.add("Route", route)
    return SipRequest("CANCEL", invite.uri, h)


def _build_ack(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The hop-by-hop ACK for a non-2xx final (RFC 3261 17.1.1.3)."""
    h = Headers()
    h.add("Via", invite.headers.get("Via") or "")
    for route in invite.headers.get_all("Route"):
        h.add("Route", route)
    h.add("From", invite.headers.get("From") or "")
    h.add("To", response.headers.get("To") or invite.headers.get("To") or "")
    h.add("Call-ID", invite.headers.get("Call-ID") or "")
    number, _ = parse_cseq(invite.headers.get("CSeq") or "")
    h.add("CSeq", f"{number} ACK")
    h.add("Max-Forwards", "70")
    return SipRequest("ACK", invite.uri, h)


@dataclass(eq=False, slots=True)
class _Tx:
    id: int
    kind: TxKind
    key: TxKey
    request: SipRequest
    peer: Peer
    state: TxState
    interval: float = 0.0
    last: bytes | None = None  # last response sent (server) / request bytes (client)
    context: object = None  # TU's own reference (the edge keeps its call here)


@dataclass(eq=False, slots=True)
class ServerTx(_Tx):
    """A server transaction; ``last_response`` is what a retransmission gets back."""

    last_response: SipResponse | None = None


@dataclass(eq=False, slots=True)
class ClientTx(_Tx):
    """A client transaction; ``ack`` is the ACK sent for a non-2xx final."""

    ack: bytes | None = None


class Delivery(enum.Enum):
    """What the layer did with a received message."""

    NEW = "new request (or response) the TU must handle"
    ABSORBED = "retransmission or ACK absorbed by a transaction"
    ACK = "ACK matching no INVITE awaiting one (2xx ACK): TU decides"
    UNMATCHED = "response matching no client transaction"


class TxTimeout(NamedTuple):
    """A transaction ended by a timeout the TU must act on (B, C, F or H)."""

    tx: ServerTx | ClientTx
    timer: TxEvent


class TransactionLayer:
    """All live transactions of one edge. Drain ``outbox`` after every call."""

    def __init__(
        self, timers: TimerConfig | None = None, *, max_retransmitting: int | None = None
    ) -> None:
        self.timers = timers or TimerConfig()
        self.outbox: list[Outgoing] = []
        self.absorbed = 0  # network input that fit no transition (counted, not raised)
        self.max_retransmitting = max_retransmitting
        self.unretransmitted = 0  # finals sent without Timer G: the budget was spent
        self._retransmitting: set[int] = set()
        self._server: dict[TxKey, ServerTx] = {}
        self._client: dict[TxKey, ClientTx] = {}
        self._by_id: dict[int, ServerTx | ClientTx] = {}
        self._queue: TimerQueue[tuple[int, TxEvent]] = TimerQueue()
        self._ids = itertools.count(1)

    # -- bookkeeping -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def next_deadline(self) -> float | None:
        """Earliest timer; call :meth:`on_timer` once ``now`` reaches it."""
        return self._queue.next_deadline()

    def find_server(self, key: TxKey) -> ServerTx | None:
        """The live server transaction with ``key``, if any."""
        return self._server.get(key)

    def find_client(self, branch: str, method: str) -> ClientTx | None:
        """The live client transaction this element started with ``branch``."""
        return self._client.get(TxKey(branch, "", method))

    def discard(self, tx: ServerTx) -> None:
        """Drop a server transaction without answering it through the layer (a
        duplicate the TU ignores, or a request the TU answers statelessly)."""
        self._server.pop(tx.key, None)
        self._by_id.pop(tx.id, None)

    def retransmitting(self) -> int:
        """Server transactions retransmitting a final on Timer G now."""
        return len(self._retransmitting)

    def _arm(self, tx: _Tx, event: TxEvent, when: float) -> None:
        self._queue.set((tx.id, event), when)

    def _step(self, tx: ServerTx | ClientTx, event: TxEvent, now: float) -> TxState:
        table = TABLES[tx.kind]
        nxt = table.step(f"{tx.kind.value} transaction {tx.id}", tx.state, event)
        if nxt is not tx.state:
            # Timers the new state has no transition for are disarmed; the rest
            # (e.g. Timer F from Trying into Proceeding) keep their deadline.
            for timer in _TIMERS:
                if (nxt, timer) not in table:
                    self._queue.clear((tx.id, timer))
        tx.state = nxt
        if nxt is not S.COMPLETED:
            self._retransmitting.discard(tx.id)
        if nxt is S.TERMINATED:
            self._by_id.pop(tx.id, None)
            if isinstance(tx, ServerTx):
                self._server.pop(tx.key, None)
            else:
                self._client.pop(tx.key, None)
        return nxt

    def _send(self, data: bytes, peer: Peer) -> None:
        self.outbox.append(Outgoing(data, peer))

    def send_stateless(self, message: SipRequest | SipResponse, peer: Peer) -> None:
        """Send without a transaction (ACK for 2xx, relayed in-dialog requests)."""
        self._send(message.to_bytes(), peer)

    # -- server side -------------------------------------------------------

    def receive_request(
        self, request: SipRequest, key: TxKey, peer: Peer, now: float
    ) -> tuple[Delivery, ServerTx | None]:
        """Match ``request`` (keyed by :func:`server_key`) to a server transaction.

        Returns ``(NEW, tx)`` for a request the TU must answer through
        :meth:`respond`; ``(ABSORBED, tx)`` for a retransmission or ACK consumed
        here (the last response, if any, is queued again); ``(ACK, None)`` for an
        ACK that belongs to no INVITE transaction awaiting it.
        """
        tx = self._server.get(key)
        if request.method == "ACK":
            if tx is None or tx.kind is not TxKind.IST:
                return Delivery.ACK, None
            before = tx.state
            self._step(tx, E.ACK, now)
            if before is S.COMPLETED:
                t_i = 0.0 if peer.reliable else self.timers.t4
                self._arm(tx, E.TIMER_I, now + t_i)
            if before is S.ACCEPTED:
                return Delivery.ACK, tx
            return Delivery.ABSORBED, tx
        if tx is not None:
            self._step(tx, E.REQUEST, now)
            if tx.last is not None and tx.state is not S.ACCEPTED:
                self._send(tx.last, tx.peer)
            return Delivery.ABSORBED, tx
        kind = TxKind.IST if request.method == "INVITE" else TxKind.NIST
        tx = ServerTx(next(self._ids), kind, key, request, peer, TABLES[kind].initial)
        self._server[key] = tx
        self._by_id[tx.id] = tx
        return Delivery.NEW, tx

    def respond(self, tx: ServerTx, response: SipResponse, now: float) -> None:
        """Send ``response`` through ``tx``; raise IllegalTransition if its state forbids it."""
        if response.status < 200:
            event = E.SEND_1XX
        elif response.status < 300 and tx.kind is TxKind.IST:
            event = E.SEND_2XX
        else:
            event = E.SEND_FINAL
        before = tx.state
        self._step(tx, event, now)
        data = response.to_bytes()
        tx.last, tx.last_response = data, response
        self._send(data, tx.peer)
        t1 = self.timers.t1
        if event is E.SEND_2XX and before is S.PROCEEDING:
            self._arm(tx, E.TIMER_L, now + 64 * t1)
        elif event is E.SEND_FINAL and tx.kind is TxKind.IST:
            budget = self.max_retransmitting
            if tx.peer.reliable:
                pass
            elif budget is not None and len(self._retransmitting) >= budget:
                self.unretransmitted += 1
            else:
                tx.interval = t1
                self._retransmitting.add(tx.id)
                self._arm(tx, E.TIMER_G, now + t1)
            self._arm(tx, E.TIMER_H, now + 64 * t1)
        elif event is E.SEND_FINAL:
            self._arm(tx, E.TIMER_J, now + (0.0 if tx.peer.reliable else 64 * t1))

    # -- client side -------------------------------------------------------

    def send_request(
        self, request: SipRequest, peer: Peer, now: float, context: object = None
    ) -> ClientTx:
        """Start a client transaction for ``request`` (its top Via branch must be
        unique and ours) and send it to ``peer``."""
        via = Via.parse(request.headers.get("Via") or "")
        kind = TxKind.ICT if request.method == "INVITE" else TxKind.NICT
        key = TxKey(via.branch or "", "", request.method)
        tx = ClientTx(
            next(self._ids), kind, key, request, peer, TABLES[kind].initial, context=context
        )
        tx.last = request.to_bytes()
        self._client[key] = tx
        self._by_id[tx.id] = tx
        self._send(tx.last, peer)
        t1 = self.timers.t1
        if not peer.reliable:
            tx.interval = t1
            self._arm(tx, E.TIMER_A if kind is TxKind.ICT else E.TIMER_E, now + t1)
        self._arm(tx, E.TIMER_B if kind is TxKind.ICT else E.TIMER_F, now + 64 * t1)
        return tx

    def receive_response(
        self, response: SipResponse, now: float
    ) -> tuple[Delivery, ClientTx | None]:
        """Match a response to a client transaction by top Via branch and CSeq method.

        Returns ``(NEW, tx)`` when the TU should see the response (relay it),
        ``(ABSORBED, tx)`` when the transaction consumed it (a retransmitted final,
        ACKed again; or input that fits no transition, counted in ``absorbed``),
        and ``(UNMATCHED, None)`` when no live client transaction owns it.
        """
        try:
            via = Via.parse(response.headers.get("Via") or "")
            _, method = parse_cseq(response.headers.get("CSeq") or "")
        except SipParseError:
            return Delivery.UNMATCHED, None
        tx = self._client.get(TxKey(via.branch or "", "", method))
        if tx is None:
            return Delivery.UNMATCHED, None
        if response.status < 200:
            event = E.RECV_1XX
        elif response.status < 300 and tx.kind is TxKind.ICT:
            event = E.RECV_2XX
        else:
            event = E.RECV_FINAL
        before = tx.state
        if (before, event) not in TABLES[tx.kind]:
            self.absorbed += 1
            return Delivery.ABSORBED, tx
        state = self._step(tx, event, now)
        t1 = self.timers.t1
        if tx.kind is TxKind.ICT:
            if event is E.RECV_1XX and before is S.CALLING:
                self._arm(tx, E.TIMER_C, now + self.timers.timer_c)
            elif event is E.RECV_2XX and before is not S.ACCEPTED:
                self._arm(tx, E.TIMER_M, now + 64 * t1)
            elif event is E.RECV_FINAL:
                if tx.ack is None:
                    tx.ack = _build_ack(tx.request, response).to_bytes()
                self._send(tx.ack, tx.peer)
                if before is S.COMPLETED:
                    return Delivery.ABSORBED, tx  # retransmitted final: ACKed again
                self._arm(tx, E.TIMER_D, now + (0.0 if tx.peer.reliable else 32.0))
        elif state is S.COMPLETED:
            self._arm(tx, E.TIMER_K, now + (0.0 if tx.peer.reliable else self.timers.t4))
        elif state is S.PROCEEDING and before is S.TRYING and not tx.peer.reliable:
            tx.interval = self.timers.t2
        return Delivery.NEW, tx

    # -- timers ------------------------------------------------------------

    def on_timer(self, now: float) -> list[TxTimeout]:
        """Fire every timer due at ``now``; return the timeouts the TU must handle."""
        out: list[TxTimeout] = []
        for tx_id, event in self._queue.pop_due(now):
            tx = self._by_id.get(tx_id)
            if tx is None:
                continue
            self._step(tx, event, now)
            t2 = self.timers.t2
            if event is E.TIMER_G and isinstance(tx, ServerTx) and tx.last is not None:
                self._send(tx.last, tx.peer)
                tx.interval = min(2 * tx.interval, t2)
                self._arm(tx, E.TIMER_G, now + tx.interval)
            elif event is E.TIMER_A and tx.last is not None:
                self._send(tx.last, tx.peer)
                tx.interval *= 2
                self._arm(tx, E.TIMER_A, now + tx.interval)
            elif event is E.TIMER_E and tx.last is not None:
                self._send(tx.last, tx.peer)
                if tx.state is S.TRYING:
                    tx.interval = min(2 * tx.interval, t2)
                else:
                    tx.interval = t2
                self._arm(tx, E.TIMER_E, now + tx.interval)
            if event in _TIMEOUTS:
                out.append(TxTimeout(tx, event))
        return out
