"""The SIP edge's admission backend: calls become jobs on the real scheduler.

An INVITE's `request` creates a job in the trunk's pool with the trunk's
`max_wait_s`. When a worker accepts it (the assignment is sent) the edge is
told `on_placed` and forwards the INVITE downstream; if the job ends first
(no capacity in time, rejected) the edge is told `on_refused` with the job's
reason, which goes into the SIP Reason header. A placed call's job ending
tells the edge `on_job_ended`; the call ending first (BYE, CANCEL, downstream
failure) terminates the job. The SIP outcome is written into the job's trace.

The job carries the call's identity (`SipCallRecord`: Call-ID, the From and
To numbers, the trunk) from its request, and the final response the edge
sent upstream as the edge reports it (`final_sent`, which comes before the
cancel or release that may end the job, and from inside `job_ended` for a
refusal or a job that ended before the answer), so the ended record has it.

A call to a trunk whose downstream is LiveKit SIP (`sip.downstream_kind` in
the request's metadata) is requested with `hold=True`: the slot is held
without an offer and the edge forwards the INVITE at once (`job_placed` with
`job.held`); the room binder (`runtime/room_binding.py`) then waits for the
room LiveKit SIP makes for the call and binds the job there, or cancels it
at the trunk's `room_bind_timeout_s`. The edge hears `on_placed` once per
call, however often the held job is placed (re-placed when its worker left,
assigned after the bind).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from trunkline.core import Job, JobState
from trunkline.runtime.dispatcher import Dispatcher, new_id
from trunkline.runtime.room_binding import RoomBinding
from trunkline.sip.fields import uri_user
from trunkline.stores import SipCallRecord


def sip_call(metadata: Mapping[str, str]) -> SipCallRecord:
    """The call's identity from the metadata the edge sends with a request:
    numbers are the user parts of the From URI and of the called URI."""
    to_number = metadata.get("sip.called") or uri_user(metadata.get("sip.to", "")) or ""
    return SipCallRecord(
        call_id=metadata.get("sip.call_id", ""),
        from_number=uri_user(metadata.get("sip.from", "")) or "",
        to_number=to_number,
        trunk=metadata.get("sip.trunk", ""),
    )


class EdgeCallbacks(Protocol):
    def on_placed(self, call_ref: str, job_id: str, worker_id: str) -> None: ...

    def on_refused(self, call_ref: str, reason: str) -> None: ...

    def on_job_ended(self, job_id: str) -> None: ...


class SchedulerAdmission:
    """Implements `trunkline.sip.AdmissionBackend` and `JobObserver`."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher
        self.edge: EdgeCallbacks | None = None
        self.binding: RoomBinding | None = None  # set when a trunk goes to LiveKit SIP
        self._job_of_call: dict[str, str] = {}
        self._call_of_job: dict[str, str] = {}
        self._told: set[str] = set()  # calls whose edge heard on_placed
        self._holds: dict[str, tuple[str, float]] = {}  # held job -> (Call-ID, bind timeout)
        dispatcher.add_job_observer(self)

    # --------------------------------------------------- AdmissionBackend

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        job_id = new_id("AJ_")
        self._job_of_call[call_ref] = job_id
        self._call_of_job[job_id] = call_ref
        d = self._d
        hold = self.binding is not None and metadata.get("sip.downstream_kind") == "livekit"
        if hold:
            timeout = float(metadata.get("sip.room_bind_timeout_s") or 10.0)
            self._holds[job_id] = (metadata.get("sip.call_id", ""), timeout)
        # The dispatcher calls job_placed / job_ended synchronously when the job
        # is placed or refused at once, so the edge may hear back inside here.
        d.request(
            pool,
            room=f"sip-{call_ref}",
            metadata=json.dumps(dict(metadata)),
            max_wait_s=max_wait_s,
            job_id=job_id,
            sip=sip_call(metadata),
            hold=hold,
        )

    def _forget(self, call_ref: str) -> str | None:
        """Drop the call's link to its job (returned); the job's later events
        then no longer reach the edge."""
        job_id = self._job_of_call.pop(call_ref, None)
        if job_id is not None:
            self._call_of_job.pop(job_id, None)
        self._told.discard(call_ref)
        return job_id

    def cancel(self, call_ref: str, reason: str) -> None:
        # The edge has decided this call: forget it first, so the job ending
        # below does not call back into the edge (on_refused) for it.
        job_id = self._forget(call_ref)
        if job_id is not None:
            d = self._d
            d.annotate(job_id, "sip_cancel", reason)
            d.cancel(job_id, f"SIP call ended before placement: {reason}")

    def release(self, call_ref: str, outcome: str) -> None:
        # A job that ended first has been forgotten already (job_ended), so
        # the call's outcome is written into live jobs only: an ended job's
        # record is immutable.
        job_id = self._forget(call_ref)
        if job_id is None:
            return
        d = self._d
        if d.annotate(job_id, "sip_call_ended", outcome):
            d.cancel(job_id, f"SIP call ended: {outcome}")

    def final_sent(self, call_ref: str, status: int) -> None:
        job_id = self._job_of_call.get(call_ref)
        if job_id is not None:
            self._d.sip_final(job_id, status)

    def has_capacity(self, pool: str) -> bool:
        return self._d.pool_has_capacity(pool)

    # ------------------------------------------------------- JobObserver

    def job_placed(self, job: Job) -> None:
        call_ref = self._call_of_job.get(job.id)
        if call_ref is None or self.edge is None or call_ref in self._told:
            return
        hold = self._holds.get(job.id)
        binding = self.binding
        if (
            job.held
            and hold is not None
            and binding is not None
            and not binding.held(job.id, hold[0], hold[1])
        ):
            # Refused as any placement failure is (the edge still waits).
            self._d.cancel(job.id, "too many SIP calls waiting for their LiveKit room")
            return
        self._told.add(call_ref)
        self.edge.on_placed(call_ref, job.id, job.worker_id or "")

    def job_ended(self, job: Job) -> None:
        if self._holds.pop(job.id, None) is not None and self.binding is not None:
            self.binding.released(job.id)
        call_ref = self._call_of_job.get(job.id)
        if call_ref is None or self.edge is None:
            return
        # Forgotten after the edge is told: the final it sends from there
        # (`final_sent`) still reaches the ending job's record.
        try:
            if job.placed_at is not None or call_ref in self._told:  # edge heard on_placed
                self.edge.on_job_ended(job.id)
            else:
                reason = job.reason if job.state is not JobState.CANCELLED else "cancelled"
                self.edge.on_refused(call_ref, reason)
        finally:
            self._forget(call_ref)
