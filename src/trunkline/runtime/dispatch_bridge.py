"""The Dispatcher's commands for the LiveKit bridge's jobs: jobs an upstream
LiveKit server offers (`request_bridged`), their held assignments
(`bridge_assigned`), claims on upstream offers (`add_upstream_claim`), and
jobs a migrate adopts after a restart (`set_adopter`). `Dispatcher`
(runtime/dispatcher.py) inherits them; the state they touch is its own, set
up in its `__init__`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from livekit.protocol import agent

from trunkline.core import DuplicateJob, Job, JobState, Scheduler
from trunkline.runtime.dispatch_ports import (
    Bridged,
    BridgeLink,
    Fence,
    declined,
    job_proto,
    new_id,
    notify_value,
)

log = logging.getLogger("trunkline.dispatch")


class BridgeCommands:
    """The bridge's half of the Dispatcher's commands (see the module docstring)."""

    _sched: Scheduler
    _fence: Fence | None
    _bridged: dict[str, Bridged]
    _claims: list[Callable[[agent.Job], str | None]]
    _adopter: Callable[[Job], BridgeLink | None] | None

    if TYPE_CHECKING:  # the Dispatcher's own (never shadowed at run time)

        def now(self) -> float: ...
        def flush(self) -> None: ...
        def _send_assignment(self, worker_id: str, job: Job) -> None: ...

    def set_adopter(self, adopt: Callable[[Job], BridgeLink | None] | None) -> None:
        """`adopt(job)` sees each job a migrate adopts (this server had no record
        of it: it restarted), once, before its first action; a link returned
        makes it a bridged job of that link from then on (the bridge names it
        upstream and reports its end there)."""
        self._adopter = adopt

    def request_bridged(self, job_pb: agent.Job, link: BridgeLink, max_wait_s: float) -> Job:
        """A job an upstream LiveKit server offered to the bridge, placed under
        every rule `request` follows, with the upstream's job id; the worker is
        offered `job_pb` as it came (room, participant, type). When the worker
        accepts, `link.job_accepted(job)` is called and its assignment is held
        until `bridge_assigned` brings the upstream's URL and token; `link`
        also hears `job_running` and `job_ended`. Raises `DuplicateJob`."""
        if self._fence is not None and not self._fence.may_act(job_pb.agent_name):
            raise self._fence.refusal(job_pb.agent_name)
        job_id = job_pb.id
        if job_id in self._sched.jobs:
            raise DuplicateJob(f"job {job_id} is already live")
        for claim in self._claims:
            why = notify_value(claim, job_pb)
            if why:
                return declined(job_pb, why, self.now())
        self._bridged[job_id] = Bridged(job_pb, link)
        try:
            job = self._sched.request(
                self.now(),
                job_id,
                job_pb.agent_name,
                room=job_pb.room.name or f"room-{new_id('')}",
                metadata=job_pb.metadata,
                max_wait_s=max_wait_s,
                dispatch_id=job_pb.dispatch_id,
                attributes=dict(job_pb.attributes) or None,
            )
        except Exception:
            self._bridged.pop(job_id, None)
            raise
        self.flush()
        return job

    def bridge_assigned(self, job_id: str, url: str, token: str) -> bool:
        """The upstream's `JobAssignment` for a bridged job: the worker's held
        assignment goes out carrying that URL and token. False (nothing sent)
        if the job is not live, not bridged, already assigned, or no longer
        waiting for it (cancelled meanwhile)."""
        b = self._bridged.get(job_id)
        job = self._sched.jobs.get(job_id)
        if b is None or job is None or b.token or not b.held:
            return False
        b.url, b.token, b.held = url, token, False
        if job.state is not JobState.ASSIGNED or job.worker_id is None:
            return False
        self._send_assignment(job.worker_id, job)
        return True

    def add_upstream_claim(self, claim: Callable[[agent.Job], str | None]) -> None:
        """`claim(job_pb)` sees each upstream offer first: a reason returned
        means the offer is served otherwise (the SIP room binder: the call's
        held job), and `request_bridged` returns a job ended `rejected` with
        it, never filed (the bridge answers `terminate=true`)."""
        self._claims.append(claim)

    def _adopted(self, job_ids: list[str]) -> None:
        assert self._adopter is not None
        for job_id in job_ids:
            job = self._sched.jobs.get(job_id)
            if job is None or job_id in self._bridged:
                continue  # not adopted (over capacity or quota: terminated)
            try:
                link = self._adopter(job)
            except Exception:
                log.exception("adopter failed", extra={"job_id": job_id})
                continue
            if link is not None:
                self._bridged[job_id] = Bridged(job_proto(job), link)
