"""`Worker`: one replica's connection to the server and the jobs it runs.

Theory of operation: the worker is a façade over three parts, each with its
own contract:

- `_session.Session`: one websocket session at a time, registration,
  reconnection with backoff, the ordered outbox of messages to the server;
- `_admission.Admission`: the slot ledger (`used = running + reserved`), the
  decision on each offer (capacity, load, draining, `request_fnc`), waiting for
  the assignment, and the `UpdateWorkerStatus` reports;
- `_jobs.JobRunner` over `_pool.ProcessPool`: running each assigned job in its
  own warm process, from JS_RUNNING to JS_SUCCESS/JS_FAILED.

This module wires them: server messages go to admission (offers,
assignments) or the runner (terminations); the runner's job status updates
go out through the session, and wait for the next registration if it is
down; each registration first re-attaches running jobs (`MigrateJobRequest`)
and then reports the status. It also supervises their background tasks.

Drain (`drain()`, SIGTERM under `run_app`): refuse new offers, report WS_FULL
with `draining`, let jobs finish for up to `drain_timeout`, then shut the rest
down, send every final status, and return; `aclose()` then ends the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any, cast

from livekit.protocol import agent

from ._admission import Admission
from ._jobs import JobRunner
from ._options import WorkerOptions, load_fnc_takes_worker
from ._pool import ProcessPool
from ._session import Session

logger = logging.getLogger("trunkline.worker")

# How long closing/draining waits for final statuses to reach the server.
_FLUSH_TIMEOUT_S = 5.0


class Worker:
    """A worker replica; `await run()` until `drain()`/`aclose()` or a fatal error.

    `run()` raises `ValueError` for missing settings and `ConnectionError` once
    `max_retry` consecutive connection attempts failed; otherwise it returns
    after `aclose()`. `drain()` returns once every job has ended and its final
    status was sent (or could not be, after a bounded wait).
    """

    def __init__(
        self,
        opts: WorkerOptions,
        *,
        log_level: int | str = logging.INFO,
        log_format: str = "text",
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._opts = opts
        # Job processes configure their logging like this process (trunkline.common.logs).
        level = logging.getLevelName(log_level) if isinstance(log_level, int) else log_level
        self._pool = ProcessPool(opts, log_level=str(level).lower(), log_format=log_format)
        self._session = Session(
            opts,
            on_registered=self._on_registered,
            on_message=self._on_message,
            on_lost=self._on_lost,
            on_tick=self._on_tick,
            rand=rand,
        )
        self._jobs = JobRunner(
            opts,
            self._pool,
            report=self._send_job_status,
            changed=self._on_job_ended,
            spawn=self._spawn,
        )
        self._admission = Admission(opts, self._session, self._jobs, load=self._load_sampler())
        self._closing = False
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_task: asyncio.Task[None] | None = None

    # -- public surface -------------------------------------------------------

    @property
    def id(self) -> str:
        """The id the server gave this worker ("" before the first registration)."""
        return self._session.worker_id

    @property
    def draining(self) -> bool:
        return self._admission.draining

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def active_jobs(self) -> list[agent.Job]:
        """Jobs assigned to this worker that have not ended yet."""
        return self._jobs.jobs

    @property
    def used_slots(self) -> int:
        """Running jobs plus offers being decided or awaiting assignment."""
        return self._admission.used_slots

    async def wait_registered(self) -> str:
        """Wait until the worker is registered at least once; returns its id."""
        return await self._session.wait_registered()

    async def run(self) -> None:
        """Connect, serve offers and jobs, and return once the worker is closed."""
        self._opts.validate_connection()
        self._session_task = asyncio.create_task(self._session.run())
        self._pool.start()
        closed = asyncio.create_task(self._closed.wait())
        await asyncio.wait({self._session_task, closed}, return_when=asyncio.FIRST_COMPLETED)
        if self._session_task.done() and not self._session_task.cancelled():
            error = self._session_task.exception()
            if error is not None:
                closed.cancel()
                await self.aclose()
                raise error
        await closed

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (LiveKit-shaped)
        """Stop taking jobs, let running ones finish (up to `timeout`, default
        `drain_timeout`), shut the rest down and send their final statuses."""
        if self._admission.draining:
            await self._drained.wait()
            return
        limit = self._opts.drain_timeout if timeout is None else timeout
        logger.info(
            "worker draining",
            extra={"running_jobs": len(self._jobs), "drain_timeout_s": limit},
        )
        self._pool.stop_refilling()
        self._admission.start_draining()
        if not await self._admission.wait_idle(limit):
            logger.warning(
                "drain timeout reached, shutting jobs down",
                extra={"running_jobs": len(self._jobs), "drain_timeout_s": limit},
            )
            await self._stop_all("worker drain timeout")
        await self._session.flush(_FLUSH_TIMEOUT_S)
        logger.info("worker drained", extra={"worker_id": self.id})
        self._drained.set()

    async def aclose(self) -> None:
        """End the worker now: shut running jobs down, send what can be sent, disconnect."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._session.stop_reconnecting()
        self._pool.stop_refilling()
        if self._jobs:
            await self._stop_all("worker closing")
            await self._session.flush(_FLUSH_TIMEOUT_S)
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._session_task
        self._admission.cancel_all()
        # Let reaping finish before the pool makes sure no process outlives us.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._opts.shutdown_process_timeout + 5.0)
        for task in list(self._tasks):
            task.cancel()
        await self._pool.aclose()
        self._closed.set()

    # -- wiring -----------------------------------------------------------------

    def _load_sampler(self) -> Callable[[], float] | None:
        fnc = self._opts.load_fnc
        if fnc is None:
            return None
        if load_fnc_takes_worker(fnc):
            takes_worker = cast(Callable[[Worker], float], fnc)
            return lambda: takes_worker(self)
        return cast(Callable[[], float], fnc)

    def _on_registered(self) -> None:
        if self._jobs:
            # Goes ahead of anything queued: the server must know these jobs are
            # still alive before it reads their status updates.
            migrate = agent.WorkerMessage()
            migrate.migrate_job.job_ids.extend(self._jobs.ids)
            self._session.send_first(migrate)
            logger.info("re-attaching running jobs", extra={"job_ids": self._jobs.ids})
        self._admission.session_started()

    def _on_message(self, msg: agent.ServerMessage) -> None:
        which = msg.WhichOneof("message")
        if which == "availability":
            self._spawn(self._admission.answer(msg.availability.job, self._session.session_no))
        elif which == "assignment":
            self._admission.assign(msg.assignment)
        elif which == "termination":
            self._terminate(msg.termination.job_id)
        elif which not in ("pong", "register"):
            logger.debug("ignoring server message", extra={"type": which})

    def _on_lost(self) -> None:
        self._admission.session_lost()

    def _on_tick(self) -> None:
        self._admission.report_status()

    def _on_job_ended(self) -> None:
        self._admission.job_ended()

    def _terminate(self, job_id: str) -> None:
        if self._jobs.stop(job_id, "terminated by server"):
            logger.info("job terminated by server", extra={"job_id": job_id})
            return
        self._admission.cancel_unassigned(job_id)

    async def _stop_all(self, reason: str) -> None:
        self._jobs.stop_all(reason)
        # Jobs still acquiring a process see stop_reason once they get one.
        await self._admission.wait_idle(
            self._opts.shutdown_process_timeout + self._opts.initialize_process_timeout + 5.0
        )

    def _send_job_status(self, job_id: str, status: agent.JobStatus, error: str = "") -> None:
        msg = agent.WorkerMessage()
        msg.update_job.job_id = job_id
        msg.update_job.status = status
        msg.update_job.error = error
        self._session.send(msg)  # kept across reconnects, unlike status and answers

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("worker task failed", exc_info=exc, extra={"error": str(exc)})
