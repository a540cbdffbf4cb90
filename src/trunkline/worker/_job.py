"""What the application sees of a job: `JobRequest`, `JobContext`, `JobProcess`.

Theory of operation: a `JobRequest` lives in the worker's main process while
the application decides an offer; answering it hands control back to the
worker (`accept` returns once the job has been assigned and launched). A
`JobContext` lives in the job's own process and is the job's only handle on
its lifecycle: the job ends when its entrypoint returns, raises, or calls
`shutdown()`; shutdown callbacks then run in registration order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, cast

from livekit.protocol import agent

logger = logging.getLogger("trunkline.worker")

# Participant attribute LiveKit agents set to their agent name.
ATTRIBUTE_AGENT_NAME = "lk.agent.name"

ShutdownCallback = Callable[[str], Awaitable[None]] | Callable[[], Awaitable[None]]


class AssignmentTimeoutError(Exception):
    """The server did not assign an accepted job in time; the job will not run here."""


def parse_metadata(raw: str) -> dict[str, Any]:
    """Job metadata as a dict: the JSON object it holds, else an empty dict."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return cast(dict[str, Any], value) if isinstance(value, dict) else {}


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptArguments:
    """How the agent appears in the room, as sent in the `AvailabilityResponse`."""

    identity: str
    name: str = ""
    metadata: str = ""
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)


class _JobFields:
    """The job's fields as the server sent them, for `JobRequest` (an offered
    job) and `JobContext` (a running one); the subclass sets `_job`."""

    _job: agent.Job

    @property
    def job(self) -> agent.Job:
        """The job, as the server sent it."""
        return self._job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def room(self) -> str:
        """Name of the room the job is for (`job.room` has the full record)."""
        return self._job.room.name

    @property
    def metadata(self) -> dict[str, Any]:
        """The job's metadata parsed as a JSON object (empty if it is not one)."""
        return parse_metadata(self._job.metadata)

    @property
    def raw_metadata(self) -> str:
        return self._job.metadata


class JobRequest(_JobFields):
    """An offer the worker received; answer it exactly once.

    `await accept(...)` tells the server the worker takes the job, waits for the
    server's assignment and launches the job; it raises `AssignmentTimeoutError`
    if no assignment comes in time. `await reject(terminate=True)` ends the job
    on the server (LiveKit's default); `reject(terminate=False)` hands it back so
    the server places it on another worker. Not answering counts as
    `reject(terminate=False)`.
    """

    def __init__(
        self,
        job: agent.Job,
        *,
        on_accept: Callable[[AcceptArguments], Awaitable[None]],
        on_reject: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._job = job
        self._on_accept = on_accept
        self._on_reject = on_reject
        self._answered = False

    @property
    def agent_name(self) -> str:
        return self._job.agent_name

    @property
    def answered(self) -> bool:
        return self._answered

    def _claim(self) -> None:
        if self._answered:
            raise RuntimeError(f"job request {self.id} was already answered")
        self._answered = True

    async def accept(
        self,
        *,
        identity: str = "",
        name: str = "",
        metadata: str = "",
        attributes: dict[str, str] | None = None,
    ) -> None:
        """Take the job; returns once it is assigned and launched.

        `identity` defaults to `agent-<job id>`, as LiveKit's does.
        """
        self._claim()
        args = AcceptArguments(
            identity=identity or f"agent-{self.id}",
            name=name,
            metadata=metadata,
            attributes=dict(attributes or {}),
        )
        await self._on_accept(args)

    async def reject(self, *, terminate: bool = True) -> None:
        """Decline the job: end it (`terminate=True`) or let another worker take it."""
        self._claim()
        await self._on_reject(terminate)


class JobProcess:
    """The process a job runs in; `userdata` carries what `prewarm_fnc` prepared."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.userdata: dict[str, Any] = {}


class JobContext(_JobFields):
    """A running job's view of itself, inside the job's process.

    `shutdown(reason)` ends the job: the entrypoint is cancelled if it is still
    running, shutdown callbacks run, and the job is reported successful.
    Callbacks are async functions taking the reason (or nothing). They run in
    order after the entrypoint has ended, within what is left of
    `shutdown_process_timeout` (counted from when the job began to end); an
    exception in one is logged without changing the job's outcome.
    """

    def __init__(
        self,
        *,
        job: agent.Job,
        url: str,
        token: str,
        worker_id: str,
        proc: JobProcess,
        accept: AcceptArguments,
        on_shutdown: Callable[[str], None],
    ) -> None:
        self._job = job
        self._url = url
        self._token = token
        self._worker_id = worker_id
        self._proc = proc
        self._accept = accept
        self._on_shutdown = on_shutdown
        self._callbacks: list[ShutdownCallback] = []
        self._shutdown_reason: str | None = None

    @property
    def url(self) -> str:
        """Media server URL from the assignment (the worker's URL if none was given)."""
        return self._url

    @property
    def token(self) -> str:
        """Room token from the assignment ("" when no media server is configured)."""
        return self._token

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def participant_identity(self) -> str:
        return self._accept.identity

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def shutdown_reason(self) -> str | None:
        """None while the job runs; the reason once shutdown was requested."""
        return self._shutdown_reason

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run `callback` (async, optionally taking the reason) when the job ends."""
        self._callbacks.append(callback)

    def shutdown(self, reason: str = "") -> None:
        """End the job; safe to call more than once (the first reason wins)."""
        if self._shutdown_reason is not None:
            return
        self._shutdown_reason = reason
        self._on_shutdown(reason)

    async def _run_shutdown_callbacks(self, limit: float) -> None:
        reason = self._shutdown_reason or ""

        async def run_all() -> None:
            for callback in self._callbacks:
                try:
                    if _takes_argument(callback):
                        await cast(Callable[[str], Awaitable[None]], callback)(reason)
                    else:
                        await cast(Callable[[], Awaitable[None]], callback)()
                except Exception as exc:
                    logger.exception(
                        "job shutdown callback failed", extra={"job_id": self.id, "error": str(exc)}
                    )

        try:
            await asyncio.wait_for(run_all(), limit)
        except TimeoutError:
            logger.warning(
                "job shutdown callbacks timed out", extra={"job_id": self.id, "timeout_s": limit}
            )


def _takes_argument(fnc: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fnc).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )
