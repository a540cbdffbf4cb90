"""The SIP admission edge: decide fast whether an inbound call gets an agent.

Theory of operation (sans-IO; the adapter owns sockets and the clock):

* Bytes come in through :meth:`SipEdge.receive` with the sender and ``now``;
  what to send comes out of :meth:`SipEdge.take_outgoing`; the adapter calls
  :meth:`SipEdge.on_timer` when :meth:`SipEdge.next_deadline` passes.
* A new INVITE is answered ``100 Trying`` at once, matched to a trunk by the
  Request-URI user (else the To user), and a job is asked of the
  :class:`AdmissionBackend` with the trunk's pool and ``max_wait_s``. Nothing
  else (no 180) is sent upstream while that decision is open.
* The backend answers through :meth:`SipEdge.on_placed` or
  :meth:`SipEdge.on_refused`. Placed: the INVITE goes to the trunk's downstream
  with ``X-Trunkline-Job`` / ``X-Trunkline-Worker``, a Record-Route naming this
  edge and our Via; downstream responses are relayed upstream (100 excepted).
  Refused, or no answer by ``max_wait_s`` + ``decision_grace_s``: the trunk's
  refusal (503 + Retry-After, 486 or 480) with a Reason header naming the cause.
* Retransmitted INVITEs are absorbed by the transaction layer and, as a second
  guard, by Call-ID/From-tag/CSeq, so they never create a second job.
* CANCEL while queued: 200 for the CANCEL, 487 for the INVITE, backend
  ``cancel``. CANCEL after placement is relayed downstream.
* In-dialog requests (ACK for 2xx, BYE, re-INVITE, ...) are relayed statelessly
  between the two hops of the call. The first BYE releases the call's slot.
* The slot is released (backend ``release``) exactly once when a placed call
  ends, unless the backend said first that the job ended (``on_job_ended``).
* Anything unreadable is answered 400 when it is a request with a readable Via,
  else dropped and counted in :class:`EdgeStats`. Nothing raises out of the edge.

Calls move through :class:`~trunkline.sip.calls.CallState` by
:data:`~trunkline.sip.calls.CALL_TABLE` only.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable

from trunkline.common.timers import TimerQueue
from trunkline.sip._proxy import (
    BRANCH_PREFIX,
    LocalAddress,
    forward_request,
    relay_target,
    stateless_branch,
)
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
from trunkline.sip.config import SipConfig
from trunkline.sip.fields import Via, header_tag, quote, uri_user
from trunkline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    parse_cseq,
    parse_message,
)
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
    build_cancel,
    make_response,
    server_key,
)

__all__ = ["SipEdge"]

log = logging.getLogger("trunkline.sip")

_PHRASES = {480: "Temporarily Unavailable", 486: "Busy Here", 503: "Service Unavailable"}
_ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"


class SipEdge:
    """One SIP admission edge. Not thread-safe; call from one event loop.

    After any call into the edge (including the ``on_*`` callbacks) drain
    :meth:`take_outgoing` and re-arm the timer to :meth:`next_deadline`.
    """

    def __init__(
        self,
        config: SipConfig,
        backend: AdmissionBackend,
        *,
        timers: TimerConfig | None = None,
        decision_grace_s: float = 0.05,
    ) -> None:
        self.config = config
        self.backend = backend
        self.stats = EdgeStats()
        self.local = LocalAddress(config.advertised_host, config.port)
        self.layer = TransactionLayer(timers)
        self._grace = decision_grace_s
        self._calls: dict[str, Call] = {}
        self._by_call_id: dict[str, Call] = {}
        self._by_job: dict[str, Call] = {}
        self._timers: TimerQueue[tuple[str, str]] = TimerQueue()
        self._ids = itertools.count(1)
        self._nonce = secrets.token_hex(3)

    # -- adapter interface -------------------------------------------------

    def bind(self, port: int) -> None:
        """Tell the edge the port it actually listens on (after binding port 0)."""
        self.local = LocalAddress(self.config.advertised_host, port)

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
        candidates = (self.layer.next_deadline(), self._timers.next_deadline())
        deadlines = [d for d in candidates if d is not None]
        return min(deadlines) if deadlines else None

    def pending_calls(self) -> int:
        """Calls whose slot is requested or held (should drop to 0 when idle)."""
        return sum(1 for c in self._calls.values() if c.slot in (Slot.REQUESTED, Slot.HELD))

    def __len__(self) -> int:
        return len(self._calls)

    def receive(self, data: bytes, source: Peer, now: float) -> None:
        """Handle one datagram or one framed stream message. Never raises."""
        self.stats.datagrams += 1
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            try:
                msg = parse_message(data, stream=source.reliable)
            except SipParseError as exc:
                self._bad_message(exc, source)
                return
            if isinstance(msg, SipResponse):
                self._on_response(msg, now)
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
                if isinstance(call, Call) and timeout.timer in (TxEvent.TIMER_B, TxEvent.TIMER_C):
                    self._downstream_timeout(call, now)
            for ref, what in self._timers.pop_due(now):
                call = self._calls.get(ref)
                if call is None:
                    continue
                if what == "decision" and call.state is CallState.QUEUED:
                    # Refuse before cancelling: a backend that answers on_refused
                    # from inside cancel() then finds the call already decided.
                    reason = (
                        f"no agent slot in pool {call.trunk.pool!r} within "
                        f"max_wait_s={call.trunk.max_wait_s:g}"
                    )
                    self._refuse(call, reason, now)
                    self._backend_cancel(call, "max_wait_exceeded")
                elif what == "cancel_guard" and call.state is CallState.PLACED:
                    why = "downstream did not answer the CANCEL"
                    self._fail_upstream(call, 487, why, "caller_cancelled", now)
                elif what == "linger" and call.state in TERMINAL:
                    self._forget(call)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in a timer")

    # -- backend callbacks -------------------------------------------------

    def on_placed(self, call_ref: str, job_id: str, worker_id: str, now: float) -> None:
        """The backend placed ``call_ref`` as ``job_id`` on ``worker_id``: forward the INVITE."""
        try:
            call = self._calls.get(call_ref)
            if call is None or call.state is not CallState.QUEUED:
                # Raced a cancel or the decision deadline: give the slot back.
                self._safe(self.backend.release, call_ref, "placed_after_call_gone")
                return
            step(call, CallEvent.PLACED)
            self._timers.clear((call.ref, "decision"))
            call.slot, call.job_id = Slot.HELD, job_id
            self._by_job[job_id] = call
            self.stats.placed += 1
            branch = f"{BRANCH_PREFIX}{self._nonce}.{next(self._ids)}"
            fwd = forward_request(
                call.invite,
                call.source,
                self.local,
                transport=call.trunk.downstream_transport,
                branch=branch,
                record_route=True,
                extra=(("X-Trunkline-Job", job_id), ("X-Trunkline-Worker", worker_id)),
            )
            call.forwarded = fwd
            call.client_tx = self.layer.send_request(fwd, call.downstream, now, context=call)
            log.debug("sip call placed", extra={"call_ref": call_ref, "job_id": job_id})
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_placed", extra={"call_ref": call_ref})

    def on_refused(self, call_ref: str, reason: str, now: float) -> None:
        """The backend could not place ``call_ref``: send the trunk's refusal naming ``reason``."""
        try:
            call = self._calls.get(call_ref)
            if call is None or call.state is not CallState.QUEUED:
                return
            call.slot = Slot.FREED
            self._refuse(call, reason, now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_refused", extra={"call_ref": call_ref})

    def on_job_ended(self, job_id: str, now: float) -> None:
        """The agent's job ended: its slot is free; a call not yet answered is ended."""
        try:
            call = self._by_job.pop(job_id, None)
            if call is None or (call.state, CallEvent.JOB_ENDED) not in CALL_TABLE:
                return
            call.slot = Slot.FREED
            if call.state is CallState.PLACED:
                self._cancel_downstream(call, now)
                self._send_final(call, 480, "agent job ended before the call was answered", now)
            step(call, CallEvent.JOB_ENDED)
            self._linger(call, now)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("sip edge failed in on_job_ended", extra={"job_id": job_id})

    # -- requests ----------------------------------------------------------

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
        to_tag = header_tag(req.headers.get("To") or "")
        if to_tag is not None and req.method not in ("ACK", "CANCEL"):
            self._in_dialog(req, source, now)
            return
        delivery, tx = self.layer.receive_request(req, key, source, now)
        if delivery is Delivery.ABSORBED:
            if req.method != "ACK":  # the ACK of a non-2xx final is expected, not a resend
                self.stats.retransmissions += 1
            return
        if delivery is Delivery.ACK or tx is None:
            self._in_dialog(req, source, now)
            return
        if req.method == "INVITE":
            self._on_invite(req, tx, source, now)
        elif req.method == "CANCEL":
            self._on_cancel(req, tx, key._replace(method="INVITE"), now)
        elif req.method == "OPTIONS":
            self._on_options(req, tx, now)
        elif req.method == "BYE":
            self.layer.respond(tx, self._resp(req, 481, "Call/Transaction Does Not Exist"), now)
        else:
            extra = (("Allow", _ALLOW),)
            self.layer.respond(tx, self._resp(req, 405, "Method Not Allowed", extra), now)

    def _on_invite(self, req: SipRequest, tx: ServerTx, source: Peer, now: float) -> None:
        call_id = req.headers.get("Call-ID") or ""
        number, _ = parse_cseq(req.headers.get("CSeq") or "")
        old = self._by_call_id.get(call_id)
        if old is not None and (old.state not in TERMINAL or number <= old.cseq):
            if old.invite.headers.get("Via") == req.headers.get("Via"):
                # Same branch after its transaction ended: a late retransmission
                # of a call we already have. Never a second job; nothing to say.
                self.stats.retransmissions += 1
                self.layer.discard(tx)
                return
            # Same Call-ID/CSeq on another branch: merged request (RFC 3261 8.2.2.2).
            self.layer.respond(tx, self._resp(req, 482, "Loop Detected"), now)
            return
        self.stats.invites += 1
        self.layer.respond(tx, make_response(req, 100, "Trying"), now)
        mf = req.headers.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            self.layer.respond(tx, self._resp(req, 483, "Too Many Hops"), now)
            return
        user = uri_user(req.uri) or uri_user(req.headers.get("To") or "")
        trunk = self.config.match_trunk(user)
        if trunk is None:
            why = (("Reason", f"SIP;cause=404;text={quote(f'no trunk lists {user!r}')}"),)
            self.layer.respond(tx, self._resp(req, 404, "Not Found", why), now)
            return
        ref = f"sip-{self._nonce}-{next(self._ids)}"
        call = Call(ref, trunk, req, source, tx, self._tag(), cseq=number)
        tx.context = call
        self._calls[ref] = call
        self._by_call_id[call_id] = call
        call.slot = Slot.REQUESTED
        self._timers.set((ref, "decision"), now + trunk.max_wait_s + self._grace)
        metadata = {
            "sip.call_id": call_id,
            "sip.from": req.headers.get("From") or "",
            "sip.to": req.headers.get("To") or "",
            "sip.called": user or "",
            "sip.trunk": trunk.name,
            "sip.source": f"{source.transport}:{source.host}:{source.port}",
        }
        try:
            self.backend.request(ref, trunk.pool, trunk.max_wait_s, metadata)
        except Exception:
            log.exception("admission backend failed on request", extra={"call_ref": ref})
            if call.state is CallState.QUEUED:
                call.slot = Slot.FREED
                self._refuse(call, "admission backend error", now)

    def _on_cancel(self, req: SipRequest, tx: ServerTx, invite_key: TxKey, now: float) -> None:
        invite_tx = self.layer.find_server(invite_key)
        call = invite_tx.context if invite_tx is not None else None
        if not isinstance(call, Call):
            self.layer.respond(tx, self._resp(req, 481, "Call/Transaction Does Not Exist"), now)
            return
        self.layer.respond(tx, make_response(req, 200, "OK", to_tag=call.to_tag), now)
        if call.state is CallState.QUEUED:
            self.stats.cancelled += 1
            step(call, CallEvent.CANCEL)
            self._timers.clear((call.ref, "decision"))
            self._backend_cancel(call, "caller_cancelled")
            self._send_final(call, 487, "caller cancelled while queued", now)
            self._linger(call, now)
        elif call.state is CallState.PLACED:
            step(call, CallEvent.CANCEL)
            self._cancel_downstream(call, now)
            self._timers.set((call.ref, "cancel_guard"), now + 64 * self.layer.timers.t1)

    def _on_options(self, req: SipRequest, tx: ServerTx, now: float) -> None:
        user = uri_user(req.uri)
        trunk = self.config.match_trunk(user) if user else None
        pools = [trunk.pool] if trunk else [t.pool for t in self.config.trunks]
        if any(self._has_capacity(p) for p in pools):
            resp = self._resp(req, 200, "OK", (("Allow", _ALLOW), ("Accept", "application/sdp")))
        else:
            retry = trunk.retry_after_s if trunk else 5
            extra = (("Retry-After", str(retry)), _reason_header(503, "no agent capacity"))
            resp = self._resp(req, 503, "Service Unavailable", extra)
        self.layer.respond(tx, resp, now)

    def _in_dialog(self, req: SipRequest, source: Peer, now: float) -> None:
        """Relay an in-dialog request (or a 2xx ACK) to the other hop of its call."""
        call = self._by_call_id.get(req.headers.get("Call-ID") or "")
        frm = header_tag(req.headers.get("From") or "")
        if call is None or call.callee_tag is None or frm not in (call.caller_tag, call.callee_tag):
            if req.method != "ACK":
                self.layer.send_stateless(
                    self._resp(req, 481, "Call/Transaction Does Not Exist"), source
                )
            else:
                self.stats.stray += 1
            return
        from_caller = frm == call.caller_tag
        mf = req.headers.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            if req.method != "ACK":
                self.layer.send_stateless(self._resp(req, 483, "Too Many Hops"), source)
            return
        target = call.downstream if from_caller else call.source
        branch = stateless_branch(req, "down" if from_caller else "up")
        fwd = forward_request(
            req, source, self.local, transport=target.transport, branch=branch, record_route=False
        )
        self.layer.send_stateless(fwd, target)
        if req.method == "BYE" and (call.state, CallEvent.BYE) in CALL_TABLE:
            step(call, CallEvent.BYE)
            self._release(call, "caller_bye" if from_caller else "downstream_bye")
            self._linger(call, now)

    # -- responses ---------------------------------------------------------

    def _on_response(self, resp: SipResponse, now: float) -> None:
        top = resp.headers.get("Via") or ""
        if f"branch={BRANCH_PREFIX}" not in top:
            self.stats.stray += 1
            return
        delivery, tx = self.layer.receive_response(resp, now)
        if delivery is Delivery.UNMATCHED:
            # A response to a request we relayed statelessly, or a 2xx
            # retransmission after the INVITE client transaction ended.
            self._relay_stateless(resp)
            return
        call = tx.context if tx is not None else None
        if delivery is not Delivery.NEW or tx is None or not isinstance(call, Call):
            return
        if tx.kind is not TxKind.ICT:
            return  # response to our CANCEL: nothing to relay
        if resp.status == 100:
            return  # hop-by-hop
        if resp.status < 200:
            if call.cancel_pending:
                call.cancel_pending = False
                self._send_cancel(call, now)
            self._relay_upstream(call, resp, now)
        elif resp.status < 300:
            if call.state in (CallState.PLACED, CallState.ANSWERED):
                call.callee_tag = header_tag(resp.headers.get("To") or "")
                step(call, CallEvent.ANSWERED)
                self._relay_upstream(call, resp, now)
            else:
                self.stats.stray += 1  # 2xx after we answered upstream ourselves
        elif call.state is CallState.PLACED:
            step(call, CallEvent.FAILED)
            self._timers.clear((call.ref, "cancel_guard"))
            self._relay_upstream(call, resp, now)
            outcome = "caller_cancelled" if resp.status == 487 else f"downstream_{resp.status}"
            self._release(call, outcome)
            self._linger(call, now)

    def _relay_upstream(self, call: Call, resp: SipResponse, now: float) -> None:
        relayed = relay_target(resp)
        if relayed is None:
            return
        st = call.server_tx
        success = 200 <= resp.status < 300
        if st.state is TxState.PROCEEDING or (success and st.state is TxState.ACCEPTED):
            self.layer.respond(st, relayed[0], now)
        elif success:
            # The upstream transaction is gone (Timer L): 2xx still goes end to end.
            self.layer.send_stateless(*relayed)

    def _relay_stateless(self, resp: SipResponse) -> None:
        relayed = relay_target(resp)
        if relayed is None:
            self.stats.stray += 1
            return
        self.layer.send_stateless(*relayed)

    # -- helpers -----------------------------------------------------------

    def _tag(self) -> str:
        return f"tl{self._nonce}{next(self._ids):x}"

    def _resp(
        self, req: SipRequest, status: int, phrase: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> SipResponse:
        return make_response(req, status, phrase, to_tag=self._tag(), extra=extra)

    def _send_final(self, call: Call, status: int, why: str, now: float) -> None:
        if call.server_tx.state is not TxState.PROCEEDING:
            return
        extra: tuple[tuple[str, str], ...] = (_reason_header(status, why),)
        if status in _PHRASES and call.trunk.retry_after_s > 0 and status != 487:
            extra = (("Retry-After", str(call.trunk.retry_after_s)), *extra)
        phrase = _PHRASES.get(status, "Request Terminated" if status == 487 else "Error")
        resp = make_response(call.invite, status, phrase, to_tag=call.to_tag, extra=extra)
        self.layer.respond(call.server_tx, resp, now)

    def _refuse(self, call: Call, reason: str, now: float) -> None:
        step(call, CallEvent.REFUSED)
        self._timers.clear((call.ref, "decision"))
        self.stats.refused += 1
        self._send_final(call, call.trunk.refusal, reason, now)
        log.info("sip call refused", extra={"call_ref": call.ref, "reason": reason})
        self._linger(call, now)

    def _fail_upstream(self, call: Call, status: int, why: str, outcome: str, now: float) -> None:
        step(call, CallEvent.FAILED)
        self._send_final(call, status, why, now)
        self._release(call, outcome)
        self._linger(call, now)

    def _downstream_timeout(self, call: Call, now: float) -> None:
        if call.state is CallState.PLACED:
            self._fail_upstream(call, 408, "downstream did not answer", "downstream_timeout", now)

    def _cancel_downstream(self, call: Call, now: float) -> None:
        ct = call.client_tx
        if ct is None or ct.state not in (TxState.CALLING, TxState.PROCEEDING):
            return
        if ct.state is TxState.CALLING:
            call.cancel_pending = True  # RFC 3261 9.1: wait for a provisional first
        else:
            self._send_cancel(call, now)

    def _send_cancel(self, call: Call, now: float) -> None:
        if call.forwarded is not None:
            self.layer.send_request(build_cancel(call.forwarded), call.downstream, now)

    def _release(self, call: Call, outcome: str) -> None:
        if call.slot is Slot.HELD:
            call.slot = Slot.FREED
            self.stats.released += 1
            if call.job_id is not None:
                self._by_job.pop(call.job_id, None)
            self._safe(self.backend.release, call.ref, outcome)

    def _backend_cancel(self, call: Call, reason: str) -> None:
        if call.slot is Slot.REQUESTED:
            call.slot = Slot.FREED
            self._safe(self.backend.cancel, call.ref, reason)

    def _has_capacity(self, pool: str) -> bool:
        try:
            return bool(self.backend.has_capacity(pool))
        except Exception:
            log.exception("admission backend failed on has_capacity", extra={"pool": pool})
            return False

    def _safe(self, fn: Callable[[str, str], None], *args: str) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("admission backend call failed", extra={"call_args": args})

    def _linger(self, call: Call, now: float) -> None:
        # Keep the record a while to absorb late retransmissions and relay BYE.
        self._timers.set((call.ref, "linger"), now + 64 * self.layer.timers.t1)

    def _forget(self, call: Call) -> None:
        self._calls.pop(call.ref, None)
        cid = call.invite.headers.get("Call-ID") or ""
        if self._by_call_id.get(cid) is call:
            del self._by_call_id[cid]
        if call.job_id is not None and self._by_job.get(call.job_id) is call:
            del self._by_job[call.job_id]
        call.server_tx.context = None
        if call.client_tx is not None:
            call.client_tx.context = None


def _reason_header(status: int, text: str) -> tuple[str, str]:
    return "Reason", f"SIP;cause={status};text={quote(text)}"
