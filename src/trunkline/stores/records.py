"""Immutable job records: what the history keeps of a job, in wall-clock time.

The scheduler's `Job` is mutable, keyed to a monotonic clock and owned by the
scheduler. A `JobRecord` is a frozen copy of it taken at one moment (usually
the end), with every time as Unix seconds, so it can be stored, sent to
another process and compared long after the scheduler forgot the job. Every
field is itself immutable and hashable (tuples, not lists or dicts): a record
handed out by a store cannot be changed by its reader, and equal records hash
equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trunkline.core import Job

Attributes = tuple[tuple[str, str], ...]


def freeze_attributes(attrs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Attributes:
    """Attributes in their one canonical form: (key, value) pairs sorted by key,
    so two records with the same attributes compare equal whatever the order
    they were set (or read back from a database) in."""
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return tuple(sorted((str(k), str(v)) for k, v in items))


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One line of a job's life: when (Unix seconds), what, on which worker, why."""

    at: float
    event: str
    worker_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class SipCallRecord:
    """The SIP call a job served, for calls that came in through the SIP edge.

    `final_status` is the final response code the edge sent upstream (200 for an
    answered call, 486/503/... for a refusal), None if none was sent."""

    call_id: str
    from_number: str
    to_number: str
    trunk: str
    final_status: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """A job as the history keeps it. Times are Unix seconds (None: the step was
    not reached); `state` is a `JobState` value; `attributes` are sorted
    (key, value) pairs (see `freeze_attributes`); `trace` is oldest first.

    Fields are keyword-only. A store keeps only ended records (`ended_at`
    set); live jobs may still be turned into records (`from_job`) to be shown
    next to stored ones. `replica_id` names the replica the worker ran in, when
    known; `sip` is set for calls that came in through the SIP edge."""

    job_id: str
    dispatch_id: str = ""
    agent_name: str
    room: str
    metadata: str = ""
    attributes: Attributes = ()
    state: str
    reason: str = ""
    worker_id: str | None = None
    replica_id: str | None = None
    created_at: float
    placed_at: float | None = None
    running_at: float | None = None
    ended_at: float | None = None
    queue_wait_s: float = 0.0
    max_wait_s: float
    trace: tuple[TraceRecord, ...] = ()
    sip: SipCallRecord | None = None

    def __post_init__(self) -> None:
        # A list passed by mistake would make the "immutable" record mutable
        # through its trace or attributes; normalise instead of trusting types.
        if not isinstance(self.trace, tuple):
            object.__setattr__(self, "trace", tuple(self.trace))
        if not isinstance(self.attributes, tuple):
            object.__setattr__(self, "attributes", freeze_attributes(self.attributes))

    @property
    def attributes_dict(self) -> dict[str, str]:
        """The attributes as a fresh dict (changing it does not change the record)."""
        return dict(self.attributes)

    @classmethod
    def from_job(
        cls,
        job: Job,
        wall_offset: float,
        *,
        replica_id: str | None = None,
        sip: SipCallRecord | None = None,
    ) -> JobRecord:
        """A snapshot of `job` now; scheduler times `t` become `t + wall_offset`
        (the dispatcher's offset from its monotonic clock to Unix time). Works for
        live jobs too: steps not reached yet are None."""

        def wall(t: float | None) -> float | None:
            return None if t is None else t + wall_offset

        return cls(
            job_id=job.id,
            dispatch_id=job.dispatch_id,
            agent_name=job.agent_name,
            room=job.room,
            metadata=job.metadata,
            attributes=freeze_attributes(job.attributes),
            state=job.state.value,
            reason=job.reason,
            worker_id=job.worker_id,
            created_at=job.created_at + wall_offset,
            placed_at=wall(job.placed_at),
            running_at=wall(job.running_at),
            ended_at=wall(job.ended_at),
            queue_wait_s=job.queue_wait_s,
            max_wait_s=job.max_wait_s,
            trace=tuple(
                TraceRecord(ev.at + wall_offset, ev.event, ev.worker_id, ev.detail)
                for ev in job.trace
            ),
            replica_id=replica_id,
            sip=sip,
        )
