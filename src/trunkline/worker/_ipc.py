"""Messages between the worker's main process and its job processes.

Theory of operation: each job process owns one end of a `multiprocessing` pipe.
It announces `ProcessReady` once `prewarm_fnc` ran (or `ProcessFailed`), waits
for exactly one `StartJob` (or for the pipe to close, which means "exit"), and
ends by sending one `JobDone`. The main process may send `ShutdownJob` at any
time after `StartJob`. The pipe closing on either side means the peer is gone.
All messages are plain picklable values; protobufs travel as bytes.
"""

from __future__ import annotations

import dataclasses

from ._job import AcceptArguments


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessReady:
    """The process ran `prewarm_fnc` and waits for a job."""

    pid: int
    prewarm_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessFailed:
    """`prewarm_fnc` raised; the process exits without taking a job."""

    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class StartJob:
    """Run this job now (`job` is a serialized `livekit.protocol.agent.Job`)."""

    job: bytes
    url: str
    token: str
    worker_id: str
    accept: AcceptArguments


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownJob:
    """End the running job: cancel the entrypoint and run shutdown callbacks."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class JobDone:
    """The job's outcome: success, or failure with a message a user can act on."""

    ok: bool
    error: str = ""
    reason: str = ""


ToChild = StartJob | ShutdownJob
FromChild = ProcessReady | ProcessFailed | JobDone
