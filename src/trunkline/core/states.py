"""Job states and the one table of legal transitions between them.

A job is born QUEUED. It is OFFERED to one worker at a time; an accept makes
it ASSIGNED (slot reserved, assignment sent, not yet running); the worker's
JS_RUNNING makes it RUNNING. If its worker disconnects it becomes ORPHANED for
the reconnect grace period; a migrate brings it back to RUNNING. A terminate
request makes a placed job TERMINATING until the worker confirms the end, so the
slot stays counted until the worker has really let go of it.

Every other state is terminal: a job reaches exactly one, once, with a reason.
Any transition not in `TRANSITIONS` raises `IllegalTransition`: a bug in the
scheduler must fail loudly, never corrupt slot accounting.
"""

from __future__ import annotations

import enum


class JobState(enum.Enum):
    QUEUED = "queued"
    OFFERED = "offered"
    ASSIGNED = "assigned"
    RUNNING = "running"
    ORPHANED = "orphaned"
    TERMINATING = "terminating"
    # terminal
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    NO_CAPACITY = "no_capacity"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"

    # Filled in from the tables below, once: the scheduler checks every
    # transition, so these are plain attribute reads on the hot path instead of
    # hashing enum members (Enum.__hash__ is Python code).
    allowed: frozenset[JobState]
    active: bool
    terminal: bool


S = JobState

TERMINAL: frozenset[JobState] = frozenset(
    {S.SUCCEEDED, S.FAILED, S.REJECTED, S.NO_CAPACITY, S.WORKER_LOST, S.CANCELLED}
)

# States in which a job holds a slot on a worker (or, ORPHANED, may still hold
# one on a worker that is reconnecting): these count against pool quotas.
ACTIVE: frozenset[JobState] = frozenset(
    {S.OFFERED, S.ASSIGNED, S.RUNNING, S.ORPHANED, S.TERMINATING}
)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.OFFERED, S.NO_CAPACITY, S.CANCELLED}),
    S.OFFERED: frozenset({S.QUEUED, S.ASSIGNED, S.REJECTED, S.NO_CAPACITY, S.CANCELLED}),
    S.ASSIGNED: frozenset(
        {S.RUNNING, S.SUCCEEDED, S.FAILED, S.ORPHANED, S.TERMINATING, S.WORKER_LOST}
    ),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.ORPHANED, S.TERMINATING, S.WORKER_LOST}),
    S.ORPHANED: frozenset({S.RUNNING, S.QUEUED, S.WORKER_LOST, S.CANCELLED, S.NO_CAPACITY}),
    S.TERMINATING: frozenset({S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.REJECTED: frozenset(),
    S.NO_CAPACITY: frozenset(),
    S.WORKER_LOST: frozenset(),
    S.CANCELLED: frozenset(),
}


for _state in JobState:
    _state.allowed = TRANSITIONS[_state]
    _state.active = _state in ACTIVE
    _state.terminal = _state in TERMINAL
del _state


class IllegalTransition(RuntimeError):
    """A state change the transition table does not allow (a scheduler bug)."""


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    if new not in old.allowed:
        raise IllegalTransition(f"job {job_id}: {old.value} -> {new.value} is not allowed")
