"""The admission backend protocol: what the SIP edge asks of the scheduler.

Theory of operation: the edge never imports the scheduler. The server wires an
object satisfying :class:`AdmissionBackend` into :class:`~trunkline.sip.edge.SipEdge`
and routes the scheduler's answers back through the edge's ``on_placed`` /
``on_refused`` / ``on_job_ended`` (in the asyncio adapter, through
:class:`~trunkline.runtime.sip_server.SipServer`, which also supplies the clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["AdmissionBackend"]


class AdmissionBackend(Protocol):
    """What the edge needs from the scheduler. Calls must not raise; ids are opaque.

    After :meth:`request` the backend calls exactly one of ``edge.on_placed`` or
    ``edge.on_refused`` for that ``call_ref`` (synchronously or later). The edge
    calls :meth:`cancel` when it no longer wants the job (caller hung up, or the
    decision took longer than ``max_wait_s`` + grace); a placement that races a
    cancel is released by the edge. :meth:`release` is called once when a placed
    call ends, with its SIP outcome for the job's trace, unless the backend first
    reported the job ended. ``cancel`` and ``release`` of unknown refs are no-ops.
    :meth:`final_sent` is called once per call, with the final response the edge
    sent upstream (its own refusal, 487, 480, or the downstream's final it
    relayed), before the edge calls ``cancel`` or ``release`` for that call.
    """

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        """Ask for a slot in ``pool`` within ``max_wait_s`` seconds."""

    def cancel(self, call_ref: str, reason: str) -> None:
        """Withdraw a request not yet answered; free its place in the queue."""

    def release(self, call_ref: str, outcome: str) -> None:
        """A placed call ended: free its slot and record ``outcome``."""

    def final_sent(self, call_ref: str, status: int) -> None:
        """The edge sent ``status`` upstream as the final response to the INVITE."""

    def has_capacity(self, pool: str) -> bool:
        """True if a call for ``pool`` would be placed now (OPTIONS health)."""
