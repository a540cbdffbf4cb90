"""What the Dispatcher (runtime/dispatcher.py) meets at its edges: the
protocols its adapters implement (worker links, job and worker observers, the
cluster fence, the bridge's upstream link), and the LiveKit messages and ids it
makes (a job's `agent.Job`, offer and assignment frames, job, room and
dispatch ids). No state lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable
from typing import ParamSpec, Protocol

from livekit.protocol import agent, models

from trunkline import auth
from trunkline.config import MediaServer
from trunkline.core import Job, JobState

__all__ = [
    "BridgeLink",
    "Bridged",
    "Fence",
    "JobObserver",
    "WorkerLink",
    "WorkerObserver",
    "assignment_frame",
    "declined",
    "job_proto",
    "new_id",
    "notify",
    "notify_value",
    "offer_frame",
    "request_ids",
]

log = logging.getLogger("trunkline.dispatch")

P = ParamSpec("P")


class JobObserver(Protocol):
    """Told about placements and endings as the dispatcher carries them out
    (the SIP edge uses it to forward or refuse calls)."""

    def job_placed(self, job: Job) -> None: ...

    def job_ended(self, job: Job) -> None: ...


class WorkerObserver(Protocol):
    """Told when a worker registers (with the `worker_token` it sent, "" if
    none) and when its connection is gone (the autoscaler ties replicas to
    workers this way)."""

    def worker_registered(self, worker_id: str, agent_name: str, token: str) -> None: ...

    def worker_gone(self, worker_id: str) -> None: ...


class WorkerLink(Protocol):
    """A registered worker's connection, as the dispatcher uses it."""

    def send(self, frame: bytes) -> None:
        """Queue one encoded `ServerMessage`; never blocks, keeps order."""

    async def close(self, message: bytes) -> None:
        """Close the connection (server shutdown)."""


class Fence(Protocol):
    """Cluster mode (runtime/cluster.py): may this server act for a pool now?
    Requests of a pool it may not act for are refused with `refusal(pool)`;
    frames to that pool's workers are not sent (a stale owner sends nothing)."""

    def may_act(self, pool: str) -> bool: ...

    def refusal(self, pool: str) -> Exception: ...

    def admitted(self, job: Job) -> None:
        """A request was let in (called after it was carried out)."""

    def assigning(self, job: Job, worker_id: str, send: Callable[[bool], None]) -> None:
        """`job` is assigned to `worker_id`: call `send(True)` once that is
        recorded (its assignment frame goes out then), `send(False)` if it
        will not be (the frame is not sent)."""


class BridgeLink(Protocol):
    """The upstream side of bridged jobs (runtime/bridge): told when a bridged
    job's worker accepted (answer the upstream now: the worker's assignment is
    held until `Dispatcher.bridge_assigned`), when it runs and when it ended."""

    def job_accepted(self, job: Job) -> None: ...

    def job_running(self, job: Job) -> None: ...

    def job_ended(self, job: Job) -> None: ...


@dataclasses.dataclass(slots=True)
class Bridged:
    """A live job offered by an upstream LiveKit server: its job as the
    upstream sent it (the worker runs the job from the offer), and the URL and
    token of the upstream's assignment once it came."""

    proto: agent.Job
    link: BridgeLink
    url: str = ""
    token: str = ""
    held: bool = False  # the worker accepted; its assignment waits for the token


def job_proto(job: Job) -> agent.Job:
    """The job as the LiveKit protocol describes it (offers, assignments, Twirp)."""
    pb = agent.Job(
        id=job.id,
        dispatch_id=job.dispatch_id,
        type=agent.JobType.JT_ROOM,
        room=models.Room(name=job.room),
        metadata=job.metadata,
        agent_name=job.agent_name,
    )
    if job.attributes:
        pb.attributes.update(job.attributes)
    return pb


def declined(job_pb: agent.Job, why: str, now: float) -> Job:
    """An upstream offer another path serves: a job record ended `rejected`
    with `why`, never filed in the scheduler nor the history."""
    job = Job(job_pb.id, job_pb.agent_name, job_pb.room.name, job_pb.metadata, now, 0.0)
    job.state, job.reason, job.ended_at = JobState.REJECTED, why, now
    return job


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(9)


def request_ids(job_id: str, room: str) -> tuple[str, str, str]:
    """A request's job id, room and dispatch id: `job_id` and `room` when given,
    else `new_id` ones, from one draw of random bytes for all three (each
    12-character slice encodes 9 bytes, as `new_id` does)."""
    raw = secrets.token_urlsafe(27)
    return (job_id or "AJ_" + raw[:12], room or "room-" + raw[12:24], "AD_" + raw[24:])


def offer_frame(pb: agent.Job) -> bytes:
    """The `AvailabilityRequest` frame offering the job `pb`."""
    msg = agent.ServerMessage(availability=agent.AvailabilityRequest(job=pb))
    return msg.SerializeToString()


def assignment_frame(
    job: Job, pb: agent.Job, media: MediaServer | None, bridged: Bridged | None
) -> bytes:
    """The `JobAssignment` frame for `job` (as `pb`): a bridged job carries the
    upstream's URL and token, else with a media server configured a room
    token minted for the accepting participant."""
    assignment = agent.JobAssignment(job=pb)
    if bridged is not None:
        # Bridged: the agent joins the upstream's room with its token.
        assignment.url, assignment.token = bridged.url, bridged.token
    elif media is not None:
        accept = job.accept
        assignment.url = media.url
        assignment.token = auth.room_token(
            media.api_key,
            media.api_secret,
            job.room,
            identity=(accept.identity if accept and accept.identity else f"agent-{job.id}"),
            name=accept.name if accept else "",
            metadata=accept.metadata if accept else "",
            attributes=accept.attributes if accept else None,
        )
    return agent.ServerMessage(assignment=assignment).SerializeToString()


def notify(callback: Callable[P, object], *args: P.args, **kw: P.kwargs) -> None:
    """Call an observer; its failure is logged, never allowed to stop the
    dispatcher from carrying out the remaining actions."""
    try:
        callback(*args, **kw)
    except Exception:
        log.exception("observer failed", extra={"observer": getattr(callback, "__qualname__", "?")})


def notify_value(callback: Callable[[agent.Job], str | None], job_pb: agent.Job) -> str | None:
    """`notify` for a claim: its failure is logged and counts as no claim."""
    try:
        return callback(job_pb)
    except Exception:
        log.exception("upstream claim failed")
        return None
