"""The scheduler's records: jobs and workers.

These are plain mutable records owned by `Scheduler`; adapters read them (for
the REST API, metrics and traces) but change them only through scheduler
events. `__slots__` keeps a worker small: thousands of them may be connected.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from trunkline.core.states import JobState


class TraceEvent(NamedTuple):
    """One line of a job's life: when, what, on which worker, and why."""

    at: float
    event: str
    worker_id: str | None = None
    detail: str | None = None


class Job:
    __slots__ = (
        "accept",
        "agent_name",
        "attributes",
        "code",
        "created_at",
        "deadline",
        "dispatch_id",
        "ended_at",
        "held",
        "id",
        "max_wait_s",
        "metadata",
        "offer_seq",
        "offered_at",
        "orphan_of",
        "placed_at",
        "queue_wait_s",
        "queued_since",
        "reason",
        "refused",
        "room",
        "running_at",
        "state",
        "trace",
        "trace_dropped",
        "wire",
        "worker_id",
    )

    def __init__(
        self,
        job_id: str,
        agent_name: str,
        room: str,
        metadata: str,
        now: float,
        max_wait_s: float,
        dispatch_id: str = "",
        attributes: dict[str, str] | None = None,
    ) -> None:
        self.id = job_id
        self.dispatch_id = dispatch_id
        self.agent_name = agent_name
        self.room = room
        self.metadata = metadata
        self.attributes = attributes or {}
        self.created_at = now
        self.max_wait_s = max_wait_s
        self.deadline = now + max_wait_s
        self.state = JobState.QUEUED
        self.reason = ""
        # A stable code for the outcome's cause when callers must tell it apart
        # (`queue_full`); "" otherwise.
        self.code = ""
        self.worker_id: str | None = None  # the worker holding the offer or the job
        # A held job's slot is reserved on `worker_id` (as an offer) but nothing
        # was sent: it waits for `Scheduler.bind` to name its room.
        self.held = False
        self.offer_seq = 0  # bumps on every offer: stale offer timers are ignored
        self.offered_at = 0.0
        # Set while the job waits in its pool's queue (and is counted in
        # `Pool.queued`); None otherwise, including before its first placement.
        self.queued_since: float | None = None
        self.queue_wait_s = 0.0  # total time spent QUEUED
        self.placed_at: float | None = None
        self.running_at: float | None = None
        self.ended_at: float | None = None
        # worker id -> that worker's state version when it refused (or ignored) us
        self.refused: dict[str, int] | None = None
        # what the accepting worker answered: participant identity, name, ...
        self.accept: AcceptInfo | None = None
        self.trace: list[TraceEvent] = [TraceEvent(now, "requested", None, None)]
        self.trace_dropped = 0  # events dropped from the middle (see `add_trace`)
        # While ORPHANED: the identity of the worker that lost it (only a worker
        # with that identity may migrate it back).
        self.orphan_of: str | None = None
        self.wire: Any = None  # adapters may cache an encoded form here

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state.value} on {self.worker_id}>"


def add_trace(job: Job, event: TraceEvent, cap: int) -> None:
    """Append `event` to the job's trace, keeping at most `cap` events (cap >= 4):
    the first `cap // 2`, then one `trace_truncated` event counting the dropped
    ones (at the time of the first dropped), then the latest. A worker that
    floods answers for a job cannot grow it, and the end is always in it."""
    trace = job.trace
    if len(trace) >= cap:
        head = cap // 2
        if job.trace_dropped:
            del trace[head + 1]  # the oldest event after the marker
            job.trace_dropped += 1
            at = trace[head].at
        else:
            at = trace[head].at
            del trace[head + 1]  # two events give way to the marker
            job.trace_dropped = 2
        trace[head] = TraceEvent(at, "trace_truncated", None, f"{job.trace_dropped} events dropped")
    trace.append(event)


class AcceptInfo(NamedTuple):
    identity: str
    name: str
    metadata: str
    attributes: dict[str, str]


# Every value `Worker.state` can take.
WORKER_STATES = ("available", "full", "draining", "benched", "suspended")


class WorkerStatus(enum.Enum):
    AVAILABLE = "available"
    FULL = "full"


class Worker:
    __slots__ = (
        "agent_name",
        "bucket",
        "capacity",
        "connected_at",
        "cooldown_until",
        "draining",
        "id",
        "identity",
        "jobs",
        "load",
        "offers",
        "reported_jobs",
        "status",
        "strikes",
        "suspended",
        "version",
    )

    def __init__(
        self,
        worker_id: str,
        agent_name: str,
        capacity: int | None,
        now: float,
        identity: str = "",
    ) -> None:
        self.id = worker_id
        # Who the adapter says this is across reconnects (each connection gets a
        # new id): a lost job may be migrated back only by the same identity.
        self.identity = identity
        self.agent_name = agent_name
        self.capacity = capacity
        self.connected_at = now
        self.status = WorkerStatus.AVAILABLE
        self.load = 0.0
        self.reported_jobs = 0
        self.draining = False
        self.offers: dict[str, Job] = {}  # offered, not yet answered
        self.jobs: dict[str, Job] = {}  # assigned, running or terminating here
        self.strikes = 0
        self.suspended = False  # too many unanswered offers; cleared by an answer
        self.cooldown_until: float | None = None  # benched after a soft refusal
        # Bumps whenever something that could change the worker's willingness
        # happens: a job ends, a status report, a backoff expires. A refusal is
        # remembered with the version it was made at.
        self.version = 0
        self.bucket = 0  # key in the pool's placement index (0: not offerable)

    @property
    def used(self) -> int:
        """Slots in use: unanswered offers + accepted-not-running + running jobs."""
        return len(self.offers) + len(self.jobs)

    @property
    def free(self) -> int:
        """Slots an offer may take now. Unknown capacity: one offer at a time."""
        if self.capacity is None:
            return 0 if self.offers else 1
        return self.capacity - len(self.offers) - len(self.jobs)

    @property
    def running(self) -> int:
        """Jobs running here (the rest of `used` is reserved: offered, accepted
        not yet running, or being terminated)."""
        return sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)

    @property
    def state(self) -> str:
        """Why the worker does or does not get offers, most decisive first:
        draining, suspended (silent offers), benched (after a refusal or
        silence), full (its own report), else available."""
        if self.draining:
            return "draining"
        if self.suspended:
            return "suspended"
        if self.cooldown_until is not None:
            return "benched"
        if self.status is WorkerStatus.FULL:
            return "full"
        return "available"

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.used}/{self.capacity}>"
