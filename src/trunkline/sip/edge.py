"""The SIP admission edge: decide fast whether an inbound call gets an agent.

Theory of operation (sans-IO; the adapter owns sockets and the clock):

* Bytes come in through :meth:`SipEdge.receive` with the sender and ``now``;
  what to send comes out of :meth:`SipEdge.take_outgoing`; the adapter calls
  :meth:`SipEdge.on_timer` when :meth:`SipEdge.next_deadline` passes.
* The trust boundary comes first (:mod:`trunkline.sip.policy`): an INVITE or
  OPTIONS over its source's token bucket is dropped unparsed; a new INVITE
  whose source no trunk admits, whose number no trunk lists, or whose trunk
  wants digest credentials it lacks is answered once, statelessly (``403``,
  ``404``, ``407``), and never reaches the backend.
* An admitted INVITE is answered ``100 Trying`` at once, and a job is asked of
  the :class:`AdmissionBackend` with the trunk's pool and ``max_wait_s``.
  Nothing else (no 180) is sent upstream while that decision is open.
* The backend answers through :meth:`SipEdge.on_placed` or
  :meth:`SipEdge.on_refused`. Placed: the INVITE goes to the trunk's downstream
  with ``X-Trunkline-Job`` / ``X-Trunkline-Worker``, Record-Route naming this
  edge and our Via (identity headers removed unless the trunk is ``trusted``);
  downstream responses are relayed upstream (100 excepted). Refused, or no
  answer by ``max_wait_s`` + ``decision_grace_s``: the trunk's refusal (503 +
  Retry-After, 486 or 480) with a Reason header naming the cause.
* Retransmitted INVITEs are absorbed by the transaction layer and, as a second
  guard, by Call-ID/From-tag/CSeq, so they never create a second job.
* CANCEL while queued: 200 for the CANCEL, 487 for the INVITE, backend
  ``cancel``. CANCEL after placement is relayed downstream. A CANCEL from
  another address than its INVITE's is not matched.
* In-dialog requests (ACK for 2xx, BYE, re-INVITE, ...) are relayed between
  the two hops of the call, and only when they come from one of them. The
  first BYE releases the call's slot.
* A response is relayed only when it matches a client transaction (or an
  in-dialog request) this edge sent, came from the hop it was sent to, and
  then only to the upstream hop recorded then; never to an address a Via
  names.
* A call that outlives its RFC 4028 session interval without a refresh, or its
  trunk's ``max_call_duration_s``, is ended: a BYE each way and the slot
  released (:mod:`trunkline.sip._dialog`).
* The slot is released (backend ``release``) exactly once when a placed call
  ends, unless the backend said first that the job ended (``on_job_ended``).
* :meth:`SipEdge.replace_trunks` swaps the trunk table (a reload): new
  INVITEs go by the new one; a call keeps the trunk it was admitted on, and
  its hops may reach the edge for its dialog though no trunk admits them.
* Anything unreadable is answered 400 when it is a request with a readable Via,
  else dropped and counted in :class:`EdgeStats`. Nothing raises out of the edge.

Calls move through :class:`~trunkline.sip.calls.CallState` by
:data:`~trunkline.sip.calls.CALL_TABLE` only.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
from collections.abc import Callable, Sequence

from trunkline.sip._book import CallBook, reason_header
from trunkline.sip._proxy import (
    IDENTITY_HEADERS,
    LocalAddress,
    forward_request,
    pop_via,
)
from trunkline.sip._routing import Downstreams, HopRouter, Relay
from trunkline.sip.backend import AdmissionBackend
from trunkline.sip.calls import (
    CALL_TABLE,
    TERMINAL,
    Call,
    CallEvent,
    CallState,
    EdgeStats,
    Slot,
    step,
)
from trunkline.sip.config import SipConfig, Trunk, TrunkChanges, diff_trunks
from trunkline.sip.fields import Via, header_tag, uri_user
from trunkline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    parse_cseq,
    parse_message,
    quick_response,
)
from trunkline.sip.policy import AdmissionPolicy, Refusal
from trunkline.sip.transaction import (
    Delivery,
    Outgoing,
    Peer,
    ServerTx,
    TimerConfig,
    TransactionLayer,
    TxEvent,
    TxKey,
    TxKind,
    TxState,
    make_response,
    server_key,
)

__all__ = ["SipEdge"]

log = logging.getLogger("trunkline.sip")

_ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
_LIMITED = (b"INVITE ", b"OPTIONS")


class SipEdge:
    """One SIP admission edge. Not thread-safe; call from one event loop.

    After any call into the edge (including the ``on_*`` callbacks) drain
    :meth:`take_outgoing` and re-arm the timer to :meth:`next_deadline`.
    ``random`` supplies every unpredictable value (branches, nonces, the
    secret behind them); tests pass a seeded one.
    """

    def __init__(
        self,
        config: SipConfig,
        backend: AdmissionBackend,
        *,
        timers: TimerConfig | None = None,
        decision_grace_s: float = 0.05,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.config = config
        self.backend = backend
        self.stats = EdgeStats()
        self.local = LocalAddress(config.advertised_host, config.port, config.tls_port)
        self.layer = TransactionLayer(timers, max_retransmitting=config.max_retransmitting)
        self.policy = AdmissionPolicy(config, random)
        self._random = random
        self._grace = decision_grace_s
        self._ids = itertools.count(1)
        self._nonce = random(3).hex()
        self.router = HopRouter(self.layer, random(16).hex())
        self.book = CallBook(backend, self.layer, self.stats, self.router, self.local, random)
        self._downstream = Downstreams(config.trunks)

    # -- adapter interface -------------------------------------------------

    def bind(self, port: int, tls_port: int | None = None) -> None:
        """Tell the edge the ports it actually listens on (after binding port 0)."""
        self.local = self.book.local = LocalAddress(self.config.advertised_host, port, tls_port)

    def set_downstream_addresses(self, trunk: str, addresses: Sequence[str]) -> None:
        """The IP addresses a trunk's downstream host name resolved to: the first
        is sent to; requests and responses from any of them count as the
        downstream hop. Without this, the configured host is used as is."""
        if addresses and self._downstream.resolved(trunk, addresses[0]):
            self.router.alias(addresses)

    def replace_trunks(self, trunks: Sequence[Trunk]) -> TrunkChanges:
        """Admit and route new calls by ``trunks`` from now on, the whole table
        at once; calls in progress keep their trunk to their end. A trunk whose
        downstream is unchanged keeps its resolved addresses; the adapter
        resolves the others (:meth:`set_downstream_addresses`)."""
        changes = diff_trunks(self.config.trunks, trunks)
        self.config = dataclasses.replace(self.config, trunks=tuple(trunks))
        self.policy.use(self.config)
        self._downstream.replace(trunks)
        return changes

    def downstream_peers(self) -> frozenset[Peer]:
        """Where the edge may open a new stream connection: the downstreams only
        (of the trunks, and of calls on trunks since replaced)."""
        calls = self.book.calls.values()
        return self._downstream.peers().union(c.downstream for c in calls)

    def take_outgoing(self) -> list[Outgoing]:
        """Everything queued to send, oldest first; the queue is emptied."""
        out, self.layer.outbox = self.layer.outbox, []
        responses = self.stats.responses
        for o in out:
            data = o.data
            if data.startswith(b"SIP/2.0 ") and data[8:11].isdigit():
                responses[int(data[8:11])] += 1
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called, or None."""
        candidates = (
            self.layer.next_deadline(),
            self.book.next_deadline(),
            self.router.next_deadline(),
        )
        deadlines = [d for d in candidates if d is not None]
        return min(deadlines) if deadlines else None

    def pending_calls(self) -> int:
        """Calls whose slot is requested or held (should drop to 0 when idle)."""
        return self.book.pending()

    def __len__(self) -> int:
        return len(self.book)

    def receive(self, data: bytes, source: Peer, now: float) -> None:
        """Handle one datagram or one framed stream message. Never raises."""
        self.stats.datagrams += 1
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            if data[:7] in _LIMITED and not self.policy.rate_ok(source.host, now):
                self._rate_limited(data, source, now)
                return
            if (
                not self.policy.reachable(source.host)
                and not data.startswith(b"SIP/2.0 ")
                and source.host not in self.book.hop_hosts
            ):
                self._unreachable(data, source)
                return
            try:
                msg = parse_message(data, stream=source.reliable)
            except SipParseError as exc:
                self._bad_message(exc, source)
                return
            if isinstance(msg, SipResponse):
                self._on_response(msg, source, now)
            else:
                self._on_request(msg, source, now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed on a message", extra={"peer": source.host})

    def on_timer(self, now: float) -> None:
        """Fire every due transaction and call timer. Never raises."""
        try:
            for timeout in self.layer.on_timer(now):
                call = timeout.tx.context
                if (
                    isinstance(call, Call)
                    and timeout.tx is call.client_tx
                    and timeout.timer in (TxEvent.TIMER_B, TxEvent.TIMER_C)
                ):
                    self.book.downstream_timeout(call, now)
            self.router.on_timer(now)
            self.book.on_timer(now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in a timer")

    # -- backend callbacks -------------------------------------------------

    def on_placed(self, call_ref: str, job_id: str, worker_id: str, now: float) -> None:
        """The backend placed ``call_ref`` as ``job_id`` on ``worker_id``: forward the INVITE."""
        try:
            call = self.book.calls.get(call_ref)
            if call is None or call.state is not CallState.QUEUED:
                # Raced a cancel or the decision deadline: give the slot back.
                self.book.safe(self.backend.release, call_ref, "placed_after_call_gone")
                return
            self.book.placed(call, job_id, now)
            branch = self.book.branch()
            trunk = call.trunk
            strip = () if trunk.trusted else IDENTITY_HEADERS
            if trunk.auth_username is not None:
                strip = (*strip, "Proxy-Authorization")  # consumed here (RFC 3261 22.3)
            fwd = forward_request(
                call.invite,
                call.source,
                self.local,
                transport=call.downstream.transport,
                branch=branch,
                record_route=self.local.record_routes(
                    call.source.transport, call.downstream.transport
                ),
                strip=strip,
                extra=(("X-Trunkline-Job", job_id), ("X-Trunkline-Worker", worker_id)),
            )
            call.forwarded = fwd
            self.router.sent_invite(call, branch)
            call.client_tx = self.layer.send_request(fwd, call.downstream, now, context=call)
            log.debug("sip call placed", extra={"call_ref": call_ref, "job_id": job_id})
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_placed", extra={"call_ref": call_ref})

    def on_refused(self, call_ref: str, reason: str, now: float) -> None:
        """The backend could not place ``call_ref``: send the trunk's refusal naming ``reason``."""
        try:
            call = self.book.calls.get(call_ref)
            if call is None or call.state is not CallState.QUEUED:
                return
            call.slot = Slot.FREED
            self.book.refuse(call, reason, now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_refused", extra={"call_ref": call_ref})

    def on_job_ended(self, job_id: str, now: float) -> None:
        """The agent's job ended: its slot is free; a call not yet answered is ended."""
        try:
            call = self.book.by_job.pop(job_id, None)
            if call is None or (call.state, CallEvent.JOB_ENDED) not in CALL_TABLE:
                return
            call.slot = Slot.FREED
            if call.state is CallState.PLACED:
                self.book.cancel_downstream(call, now)
                self.book.send_final(call, 480, "agent job ended before the call was answered", now)
            step(call, CallEvent.JOB_ENDED)
            self.book.linger(call, now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_job_ended", extra={"job_id": job_id})

    # -- requests ----------------------------------------------------------

    def _rate_limited(self, data: bytes, source: Peer, now: float) -> None:
        """Over the source's bucket: dropped unparsed, except one 503 a second."""
        self.stats.rate_limited += 1
        if not self.policy.limiter.take_notice(source.host, now):
            return
        try:
            msg = parse_message(data, stream=source.reliable)
        except SipParseError:
            return
        if isinstance(msg, SipRequest):
            retry = str(self.policy.limiter.retry_after_s())
            refusal = Refusal(
                503,
                "Service Unavailable",
                "too many requests from this address",
                (("Retry-After", retry),),
                "rate_limited",
            )
            self._reply_once(msg, source, refusal, count=False)

    def _unreachable(self, data: bytes, source: Peer) -> None:
        """A request from an address no trunk admits: one 403, built without a full
        parse (the cheapest answer to a flood from many addresses), or dropped."""
        resp = quick_response(data, 403, "Forbidden", to_tag=self._tag(), extra=_NOT_ALLOWED_EXTRA)
        if resp is None:
            self.stats.dropped += 1
            return
        self.stats.forbidden += 1
        self.layer.outbox.append(Outgoing(resp, source))

    def _bad_message(self, exc: SipParseError, source: Peer) -> None:
        req = exc.request
        if req is None or req.method == "ACK":
            self.stats.dropped += 1
            log.debug("sip message dropped", extra={"reason": exc.reason, "peer": source.host})
            return
        try:
            Via.parse(req.headers.get("Via") or "")
            parse_cseq(req.headers.get("CSeq") or "")
        except SipParseError:
            self.stats.dropped += 1
            return
        if not all(req.headers.get(name) for name in ("From", "To", "Call-ID")):
            # A response without these cannot be matched by the sender.
            self.stats.dropped += 1
            return
        self.stats.bad_requests += 1
        phrase = "Bad Request: " + "".join(c for c in exc.reason if c.isprintable())[:100]
        resp = make_response(req, 400, phrase, to_tag=self._tag())
        self.layer.send_stateless(resp, source)

    def _on_request(self, req: SipRequest, source: Peer, now: float) -> None:
        try:
            # Read every structured field the handlers rely on before any
            # transaction exists, so a bad field is a 400, not a stuck call.
            key = server_key(req)
            if req.method == "INVITE":
                uri_user(req.uri)
                uri_user(req.headers.get("To") or "")
        except SipParseError as exc:
            self._bad_message(SipParseError(exc.reason, req), source)
            return
        method = req.method
        to_tag = header_tag(req.headers.get("To") or "")
        if to_tag is not None and method not in ("ACK", "CANCEL"):
            self._in_dialog(req, source, now)
            return
        # Out-of-dialog requests other than INVITE/CANCEL/ACK are answered
        # statelessly: no transaction, so a flood of them holds no memory.
        if method == "OPTIONS":
            self._on_options(req, source)
            return
        if method not in ("INVITE", "ACK", "CANCEL"):
            if method == "BYE":
                self._reply_once(req, source, _NO_DIALOG, count=False)
            else:
                allow = Refusal(405, "Method Not Allowed", "", (("Allow", _ALLOW),))
                self._reply_once(req, source, allow, count=False)
            return
        trunk: Trunk | None = None
        if method == "INVITE" and self.layer.find_server(key) is None:
            if self._late_retransmission(req):
                return
            user = uri_user(req.uri) or uri_user(req.headers.get("To") or "")
            trunk, refusal = self.policy.admit(req, source.host, user, now)
            if refusal is not None:
                self._reply_once(req, source, refusal)
                return
        delivery, tx = self.layer.receive_request(req, key, source, now)
        if delivery is Delivery.ABSORBED:
            if method != "ACK":  # the ACK of a non-2xx final is expected, not a resend
                self.stats.retransmissions += 1
            return
        if delivery is Delivery.ACK or tx is None:
            self._in_dialog(req, source, now)
            return
        if method == "INVITE" and trunk is not None:
            self._on_invite(req, tx, trunk, source, now)
        elif method == "CANCEL":
            self._on_cancel(req, tx, key._replace(method="INVITE"), source, now)
        else:  # unreachable: an INVITE without a transaction was admitted above
            self.layer.discard(tx)

    def _late_retransmission(self, req: SipRequest) -> bool:
        """True for an INVITE retransmitted after its transaction ended."""
        old = self.book.by_call_id.get(req.headers.get("Call-ID") or "")
        if old is not None and old.invite.headers.get("Via") == req.headers.get("Via"):
            # A call we already have: never a second job, nothing to say.
            self.stats.retransmissions += 1
            return True
        return False

    def _on_invite(
        self, req: SipRequest, tx: ServerTx, trunk: Trunk, source: Peer, now: float
    ) -> None:
        call_id = req.headers.get("Call-ID") or ""
        number, _ = parse_cseq(req.headers.get("CSeq") or "")
        old = self.book.by_call_id.get(call_id)
        if old is not None and (old.state not in TERMINAL or number <= old.cseq):
            # Same Call-ID/CSeq on another branch: merged request (RFC 3261 8.2.2.2).
            self.layer.respond(tx, self._resp(req, 482, "Loop Detected"), now)
            return
        self.stats.invites += 1
        if trunk.auth_username is not None:
            self.stats.authenticated += 1
        self.layer.respond(tx, make_response(req, 100, "Trying"), now)
        mf = req.headers.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            self.layer.respond(tx, self._resp(req, 483, "Too Many Hops"), now)
            return
        user = uri_user(req.uri) or uri_user(req.headers.get("To") or "")
        ref = f"sip-{self._nonce}-{next(self._ids)}"
        downstream = self._downstream[trunk.name]
        call = Call(ref, trunk, req, source, downstream, tx, self._tag(), cseq=number)
        tx.context = call
        self.book.add(call, now + trunk.max_wait_s + self._grace)
        metadata = {
            "sip.call_id": call_id,
            "sip.from": req.headers.get("From") or "",
            "sip.to": req.headers.get("To") or "",
            "sip.called": user or "",
            "sip.trunk": trunk.name,
            "sip.cseq": str(number),  # with Call-ID and From tag: the call across members
            "sip.source": f"{source.transport}:{source.host}:{source.port}",
        }
        if trunk.to_livekit:
            # The backend holds the slot until LiveKit SIP's room for the call
            # is seen (core/binding.py); the job id goes down in X-Trunkline-Job.
            metadata["sip.downstream_kind"] = "livekit"
            metadata["sip.room_bind_timeout_s"] = f"{trunk.room_bind_timeout_s:g}"
        try:
            self.backend.request(ref, trunk.pool, trunk.max_wait_s, metadata)
        except Exception:
            log.exception("admission backend failed on request", extra={"call_ref": ref})
            if call.state is CallState.QUEUED:
                call.slot = Slot.FREED
                self.book.refuse(call, "admission backend error", now)

    def _on_cancel(
        self, req: SipRequest, tx: ServerTx, invite_key: TxKey, source: Peer, now: float
    ) -> None:
        invite_tx = self.layer.find_server(invite_key)
        call = invite_tx.context if invite_tx is not None else None
        if not isinstance(call, Call) or not self.router.from_hop(source, call.source):
            if isinstance(call, Call):
                self.stats.foreign_hop += 1
            self.layer.discard(tx)
            self._reply_once(req, source, _NO_DIALOG, count=False)
            return
        self.layer.respond(tx, make_response(req, 200, "OK", to_tag=call.to_tag), now)
        self.book.cancelled(call, now)

    def _on_options(self, req: SipRequest, source: Peer) -> None:
        if not self.policy.reachable(source.host):
            self._reply_once(req, source, _NOT_ALLOWED)
            return
        user = uri_user(req.uri)
        trunk = self.config.match_trunk(user) if user else None
        pools = [trunk.pool] if trunk else [t.pool for t in self.config.trunks]
        if any(self._has_capacity(p) for p in pools):
            ok = (("Allow", _ALLOW), ("Accept", "application/sdp"))
            self._reply_once(req, source, Refusal(200, "OK", "", ok), count=False)
        else:
            retry = (("Retry-After", str(trunk.retry_after_s if trunk else 5)),)
            full = Refusal(503, "Service Unavailable", "no agent capacity", retry)
            self._reply_once(req, source, full, count=False)

    def _in_dialog(self, req: SipRequest, source: Peer, now: float) -> None:
        """Relay an in-dialog request (or a 2xx ACK) from one hop of its call to the other."""
        call = self.book.by_call_id.get(req.headers.get("Call-ID") or "")
        frm = header_tag(req.headers.get("From") or "")
        is_ack = req.method == "ACK"
        if call is None or call.callee_tag is None or frm not in (call.caller_tag, call.callee_tag):
            if is_ack:
                self.stats.stray += 1
            else:
                self._reply_once(req, source, _NO_DIALOG, count=False)
            return
        if not self.router.from_hop(source, self.router.sender_hop(call, req)):
            # Only the call's two hops may act in its dialog: a BYE from a third
            # address must not end someone else's call.
            self.stats.foreign_hop += 1
            log.debug("sip in-dialog request from a foreign hop", extra={"peer": source.host})
            if not is_ack:
                why = "request from an address that is not a hop of this dialog"
                self._reply_once(req, source, Refusal(403, "Forbidden", why), count=False)
            return
        mf = req.headers.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            if not is_ack:
                self._reply_once(req, source, Refusal(483, "Too Many Hops", ""), count=False)
            return
        from_caller, out = self.router.relay_request(call, req, source, self.local, now)
        if out is None:
            busy = Refusal(503, "Service Unavailable", "too many requests in flight")
            self._reply_once(req, source, busy, count=False)
            return
        self.layer.outbox.append(out)
        if req.method == "BYE" and (call.state, CallEvent.BYE) in CALL_TABLE:
            step(call, CallEvent.BYE)
            self.book.release(call, "caller_bye" if from_caller else "downstream_bye")
            self.book.linger(call, now)

    # -- responses ---------------------------------------------------------

    def _on_response(self, resp: SipResponse, source: Peer, now: float) -> None:
        route = self.router.route_response(resp, source)
        if route is None:
            self.stats.stray += 1  # not ours, or not from where we sent: never relayed
        elif route.client is not None:
            self._on_client_response(resp, now)
        elif route.relay is not None:
            self._relay_response(route.relay, resp, now)
        elif route.late_2xx is not None:
            # A 2xx retransmission after our INVITE client transaction ended
            # (Timer M): it still goes end to end, to the caller's hop.
            popped = pop_via(resp)
            if popped is not None:
                self.layer.send_stateless(popped, route.late_2xx.source)

    def _on_client_response(self, resp: SipResponse, now: float) -> None:
        delivery, tx = self.layer.receive_response(resp, now)
        call = tx.context if tx is not None else None
        if delivery is not Delivery.NEW or tx is None or not isinstance(call, Call):
            return
        if tx.kind is not TxKind.ICT:
            return  # response to our CANCEL or BYE: nothing to relay
        if resp.status == 100:
            return  # hop-by-hop
        if resp.status < 200:
            if call.cancel_pending:
                call.cancel_pending = False
                self.book.send_cancel(call, now)
            self._relay_upstream(call, resp, now)
        elif resp.status < 300:
            if call.state in (CallState.PLACED, CallState.ANSWERED):
                if call.state is CallState.PLACED:
                    call.callee_tag = header_tag(resp.headers.get("To") or "")
                    call.answer = resp
                    self.book.session_refreshed(call, resp, now)
                step(call, CallEvent.ANSWERED)
                self._relay_upstream(call, resp, now)
            else:
                self.stats.stray += 1  # 2xx after we answered upstream ourselves
        elif call.state is CallState.PLACED:
            self._relay_upstream(call, resp, now)
            self.book.failed(call, resp.status, now)

    def _relay_response(self, relay: Relay, resp: SipResponse, now: float) -> None:
        """A response to an in-dialog request we relayed: to the hop that sent it."""
        popped = pop_via(resp)
        if popped is None:
            self.stats.stray += 1
            return
        call = relay.call
        if (
            relay.method in ("INVITE", "UPDATE")
            and 200 <= resp.status < 300
            and call.state is CallState.ANSWERED
        ):
            self.book.session_refreshed(call, resp, now)
        self.layer.send_stateless(popped, relay.upstream)

    def _relay_upstream(self, call: Call, resp: SipResponse, now: float) -> None:
        popped = pop_via(resp)
        if popped is None:
            return
        st = call.server_tx
        success = 200 <= resp.status < 300
        if st.state is TxState.PROCEEDING:
            self.layer.respond(st, popped, now)
            if resp.status >= 200:
                self.book.final_sent(call, resp.status)
        elif success and st.state is TxState.ACCEPTED:
            self.layer.respond(st, popped, now)
        elif success:
            # The upstream transaction is gone (Timer L): 2xx still goes end to end.
            self.layer.send_stateless(popped, call.source)

    # -- helpers -----------------------------------------------------------

    def _tag(self) -> str:
        return f"tl{self._nonce}{next(self._ids):x}"

    def _resp(
        self, req: SipRequest, status: int, phrase: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> SipResponse:
        return make_response(req, status, phrase, to_tag=self._tag(), extra=extra)

    def _reply_once(
        self, req: SipRequest, source: Peer, refusal: Refusal, *, count: bool = True
    ) -> None:
        """Answer ``req`` statelessly: one response, no transaction, no timer."""
        extra = refusal.extra
        if refusal.why:
            extra = (*extra, reason_header(refusal.status, refusal.why))
        self.layer.send_stateless(self._resp(req, refusal.status, refusal.phrase, extra), source)
        if count:
            setattr(self.stats, refusal.counter, getattr(self.stats, refusal.counter) + 1)
            log.debug(
                "sip request refused",
                extra={"status": refusal.status, "reason": refusal.why, "peer": source.host},
            )

    def _has_capacity(self, pool: str) -> bool:
        try:
            return bool(self.backend.has_capacity(pool))
        except Exception:
            log.exception("admission backend failed on has_capacity", extra={"pool": pool})
            return False


_NO_DIALOG = Refusal(481, "Call/Transaction Does Not Exist", "")
_NOT_ALLOWED = Refusal(403, "Forbidden", "source address not allowed")
_NOT_ALLOWED_EXTRA = (reason_header(403, _NOT_ALLOWED.why),)
