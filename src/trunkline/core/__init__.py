"""trunkline's sans-IO core: scheduler, placement, queues and policies.

Nothing in this package performs I/O or reads a clock: every entry point takes
`now` and returns (or queues) actions for an adapter to carry out.
"""

from trunkline.core.actions import (
    Action,
    JobEnded,
    JobRunning,
    PoolForgotten,
    SendAssignment,
    SendOffer,
    SendTermination,
)
from trunkline.core.config import Limits, Placement, PoolConfig, agent_name_problem
from trunkline.core.counters import FORGOTTEN_POOL
from trunkline.core.entities import AcceptInfo, Job, TraceEvent, Worker, WorkerStatus
from trunkline.core.scheduler import DuplicateJob, Scheduler, UnknownWorker
from trunkline.core.states import TERMINAL, IllegalTransition, JobState

__all__ = [
    "FORGOTTEN_POOL",
    "TERMINAL",
    "AcceptInfo",
    "Action",
    "DuplicateJob",
    "IllegalTransition",
    "Job",
    "JobEnded",
    "JobRunning",
    "JobState",
    "Limits",
    "Placement",
    "PoolConfig",
    "PoolForgotten",
    "Scheduler",
    "SendAssignment",
    "SendOffer",
    "SendTermination",
    "TraceEvent",
    "UnknownWorker",
    "Worker",
    "WorkerStatus",
    "agent_name_problem",
]
