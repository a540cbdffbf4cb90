"""The edge's table of calls, their timers, and what ends a call, sans-IO.

Theory of operation: a :class:`CallBook` owns every :class:`~trunkline.sip.calls.Call`
record (by ref, Call-ID and job id) and the per-call timers: the admission
decision deadline, the CANCEL guard, the RFC 4028 session interval, the
trunk's ``max_call_duration_s``, and the linger that keeps a finished call
for 64*T1 to absorb late retransmissions. It also performs every effect that
ends a call, so each happens the same way whoever asks: the final response
upstream, the CANCEL or the BYEs downstream, and the backend's ``cancel`` or
``release``, each exactly once (a call's ``slot`` says which is due). The
edge decides when; the book does it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from trunkline.common.timers import TimerQueue
from trunkline.sip._dialog import bye_to_caller, bye_to_downstream, session_interval
from trunkline.sip._proxy import BRANCH_PREFIX, LocalAddress
from trunkline.sip._routing import HopRouter
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
from trunkline.sip.fields import quote
from trunkline.sip.message import SipResponse
from trunkline.sip.transaction import TransactionLayer, TxState, build_cancel, make_response

__all__ = ["CallBook", "reason_header"]

log = logging.getLogger("trunkline.sip")

_PHRASES = {480: "Temporarily Unavailable", 486: "Busy Here", 503: "Service Unavailable"}
_BOUNDS = ("session", "max_duration")


class CallBook:
    """The calls of one edge. ``local`` is kept current by the edge (``bind``)."""

    def __init__(
        self,
        backend: AdmissionBackend,
        layer: TransactionLayer,
        stats: EdgeStats,
        router: HopRouter,
        local: LocalAddress,
        random: Callable[[int], bytes],
    ) -> None:
        self.backend = backend
        self.layer = layer
        self.stats = stats
        self.router = router
        self.local = local
        self._random = random
        self.calls: dict[str, Call] = {}
        self.by_call_id: dict[str, Call] = {}
        self.by_job: dict[str, Call] = {}
        # Addresses of the hops of the calls in the book, with how many calls
        # each: they may reach the edge for their dialogs even when no trunk
        # admits them (a downstream, or a caller whose trunk a reload removed).
        self.hop_hosts: Counter[str] = Counter()
        self._timers: TimerQueue[tuple[str, str]] = TimerQueue()

    def __len__(self) -> int:
        return len(self.calls)

    def pending(self) -> int:
        """Calls whose slot is requested or held (should drop to 0 when idle)."""
        return sum(1 for c in self.calls.values() if c.slot in (Slot.REQUESTED, Slot.HELD))

    # -- records and timers ------------------------------------------------

    def add(self, call: Call, decide_by: float) -> None:
        """A new call whose slot is now requested; refused at ``decide_by`` if undecided."""
        self.calls[call.ref] = call
        self.by_call_id[call.invite.headers.get("Call-ID") or ""] = call
        hosts = (call.source.host, *sorted(self.router.hosts_of(call.downstream)))
        call.hop_hosts = tuple(dict.fromkeys(hosts))
        self.hop_hosts.update(call.hop_hosts)
        call.slot = Slot.REQUESTED
        self._timers.set((call.ref, "decision"), decide_by)

    def placed(self, call: Call, job_id: str, now: float) -> None:
        """``call`` holds a slot as ``job_id`` from ``now``."""
        step(call, CallEvent.PLACED)
        self._timers.clear((call.ref, "decision"))
        call.slot, call.job_id = Slot.HELD, job_id
        self.by_job[job_id] = call
        self.stats.placed += 1
        if call.trunk.max_call_duration_s > 0:
            self._timers.set((call.ref, "max_duration"), now + call.trunk.max_call_duration_s)

    def cancelled(self, call: Call, now: float) -> None:
        """The caller cancelled ``call``: while queued it ends here (487); once
        placed the CANCEL goes downstream, guarded for 64*T1."""
        if call.state is CallState.QUEUED:
            self.stats.cancelled += 1
            step(call, CallEvent.CANCEL)
            self._timers.clear((call.ref, "decision"))
            # The final first: the backend hears which one before the cancel.
            self.send_final(call, 487, "caller cancelled while queued", now)
            self.backend_cancel(call, "caller_cancelled")
            self.linger(call, now)
        elif call.state is CallState.PLACED:
            step(call, CallEvent.CANCEL)
            self.cancel_downstream(call, now)
            self._timers.set((call.ref, "cancel_guard"), now + 64 * self.layer.timers.t1)

    def failed(self, call: Call, status: int, now: float) -> None:
        """The downstream answered ``call``'s INVITE with a non-2xx final."""
        step(call, CallEvent.FAILED)
        self._timers.clear((call.ref, "cancel_guard"))
        outcome = "caller_cancelled" if status == 487 else f"downstream_{status}"
        self.release(call, outcome)
        self.linger(call, now)

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next run."""
        return self._timers.next_deadline()

    def on_timer(self, now: float) -> None:
        """Act on every per-call timer due at ``now``."""
        for ref, what in self._timers.pop_due(now):
            call = self.calls.get(ref)
            if call is None:
                continue
            if what == "decision" and call.state is CallState.QUEUED:
                # Refuse before cancelling: a backend that answers on_refused
                # from inside cancel() then finds the call already decided.
                reason = (
                    f"no agent slot in pool {call.trunk.pool!r} within "
                    f"max_wait_s={call.trunk.max_wait_s:g}"
                )
                self.refuse(call, reason, now)
                self.backend_cancel(call, "max_wait_exceeded")
            elif what == "cancel_guard" and call.state is CallState.PLACED:
                why = "downstream did not answer the CANCEL"
                self.fail_upstream(call, 487, why, "caller_cancelled", now)
            elif what == "session":
                self.expire(call, "session expired without a refresh", "session_expired", now)
            elif what == "max_duration":
                limit = f"max_call_duration_s={call.trunk.max_call_duration_s:g}"
                self.expire(call, f"call reached {limit}", "max_call_duration", now)
            elif what == "linger" and call.state in TERMINAL:
                self.forget(call)

    # -- ending calls ------------------------------------------------------

    def session_refreshed(self, call: Call, resp: SipResponse, now: float) -> None:
        """A 2xx that sets (or, without Session-Expires, switches off) the session timer."""
        interval = session_interval(resp)
        call.session_expires_s = interval
        if interval is None:
            self._timers.clear((call.ref, "session"))
        else:
            self._timers.set((call.ref, "session"), now + interval)

    def expire(self, call: Call, why: str, outcome: str, now: float) -> None:
        """End a call that outlived its bound: BYE both ways (or CANCEL and a final
        before the answer), release the slot, end the job."""
        if (call.state, CallEvent.EXPIRED) not in CALL_TABLE:
            return
        self.stats.expired += 1
        log.info("sip call expired", extra={"call_ref": call.ref, "reason": why})
        if call.state is CallState.PLACED:
            self.cancel_downstream(call, now)
            self.send_final(call, 480, why, now)
        elif call.answer is not None:
            for build, peer in (
                (bye_to_downstream, call.downstream),
                (bye_to_caller, call.source),
            ):
                bye = build(call, self.local, self.branch(), why)
                self.layer.send_request(bye, peer, now, context=call)
        step(call, CallEvent.EXPIRED)
        self.release(call, outcome)
        self.linger(call, now)

    def branch(self) -> str:
        """A fresh, unpredictable branch of ours."""
        return f"{BRANCH_PREFIX}{self._random(8).hex()}"

    def send_final(self, call: Call, status: int, why: str, now: float) -> None:
        if call.server_tx.state is not TxState.PROCEEDING:
            return
        extra: tuple[tuple[str, str], ...] = (reason_header(status, why),)
        if status in _PHRASES and call.trunk.retry_after_s > 0 and status != 487:
            extra = (("Retry-After", str(call.trunk.retry_after_s)), *extra)
        phrase = _PHRASES.get(status, "Request Terminated" if status == 487 else "Error")
        resp = make_response(call.invite, status, phrase, to_tag=call.to_tag, extra=extra)
        self.layer.respond(call.server_tx, resp, now)
        self.final_sent(call, status)

    def final_sent(self, call: Call, status: int) -> None:
        """Tell the backend the final response ``call``'s INVITE got upstream."""
        try:
            self.backend.final_sent(call.ref, status)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("admission backend call failed", extra={"call_ref": call.ref})

    def refuse(self, call: Call, reason: str, now: float) -> None:
        step(call, CallEvent.REFUSED)
        self._timers.clear((call.ref, "decision"))
        self.stats.refused += 1
        self.send_final(call, call.trunk.refusal, reason, now)
        log.info("sip call refused", extra={"call_ref": call.ref, "reason": reason})
        self.linger(call, now)

    def fail_upstream(self, call: Call, status: int, why: str, outcome: str, now: float) -> None:
        step(call, CallEvent.FAILED)
        self.send_final(call, status, why, now)
        self.release(call, outcome)
        self.linger(call, now)

    def downstream_timeout(self, call: Call, now: float) -> None:
        if call.state is CallState.PLACED:
            self.fail_upstream(call, 408, "downstream did not answer", "downstream_timeout", now)

    def cancel_downstream(self, call: Call, now: float) -> None:
        ct = call.client_tx
        if ct is None or ct.state not in (TxState.CALLING, TxState.PROCEEDING):
            return
        if ct.state is TxState.CALLING:
            call.cancel_pending = True  # RFC 3261 9.1: wait for a provisional first
        else:
            self.send_cancel(call, now)

    def send_cancel(self, call: Call, now: float) -> None:
        if call.forwarded is not None:
            cancel = build_cancel(call.forwarded)
            self.layer.send_request(cancel, call.downstream, now, context=call)

    def release(self, call: Call, outcome: str) -> None:
        for what in _BOUNDS:
            self._timers.clear((call.ref, what))
        if call.slot is Slot.HELD:
            call.slot = Slot.FREED
            self.stats.released += 1
            if call.job_id is not None:
                self.by_job.pop(call.job_id, None)
            self.safe(self.backend.release, call.ref, outcome)

    def backend_cancel(self, call: Call, reason: str) -> None:
        if call.slot is Slot.REQUESTED:
            call.slot = Slot.FREED
            self.safe(self.backend.cancel, call.ref, reason)

    def safe(self, fn: Callable[[str, str], None], *args: str) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("admission backend call failed", extra={"call_args": args})

    def linger(self, call: Call, now: float) -> None:
        # Keep the record a while to absorb late retransmissions and relay BYE.
        for what in _BOUNDS:
            self._timers.clear((call.ref, what))
        self._timers.set((call.ref, "linger"), now + 64 * self.layer.timers.t1)

    def forget(self, call: Call) -> None:
        if self.calls.pop(call.ref, None) is call:
            self.hop_hosts.subtract(call.hop_hosts)
            for host in call.hop_hosts:
                if self.hop_hosts[host] <= 0:
                    del self.hop_hosts[host]
        cid = call.invite.headers.get("Call-ID") or ""
        if self.by_call_id.get(cid) is call:
            del self.by_call_id[cid]
        if call.job_id is not None and self.by_job.get(call.job_id) is call:
            del self.by_job[call.job_id]
        self.router.forget(call)
        if call.client_tx is not None:
            call.client_tx.context = None
        call.server_tx.context = None


def reason_header(status: int, text: str) -> tuple[str, str]:
    """A Reason header (RFC 3326) naming ``text`` for ``status``."""
    return "Reason", f"SIP;cause={status};text={quote(text)}"
