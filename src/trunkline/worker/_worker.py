"""`Worker`: one replica's connection to the server and the jobs it runs.

Theory of operation: the worker keeps one websocket session at a time (see
`_conn`) and reconnects with jittered, capped exponential backoff when it is
lost; the backoff resets only after a session stayed up for a while, so a
server that accepts and then drops cannot cause a hot loop, and a refused
login (HTTP 401) backs off the same way.

Slots are counted here, in one place: `used = running + reserved`, where a
reservation is an offer being decided by `request_fnc` or accepted and waiting
for its assignment. An offer is refused (`available=false, terminate=false`)
before the application sees it when that would exceed `max_jobs`, when
draining, or when load is at the threshold (`_policy.decide_availability`).
An accepted job runs once the server's `JobAssignment` arrives (within
`assignment_timeout`); the job that runs is the offered one, with URL and token
from the assignment. Running jobs belong to `_jobs.JobRunner` (one warm pool
process each, JS_RUNNING then JS_SUCCESS/JS_FAILED).

Messages leave through `_outbox.Outbox`: worker status and offer answers are
dropped with the session they belong to; job status updates wait for the next
registration, which first re-attaches running jobs (`MigrateJobRequest`).
Status (`UpdateWorkerStatus`) goes out every `status_interval` and at once when
availability changes.

Drain (`drain()`, SIGTERM under `run_app`): refuse new offers, report WS_FULL
with `draining`, let jobs finish for up to `drain_timeout`, then shut the rest
down, send every final status, and return; `aclose()` then ends the worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiohttp
from google.protobuf.message import DecodeError
from livekit.protocol import agent

from ._conn import AuthRefused, ProtocolError, agent_url, mint_token, open_session
from ._job import ATTRIBUTE_AGENT_NAME, AcceptArguments, AssignmentTimeoutError, JobRequest
from ._jobs import JobRunner
from ._options import WorkerOptions, load_fnc_takes_worker
from ._outbox import Outbox
from ._policy import (
    Availability,
    Backoff,
    Refusal,
    StatusReport,
    compute_status,
    decide_availability,
    slot_load,
)
from ._pool import ProcessPool

logger = logging.getLogger("trunkline.worker")

# A session that stayed up this long resets the reconnect backoff.
_STABLE_SESSION_S = 10.0
# How long closing/draining waits for final statuses to reach the server.
_FLUSH_TIMEOUT_S = 5.0


async def _accept_all(req: JobRequest) -> None:
    await req.accept()


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
        self._rand = rand
        # Job processes configure their logging like this process (trunkline.logs).
        level = logging.getLevelName(log_level) if isinstance(log_level, int) else log_level
        self._pool = ProcessPool(opts, log_level=str(level).lower(), log_format=log_format)
        self._load_takes_worker = opts.load_fnc is not None and load_fnc_takes_worker(opts.load_fnc)
        self._worker_id = ""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session_no = 0
        self._reserved: collections.Counter[str] = collections.Counter()
        self._jobs = JobRunner(
            opts,
            self._pool,
            report=self._send_job_status,
            changed=self._on_job_ended,
            spawn=self._spawn,
        )
        self._pending: dict[str, asyncio.Future[agent.JobAssignment]] = {}
        self._outbox = Outbox()
        self._connected = asyncio.Event()
        self._jobs_changed = asyncio.Event()
        self._registered = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._draining = False
        self._last_status: tuple[Availability, bool] | None = None
        self._last_load = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn_task: asyncio.Task[None] | None = None

    # -- public surface -------------------------------------------------------

    @property
    def id(self) -> str:
        """The id the server gave this worker ("" before the first registration)."""
        return self._worker_id

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def active_jobs(self) -> list[agent.Job]:
        """Jobs assigned to this worker that have not ended yet."""
        return self._jobs.jobs

    @property
    def used_slots(self) -> int:
        """Running jobs plus offers being decided or awaiting assignment."""
        return len(self._jobs) + sum(self._reserved.values())

    async def wait_registered(self) -> str:
        """Wait until the worker is registered at least once; returns its id."""
        await self._registered.wait()
        return self._worker_id

    async def run(self) -> None:
        """Connect, serve offers and jobs, and return once the worker is closed."""
        self._opts.validate_connection()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._conn_task = asyncio.create_task(self._connection_loop(session))
            self._pool.start()
            closed = asyncio.create_task(self._closed.wait())
            await asyncio.wait({self._conn_task, closed}, return_when=asyncio.FIRST_COMPLETED)
            if self._conn_task.done() and not self._conn_task.cancelled():
                error = self._conn_task.exception()
                if error is not None:
                    closed.cancel()
                    await self.aclose()
                    raise error
            await closed

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (LiveKit-shaped)
        """Stop taking jobs, let running ones finish (up to `timeout`, default
        `drain_timeout`), shut the rest down and send their final statuses."""
        if self._draining:
            await self._drained.wait()
            return
        self._draining = True
        limit = self._opts.drain_timeout if timeout is None else timeout
        logger.info(
            "worker draining",
            extra={"running_jobs": len(self._jobs), "drain_timeout_s": limit},
        )
        self._pool.stop_refilling()
        self._status_changed()
        if not await self._wait_jobs_ended(limit):
            logger.warning(
                "drain timeout reached, shutting jobs down",
                extra={"running_jobs": len(self._jobs), "drain_timeout_s": limit},
            )
            await self._stop_all("worker drain timeout")
        await self._flush(_FLUSH_TIMEOUT_S)
        logger.info("worker drained", extra={"worker_id": self._worker_id})
        self._drained.set()

    async def aclose(self) -> None:
        """End the worker now: shut running jobs down, send what can be sent, disconnect."""
        if self._closing.is_set():
            await self._closed.wait()
            return
        self._closing.set()
        self._pool.stop_refilling()
        if self._jobs:
            await self._stop_all("worker closing")
            await self._flush(_FLUSH_TIMEOUT_S)
        if self._conn_task is not None:
            self._conn_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._conn_task
        for fut in self._pending.values():
            fut.cancel()
        # Let reaping finish before the pool makes sure no process outlives us.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._opts.shutdown_process_timeout + 5.0)
        for task in list(self._tasks):
            task.cancel()
        await self._pool.aclose()
        self._closed.set()

    # -- connection -------------------------------------------------------------

    async def _connection_loop(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        opts = self._opts
        backoff = Backoff(base=opts.reconnect_base, cap=opts.reconnect_cap, rand=self._rand)
        failures = 0
        url = agent_url(opts.ws_url, opts.max_jobs)
        version = opts.version or _package_version()
        while not self._closing.is_set():
            registered_at: float | None = None
            try:
                started = loop.time()
                reg = await open_session(
                    session,
                    url=url,
                    token=mint_token(opts.api_key, opts.api_secret),
                    heartbeat=opts.heartbeat_interval,
                    agent_name=opts.agent_name,
                    version=version,
                )
                registered_at = loop.time()
                self._on_registered(reg.ws, reg.worker_id, registered_at - started)
                await self._serve(reg.ws)
                logger.warning(
                    "worker connection closed by server",
                    extra={"worker_id": self._worker_id, "close_code": reg.ws.close_code},
                )
            except AuthRefused as exc:
                logger.error("worker authentication refused", extra={"error": str(exc)})
            except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as exc:
                logger.warning(
                    "worker connection failed",
                    extra={"url": url, "error": str(exc) or type(exc).__name__},
                )
            finally:
                await self._on_disconnected()
            if self._closing.is_set():
                return
            if registered_at is not None and loop.time() - registered_at >= _STABLE_SESSION_S:
                backoff.reset()
                failures = 0
            failures += 1
            if opts.max_retry is not None and failures > opts.max_retry:
                raise ConnectionError(
                    f"worker could not connect to {url} after {failures} attempts; "
                    "check the server is running and the URL/credentials are right"
                )
            delay = backoff.next_delay()
            logger.info(
                "worker reconnecting", extra={"delay_s": round(delay, 3), "attempt": failures}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    def _on_registered(
        self, ws: aiohttp.ClientWebSocketResponse, worker_id: str, took: float
    ) -> None:
        self._ws = ws
        self._session_no += 1
        self._worker_id = worker_id
        self._last_status = None
        logger.info(
            "worker registered",
            extra={
                "worker_id": worker_id,
                "agent_name": self._opts.agent_name,
                "max_jobs": self._opts.max_jobs,
                "register_s": round(took, 4),
            },
        )
        if self._jobs:
            # Goes ahead of anything queued: the server must know these jobs are
            # still alive before it reads their status updates.
            migrate = agent.WorkerMessage()
            migrate.migrate_job.job_ids.extend(self._jobs.ids)
            self._outbox.put_first(migrate)
            logger.info("re-attaching running jobs", extra={"job_ids": self._jobs.ids})
        self._status_changed()
        self._connected.set()
        self._registered.set()

    async def _on_disconnected(self) -> None:
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        self._outbox.drop_session_bound()
        for job_id, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(
                    AssignmentTimeoutError(f"connection lost before job {job_id} was assigned")
                )
        self._pending.clear()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        sender = asyncio.create_task(self._outbox.pump(ws))
        status = asyncio.create_task(self._status_loop())
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY:
                    self._dispatch(frame.data)
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    raise cast(Exception, ws.exception() or ConnectionError("websocket error"))
                else:
                    logger.warning("ignoring non-binary frame", extra={"type": frame.type.name})
        finally:
            sender.cancel()
            status.cancel()
            await asyncio.gather(sender, status, return_exceptions=True)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self._opts.status_interval)
            self._send_status(self._status())

    async def _flush(self, limit: float) -> bool:
        """Wait until every queued message was written on a live session; False on timeout."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._connected.wait()
                    await self._outbox.wait_empty()
                    if self._ws is not None:
                        break
        except TimeoutError:
            logger.warning("unsent messages dropped", extra={"count": len(self._outbox)})
            return False
        return True

    # -- server messages -----------------------------------------------------------

    def _dispatch(self, data: bytes) -> None:
        msg = agent.ServerMessage()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            # One bad frame must not take down the session and its jobs.
            logger.warning("ignoring undecodable server frame", extra={"size": len(data)})
            return
        which = msg.WhichOneof("message")
        if which == "availability":
            self._spawn(self._answer(msg.availability.job, self._session_no))
        elif which == "assignment":
            fut = self._pending.pop(msg.assignment.job.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.assignment)
            else:
                logger.warning(
                    "assignment for unknown job", extra={"job_id": msg.assignment.job.id}
                )
        elif which == "termination":
            self._terminate(msg.termination.job_id)
        elif which not in ("pong", "register"):
            logger.debug("ignoring server message", extra={"type": which})

    def _send_availability(
        self,
        job_id: str,
        session_no: int,
        *,
        available: bool,
        terminate: bool,
        accept: AcceptArguments | None = None,
    ) -> bool:
        if self._ws is None or session_no != self._session_no:
            return False  # the offer died with its session
        msg = agent.WorkerMessage()
        resp = msg.availability
        resp.job_id = job_id
        resp.available = available
        resp.terminate = terminate
        if accept is not None:
            resp.participant_identity = accept.identity
            resp.participant_name = accept.name
            resp.participant_metadata = accept.metadata
            resp.participant_attributes[ATTRIBUTE_AGENT_NAME] = self._opts.agent_name
            resp.participant_attributes.update(accept.attributes)
        self._outbox.put(msg)
        return True

    async def _answer(self, job: agent.Job, session_no: int) -> None:
        refusal: Refusal | None
        if job.id in self._jobs or self._reserved[job.id]:
            refusal = Refusal.DUPLICATE  # running it twice would double-book the call
        else:
            refusal = decide_availability(
                draining=self._draining,
                used_slots=self.used_slots,
                max_jobs=self._opts.max_jobs,
                load=self._sample_load(),
                load_threshold=self._opts.load_threshold,
            )
        if refusal is not None:
            self._send_availability(job.id, session_no, available=False, terminate=False)
            logger.info(
                "job offer refused",
                extra={"job_id": job.id, "reason": refusal.value, "used_slots": self.used_slots},
            )
            return
        self._reserved[job.id] += 1
        self._status_changed()
        launched = False

        async def on_accept(args: AcceptArguments) -> None:
            nonlocal launched
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[agent.JobAssignment] = loop.create_future()
            if not self._send_availability(
                job.id, session_no, available=True, terminate=False, accept=args
            ):
                raise AssignmentTimeoutError(f"connection lost before job {job.id} was accepted")
            self._pending[job.id] = fut
            try:
                assignment = await asyncio.wait_for(fut, self._opts.assignment_timeout)
            except TimeoutError:
                if self._pending.get(job.id) is fut:
                    del self._pending[job.id]
                logger.warning("job assignment timed out", extra={"job_id": job.id})
                raise AssignmentTimeoutError(
                    f"no assignment for job {job.id} within {self._opts.assignment_timeout:g}s"
                ) from None
            launched = True
            await self._launch(job, assignment, args)

        async def on_reject(terminate: bool) -> None:
            self._send_availability(job.id, session_no, available=False, terminate=terminate)
            logger.info("job offer rejected", extra={"job_id": job.id, "terminate": terminate})

        req = JobRequest(job, on_accept=on_accept, on_reject=on_reject)
        try:
            await (self._opts.request_fnc or _accept_all)(req)
        except AssignmentTimeoutError:
            pass  # logged where it happened; the slot is released below
        except Exception as exc:
            logger.exception("request_fnc failed", extra={"job_id": job.id, "error": str(exc)})
        finally:
            if not req.answered:
                logger.warning("request_fnc did not answer, refusing", extra={"job_id": job.id})
                await req.reject(terminate=False)
            if not launched:
                self._release(job.id)

    def _release(self, job_id: str) -> None:
        self._reserved[job_id] -= 1
        if self._reserved[job_id] <= 0:
            del self._reserved[job_id]
        self._jobs_changed.set()
        self._status_changed()

    async def _launch(
        self, job: agent.Job, assignment: agent.JobAssignment, args: AcceptArguments
    ) -> None:
        """Turn the reservation into a running job; returns once it started (or failed to)."""
        launched = self._jobs.launch(
            job,
            url=assignment.url or self._opts.ws_url,
            token=assignment.token,
            accept=args,
            worker_id=self._worker_id,
        )
        # Reservation → running with no await in between: the slot count never dips.
        self._release(job.id)
        await asyncio.shield(launched)

    def _on_job_ended(self) -> None:
        self._jobs_changed.set()
        self._status_changed()

    def _terminate(self, job_id: str) -> None:
        if self._jobs.stop(job_id, "terminated by server"):
            logger.info("job terminated by server", extra={"job_id": job_id})
            return
        fut = self._pending.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                AssignmentTimeoutError(f"job {job_id} was terminated before assignment")
            )
        else:
            logger.debug("termination for unknown job", extra={"job_id": job_id})

    async def _stop_all(self, reason: str) -> None:
        self._jobs.stop_all(reason)
        # Jobs still acquiring a process see stop_reason once they get one.
        await self._wait_jobs_ended(
            self._opts.shutdown_process_timeout + self._opts.initialize_process_timeout + 5.0
        )

    async def _wait_jobs_ended(self, limit: float) -> bool:
        try:
            async with asyncio.timeout(limit):
                while self._jobs or self._reserved:
                    self._jobs_changed.clear()
                    await self._jobs_changed.wait()
        except TimeoutError:
            return False
        return True

    # -- status -----------------------------------------------------------------

    def _sample_load(self) -> float:
        fnc = self._opts.load_fnc
        if fnc is None:
            return slot_load(self.used_slots, self._opts.max_jobs)
        try:
            if self._load_takes_worker:
                value = cast(Callable[[Worker], float], fnc)(self)
            else:
                value = cast(Callable[[], float], fnc)()
            self._last_load = float(value)
        except Exception as exc:
            logger.exception("load_fnc failed", extra={"error": str(exc)})
        return self._last_load

    def _status(self) -> StatusReport:
        return compute_status(
            draining=self._draining,
            used_slots=self.used_slots,
            running_jobs=len(self._jobs),
            max_jobs=self._opts.max_jobs,
            load=self._sample_load(),
            load_threshold=self._opts.load_threshold,
        )

    def _status_changed(self) -> None:
        report = self._status()
        if (report.availability, report.draining) != self._last_status:
            self._send_status(report)

    def _send_status(self, report: StatusReport) -> None:
        if self._ws is None:
            return
        self._last_status = (report.availability, report.draining)
        msg = agent.WorkerMessage()
        update = msg.update_worker
        update.status = (
            agent.WorkerStatus.WS_FULL
            if report.availability is Availability.FULL
            else agent.WorkerStatus.WS_AVAILABLE
        )
        update.load = report.load
        update.job_count = report.job_count
        update.draining = report.draining
        self._outbox.put(msg)

    def _send_job_status(self, job_id: str, status: agent.JobStatus, error: str = "") -> None:
        msg = agent.WorkerMessage()
        msg.update_job.job_id = job_id
        msg.update_job.status = status
        msg.update_job.error = error
        self._outbox.put(msg)  # kept across reconnects, unlike status and answers

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("worker task failed", exc_info=exc, extra={"error": str(exc)})


def _package_version() -> str:
    from trunkline import __version__

    return __version__
