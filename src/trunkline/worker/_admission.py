"""`Admission`: which offers this worker takes, and the availability it reports.

Theory of operation: slots are counted here, in one place: `used = running +
reserved`, where a reservation is an offer being decided by `request_fnc` or
accepted and waiting for its assignment. An offer is refused (`available=false,
terminate=false`) before the application sees it when that would exceed
`max_jobs`, when draining, or when load is at the threshold
(`_policy.decide_availability`), and when the same job already holds a slot
here. An accepted job runs once the server's `JobAssignment` arrives (within
`assignment_timeout`); the job that runs is the offered one, with URL and
token from the assignment. The reservation turns into a running job
(`_jobs.JobRunner.launch`) with no await in between, so the count never dips.

An offer's answer belongs to the session it arrived on: if that session is
gone, nothing is sent, and an accepted offer still waiting for its assignment
fails with `AssignmentTimeoutError` (the server has given the job up).

Status (`UpdateWorkerStatus`, from `_policy.compute_status`) goes out on each
`report_status()` (the session's tick) and at once when availability or the
draining flag changes; each new session gets one at registration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from livekit.protocol import agent

from ._job import ATTRIBUTE_AGENT_NAME, AcceptArguments, AssignmentTimeoutError, JobRequest
from ._jobs import JobRunner
from ._options import WorkerOptions
from ._policy import (
    Availability,
    Refusal,
    StatusReport,
    compute_status,
    decide_availability,
    slot_load,
)
from ._types import Link

logger = logging.getLogger("trunkline.worker")


async def _accept_all(req: JobRequest) -> None:
    await req.accept()


class Admission:
    """The slot ledger, the offers being decided, and the worker's status.

    `link` is the server session (sends, the current session, the worker id);
    `jobs` the running jobs reservations turn into; `load` the application's
    load sampler (None: the fraction of slots in use). The owner feeds it:
    `answer()` per offer (as a background task), `assign()` per assignment,
    `session_started()` / `session_lost()` per session, `job_ended()` when a
    running job ended, `report_status()` periodically.
    """

    def __init__(
        self,
        opts: WorkerOptions,
        link: Link,
        jobs: JobRunner,
        *,
        load: Callable[[], float] | None = None,
    ) -> None:
        self._opts = opts
        self._link = link
        self._jobs = jobs
        self._load = load
        self._reserved: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, asyncio.Future[agent.JobAssignment]] = {}
        self._changed = asyncio.Event()
        self._draining = False
        self._last_status: tuple[Availability, bool] | None = None
        self._last_load = 0.0

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def used_slots(self) -> int:
        """Running jobs plus offers being decided or awaiting assignment."""
        return len(self._jobs) + sum(self._reserved.values())

    def start_draining(self) -> None:
        """Refuse every offer from now on and report the worker full and draining."""
        self._draining = True
        self.status_changed()

    async def wait_idle(self, limit: float) -> bool:
        """Wait until no job runs and no offer holds a slot; False after `limit` s."""
        try:
            async with asyncio.timeout(limit):
                while self._jobs or self._reserved:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # -- offers -------------------------------------------------------------------

    async def answer(self, job: agent.Job, session_no: int) -> None:
        """Decide one offer that arrived on session `session_no`, asking `request_fnc`
        if the worker may take it; returns once it was refused, or accepted and
        launched (or given up)."""
        refusal: Refusal | None
        if job.id in self._jobs or self._reserved[job.id]:
            refusal = Refusal.DUPLICATE  # running it twice would double-book the call
        else:
            refusal = decide_availability(
                draining=self._draining,
                used_slots=self.used_slots,
                max_jobs=self._opts.max_jobs,
                load=self._sample_load(),
                load_threshold=self._opts.load_threshold,
            )
        if refusal is not None:
            self._send_availability(job.id, session_no, available=False, terminate=False)
            logger.info(
                "job offer refused",
                extra={"job_id": job.id, "reason": refusal.value, "used_slots": self.used_slots},
            )
            return
        self._reserved[job.id] += 1
        self.status_changed()
        launched = False

        async def on_accept(args: AcceptArguments) -> None:
            nonlocal launched
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[agent.JobAssignment] = loop.create_future()
            if not self._send_availability(
                job.id, session_no, available=True, terminate=False, accept=args
            ):
                raise AssignmentTimeoutError(f"connection lost before job {job.id} was accepted")
            self._pending[job.id] = fut
            try:
                assignment = await asyncio.wait_for(fut, self._opts.assignment_timeout)
            except TimeoutError:
                if self._pending.get(job.id) is fut:
                    del self._pending[job.id]
                logger.warning("job assignment timed out", extra={"job_id": job.id})
                raise AssignmentTimeoutError(
                    f"no assignment for job {job.id} within {self._opts.assignment_timeout:g}s"
                ) from None
            launched = True
            await self._launch(job, assignment, args)

        async def on_reject(terminate: bool) -> None:
            self._send_availability(job.id, session_no, available=False, terminate=terminate)
            logger.info("job offer rejected", extra={"job_id": job.id, "terminate": terminate})

        req = JobRequest(job, on_accept=on_accept, on_reject=on_reject)
        try:
            await (self._opts.request_fnc or _accept_all)(req)
        except AssignmentTimeoutError:
            pass  # logged where it happened; the slot is released below
        except Exception as exc:
            logger.exception("request_fnc failed", extra={"job_id": job.id, "error": str(exc)})
        finally:
            if not req.answered:
                logger.warning("request_fnc did not answer, refusing", extra={"job_id": job.id})
                await req.reject(terminate=False)
            if not launched:
                self._release(job.id)

    def assign(self, assignment: agent.JobAssignment) -> None:
        """The server assigned an accepted job: let its `accept()` launch it."""
        fut = self._pending.pop(assignment.job.id, None)
        if fut is not None and not fut.done():
            fut.set_result(assignment)
        else:
            logger.warning("assignment for unknown job", extra={"job_id": assignment.job.id})

    def cancel_unassigned(self, job_id: str) -> None:
        """The server ended a job before assigning it: its `accept()` fails."""
        fut = self._pending.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                AssignmentTimeoutError(f"job {job_id} was terminated before assignment")
            )
        else:
            logger.debug("termination for unknown job", extra={"job_id": job_id})

    def cancel_all(self) -> None:
        """Closing: cancel every `accept()` still waiting for its assignment."""
        for fut in self._pending.values():
            fut.cancel()

    def session_started(self) -> None:
        """A new session is up: it has not heard the worker's status yet."""
        self._last_status = None
        self.status_changed()

    def session_lost(self) -> None:
        """The session ended: offers accepted on it will not be assigned."""
        for job_id, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(
                    AssignmentTimeoutError(f"connection lost before job {job_id} was assigned")
                )
        self._pending.clear()

    def job_ended(self) -> None:
        """A running job ended: its slot is free."""
        self._changed.set()
        self.status_changed()

    def _send_availability(
        self,
        job_id: str,
        session_no: int,
        *,
        available: bool,
        terminate: bool,
        accept: AcceptArguments | None = None,
    ) -> bool:
        if not self._link.connected or session_no != self._link.session_no:
            return False  # the offer died with its session
        msg = agent.WorkerMessage()
        resp = msg.availability
        resp.job_id = job_id
        resp.available = available
        resp.terminate = terminate
        if accept is not None:
            resp.participant_identity = accept.identity
            resp.participant_name = accept.name
            resp.participant_metadata = accept.metadata
            resp.participant_attributes[ATTRIBUTE_AGENT_NAME] = self._opts.agent_name
            resp.participant_attributes.update(accept.attributes)
        self._link.send(msg)
        return True

    def _release(self, job_id: str) -> None:
        self._reserved[job_id] -= 1
        if self._reserved[job_id] <= 0:
            del self._reserved[job_id]
        self._changed.set()
        self.status_changed()

    async def _launch(
        self, job: agent.Job, assignment: agent.JobAssignment, args: AcceptArguments
    ) -> None:
        """Turn the reservation into a running job; returns once it started (or failed to)."""
        launched = self._jobs.launch(
            job,
            url=assignment.url or self._opts.ws_url,
            token=assignment.token,
            accept=args,
            worker_id=self._link.worker_id,
        )
        # Reservation → running with no await in between: the slot count never dips.
        self._release(job.id)
        await asyncio.shield(launched)

    # -- status -------------------------------------------------------------------

    def report_status(self) -> None:
        """Send the current status, changed or not (the periodic report)."""
        self._send_status(self._status())

    def status_changed(self) -> None:
        """Send the status if availability or draining differ from the last one sent."""
        report = self._status()
        if (report.availability, report.draining) != self._last_status:
            self._send_status(report)

    def _sample_load(self) -> float:
        if self._load is None:
            return slot_load(self.used_slots, self._opts.max_jobs)
        try:
            self._last_load = float(self._load())
        except Exception as exc:
            logger.exception("load_fnc failed", extra={"error": str(exc)})
        return self._last_load

    def _status(self) -> StatusReport:
        return compute_status(
            draining=self._draining,
            used_slots=self.used_slots,
            running_jobs=len(self._jobs),
            max_jobs=self._opts.max_jobs,
            load=self._sample_load(),
            load_threshold=self._opts.load_threshold,
        )

    def _send_status(self, report: StatusReport) -> None:
        if not self._link.connected:
            return
        self._last_status = (report.availability, report.draining)
        msg = agent.WorkerMessage()
        update = msg.update_worker
        update.status = (
            agent.WorkerStatus.WS_FULL
            if report.availability is Availability.FULL
            else agent.WorkerStatus.WS_AVAILABLE
        )
        update.load = report.load
        update.job_count = report.job_count
        update.draining = report.draining
        self._link.send(msg)
