"""What the scheduler asks its adapter to do.

The adapter drains `Scheduler.take_actions()` after each event and carries them
out in order: send a frame, wake a waiting HTTP request, record metrics.
"""

from __future__ import annotations

from typing import NamedTuple

from trunkline.core.entities import Job


class SendOffer(NamedTuple):
    """Send `AvailabilityRequest{job}` to the worker."""

    worker_id: str
    job: Job


class SlotHeld(NamedTuple):
    """A held job's slot is reserved on the worker; nothing is sent to it until
    the job is bound to its room (`Scheduler.bind`, then a `SendOffer`)."""

    worker_id: str
    job: Job


class SendAssignment(NamedTuple):
    """Send `JobAssignment{job, url, token}` to the worker that accepted."""

    worker_id: str
    job: Job


class SendTermination(NamedTuple):
    """Send `JobTermination{job_id}`: the worker must stop running this job."""

    worker_id: str
    job_id: str


class JobRunning(NamedTuple):
    """The job is running on a worker (callers waiting for it may return)."""

    job: Job


class JobEnded(NamedTuple):
    """The job reached its terminal state; emitted exactly once per job."""

    job: Job


class PoolForgotten(NamedTuple):
    """A pool made for an agent name nobody configured went idle (no worker, no
    job) and was dropped; the adapter drops whatever it keeps per pool name
    (latency histograms), so made-up agent names cannot pile up. (The job
    counters of the name stay a while, then fold into `FORGOTTEN_POOL`.)"""

    agent_name: str


Action = (
    SendOffer | SlotHeld | SendAssignment | SendTermination | JobRunning | JobEnded | PoolForgotten
)
