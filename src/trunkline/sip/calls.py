"""The state of one inbound call at the edge, as data.

Theory of operation: every call the edge admits is a :class:`Call` record whose
``state`` changes only through :data:`CALL_TABLE` (an illegal transition raises
:class:`~trunkline.common.fsm.IllegalTransition`, alias
:data:`IllegalCallTransition`; docs/sip.md draws the table), and whose
``slot`` says whether the backend holds something for it. A call whose slot
is REQUESTED or HELD is pending; when the edge is idle, no call may be pending
(that would be a leaked agent slot).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field, fields

from trunkline.common.fsm import EventTable, IllegalTransition
from trunkline.sip.config import Trunk
from trunkline.sip.fields import header_tag
from trunkline.sip.message import SipRequest, SipResponse
from trunkline.sip.transaction import ClientTx, Peer, ServerTx

__all__ = [
    "CALL_TABLE",
    "TERMINAL",
    "Call",
    "CallEvent",
    "CallState",
    "EdgeStats",
    "IllegalCallTransition",
    "Slot",
    "step",
]


class CallState(enum.Enum):
    """Where one inbound call is."""

    QUEUED = "waiting for the admission decision"
    PLACED = "INVITE forwarded downstream"
    ANSWERED = "2xx relayed upstream"
    REFUSED = "refused upstream"
    CANCELLED = "cancelled by the caller"
    FAILED = "downstream answered non-2xx or timed out"
    ENDED = "hung up, or the agent's job ended"


class CallEvent(enum.Enum):
    """What moves a call."""

    PLACED = "backend placed the job"
    REFUSED = "backend refused, or the decision deadline passed"
    CANCEL = "caller sent CANCEL"
    ANSWERED = "downstream 2xx"
    FAILED = "downstream non-2xx final or timeout"
    BYE = "BYE from either side"
    JOB_ENDED = "backend says the agent's job ended"
    EXPIRED = "Session-Expires passed without a refresh, or max_call_duration_s reached"


C, CE = CallState, CallEvent
CALL_TABLE: EventTable[CallState, CallEvent] = EventTable(
    C.QUEUED,
    {
        (C.QUEUED, CE.PLACED): C.PLACED,
        (C.QUEUED, CE.REFUSED): C.REFUSED,
        (C.QUEUED, CE.CANCEL): C.CANCELLED,
        (C.PLACED, CE.CANCEL): C.PLACED,  # CANCEL relayed; the downstream's final decides
        (C.PLACED, CE.ANSWERED): C.ANSWERED,
        (C.PLACED, CE.FAILED): C.FAILED,
        (C.PLACED, CE.JOB_ENDED): C.ENDED,
        (C.PLACED, CE.EXPIRED): C.ENDED,
        (C.ANSWERED, CE.ANSWERED): C.ANSWERED,
        (C.ANSWERED, CE.BYE): C.ENDED,
        (C.ANSWERED, CE.JOB_ENDED): C.ENDED,
        (C.ANSWERED, CE.EXPIRED): C.ENDED,
        (C.ENDED, CE.BYE): C.ENDED,
        (C.ENDED, CE.JOB_ENDED): C.ENDED,
    },
)
TERMINAL = frozenset({C.REFUSED, C.CANCELLED, C.FAILED, C.ENDED})


# The one `IllegalTransition`, under the name older callers use.
IllegalCallTransition = IllegalTransition


class Slot(enum.Enum):
    """What the admission backend holds for a call."""

    NONE = "never requested"
    REQUESTED = "request outstanding"
    HELD = "placed, slot in use"
    FREED = "cancelled, refused, released or job ended"


@dataclass
class EdgeStats:
    """Counters for /metrics; they only grow."""

    datagrams: int = 0
    dropped: int = 0
    bad_requests: int = 0
    invites: int = 0
    retransmissions: int = 0
    placed: int = 0
    refused: int = 0
    cancelled: int = 0
    released: int = 0
    stray: int = 0
    internal_errors: int = 0
    # The trust boundary (docs/sip.md): requests turned away before any slot.
    rate_limited: int = 0  # INVITE/OPTIONS over a source's token bucket, dropped
    forbidden: int = 0  # 403: source not allowed, or wrong credentials
    unknown_number: int = 0  # 404: no trunk lists the called number
    challenged: int = 0  # 407 digest challenges sent
    authenticated: int = 0  # INVITEs whose digest credentials were valid
    foreign_hop: int = 0  # in-dialog requests or CANCELs from outside the call's hops
    expired: int = 0  # calls ended by Session-Expires or max_call_duration_s
    # Counted by the transport adapter (runtime/sip_server.py).
    tcp_refused: int = 0  # connections over max_tcp_connections(_per_source), closed at accept
    tcp_idle_closed: int = 0  # closed after tcp_idle_timeout_s without a message
    tcp_slow_reader_closed: int = 0  # closed: the peer stopped reading what we sent
    tls_handshake_failed: int = 0
    unsendable: int = 0  # for a stream peer with no connection, which the edge never opens

    # Responses sent, by status code (retransmissions included).
    responses: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        """Counter name → value (responses by code are in `responses`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "responses"}


@dataclass(eq=False)
class Call:
    """One inbound call: the INVITE, its transactions, its job and its slot.

    ``source`` and ``downstream`` are the call's two hops: the address the
    INVITE came from and the trunk's (resolved) downstream. In-dialog requests
    are taken from these two only.
    """

    ref: str
    trunk: Trunk
    invite: SipRequest
    source: Peer
    downstream: Peer
    server_tx: ServerTx
    to_tag: str
    state: CallState = C.QUEUED
    slot: Slot = Slot.NONE
    job_id: str | None = None
    client_tx: ClientTx | None = None
    forwarded: SipRequest | None = None
    callee_tag: str | None = None
    cancel_pending: bool = False
    cseq: int = 0
    answer: SipResponse | None = None  # the downstream's first 2xx
    callee_cseq: int = 0  # highest CSeq seen from the downstream side
    session_expires_s: float | None = None  # RFC 4028 interval in force
    hop_hosts: tuple[str, ...] = ()  # every address of both hops (CallBook.add)

    @property
    def caller_tag(self) -> str | None:
        return header_tag(self.invite.headers.get("From") or "")


def step(call: Call, event: CallEvent) -> None:
    """Move ``call`` by ``event``; raise IllegalTransition if CALL_TABLE forbids it."""
    call.state = CALL_TABLE.step(f"call {call.ref}", call.state, event)
