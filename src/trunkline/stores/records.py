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

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from trunkline.core import Job

Attributes = tuple[tuple[str, str], ...]


def freeze_attributes(attrs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Attributes:
    """Attributes in their one canonical form: (key, value) pairs sorted by key,
    so two records with the same attributes compare equal whatever the order
    they were set (or read back from a database) in."""
    if not attrs:
        return ()  # most jobs have none: skip the sort and the generator
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return tuple(sorted((str(k), str(v)) for k, v in items))


class TraceRecord(NamedTuple):
    """One line of a job's life: when (Unix seconds), what, on which worker, why.

    A named tuple, like the core's `TraceEvent` it is copied from: immutable
    and hashable, and a third of the cost of a frozen dataclass to build
    (every ended job converts its whole trace)."""

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
        off = wall_offset
        # Filled through each field's slot setter instead of the generated
        # __init__: its keyword parsing, frozen `object.__setattr__` per field
        # and __post_init__ checks cost 2.5x as much, twice per job (the 201
        # snapshot and the ended record), and every value here is already
        # immutable. Same record, same equality and hash. (The unpacking
        # raises if a field is added and not set here.)
        (
            set_job_id,
            set_dispatch_id,
            set_agent_name,
            set_room,
            set_metadata,
            set_attributes,
            set_state,
            set_reason,
            set_worker_id,
            set_replica_id,
            set_created_at,
            set_placed_at,
            set_running_at,
            set_ended_at,
            set_queue_wait_s,
            set_max_wait_s,
            set_trace,
            set_sip,
        ) = _SLOT_SETTERS
        rec = _new(cls)
        set_job_id(rec, job.id)
        set_dispatch_id(rec, job.dispatch_id)
        set_agent_name(rec, job.agent_name)
        set_room(rec, job.room)
        set_metadata(rec, job.metadata)
        attrs = job.attributes
        set_attributes(rec, freeze_attributes(attrs) if attrs else ())
        # `_value_` is what the enum's `value` property returns, read without
        # that Python-level descriptor call.
        set_state(rec, job.state._value_)
        set_reason(rec, job.reason)
        set_worker_id(rec, job.worker_id)
        set_replica_id(rec, replica_id)
        set_created_at(rec, job.created_at + off)
        t = job.placed_at
        set_placed_at(rec, None if t is None else t + off)
        t = job.running_at
        set_running_at(rec, None if t is None else t + off)
        t = job.ended_at
        set_ended_at(rec, None if t is None else t + off)
        set_queue_wait_s(rec, job.queue_wait_s)
        set_max_wait_s(rec, job.max_wait_s)
        set_trace(
            rec, tuple([_trace_new(TraceRecord, (at + off, e, w, d)) for at, e, w, d in job.trace])
        )
        set_sip(rec, sip)
        return rec


_new = object.__new__
_trace_new = tuple.__new__
# Each field's slot setter, in declaration order (what `from_job` fills).
_SLOT_SETTERS: tuple[Callable[[Any, Any], None], ...] = tuple(
    JobRecord.__dict__[f.name].__set__ for f in dataclasses.fields(JobRecord)
)


# The wire form: a record as plain tuples of str, float, int and None, which
# `marshal` (C, several times faster than pickle for this shape) writes and
# reads. It is how records reach the history writer process
# (`trunkline.stores.offload`); `marshal` is for trusted peers only, and that
# pipe is private to the server and its child.
WireRecord = tuple[Any, ...]
_as_tuple: Callable[[Iterable[Any]], tuple[Any, ...]] = tuple
_PLAIN_SETTERS = _SLOT_SETTERS[:-2]  # every field but trace and sip, in order
_SET_TRACE, _SET_SIP = _SLOT_SETTERS[-2:]


def to_wire(r: JobRecord) -> WireRecord:
    """`r` as the plain tuple `from_wire` turns back into an equal record."""
    s = r.sip
    return (
        r.job_id, r.dispatch_id, r.agent_name, r.room, r.metadata, r.attributes,
        r.state, r.reason, r.worker_id, r.replica_id, r.created_at, r.placed_at,
        r.running_at, r.ended_at, r.queue_wait_s, r.max_wait_s,
        _as_tuple(map(_as_tuple, r.trace)),
        None if s is None else (s.call_id, s.from_number, s.to_number, s.trunk, s.final_status),
    )  # fmt: skip


def from_wire(w: WireRecord) -> JobRecord:
    """The record `to_wire` wrote. Raises ValueError for a tuple of the wrong
    shape (the fields' own types are the sender's, a trusted peer's)."""
    if len(w) != len(_SLOT_SETTERS):
        raise ValueError(f"a wire record has {len(w)} fields, not {len(_SLOT_SETTERS)}")
    rec = _new(JobRecord)
    for set_field, value in zip(_PLAIN_SETTERS, w, strict=False):
        set_field(rec, value)
    _SET_TRACE(rec, tuple([_trace_new(TraceRecord, t) for t in w[-2]]))
    sip = w[-1]
    _SET_SIP(rec, None if sip is None else SipCallRecord(*sip))
    return rec
