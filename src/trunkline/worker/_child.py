"""The job process: prewarm, wait for one job, run it, report how it ended.

Theory of operation: the pool starts this as a `multiprocessing` target. The
process ignores SIGINT and SIGTERM (the main process owns the lifecycle: it
drains on SIGTERM and tells each job when to stop), runs `prewarm_fnc`, says
`ProcessReady`, then blocks until a `StartJob` arrives or the pipe closes. The
job runs on a fresh event loop until the entrypoint returns, raises, or a
shutdown is requested (by the job itself, by the main process, or because the
main process vanished). The outcome goes back as one `JobDone` message; the
process then exits. Only this module runs in job processes, so it imports
little.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable
from multiprocessing.connection import Connection
from typing import Any

from livekit.protocol import agent

from trunkline.common.logs import setup_logging

from ._ipc import JobDone, ProcessFailed, ProcessReady, ShutdownJob, StartJob
from ._job import JobContext, JobProcess
from ._types import EntrypointFnc, PrewarmFnc

logger = logging.getLogger("trunkline.worker.job")


def describe_exception(exc: BaseException) -> str:
    """`Type: message`, the text a failed job reports in `UpdateJobStatus.error`."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_process(
    conn: Connection,
    entrypoint: EntrypointFnc,
    prewarm: PrewarmFnc | None,
    log_level: str,
    log_format: str,
    shutdown_timeout: float,
) -> None:
    """Process target: prewarm, wait for a job, run it, report, return."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fields = _ProcessFields()
    setup_logging(log_level, log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(fields)
    proc = JobProcess()
    started = time.monotonic()
    if prewarm is not None:
        try:
            prewarm(proc)
        except Exception as exc:
            logger.exception("prewarm_fnc failed", extra={"error": str(exc)})
            _send(conn, ProcessFailed(describe_exception(exc)))
            return
    _send(conn, ProcessReady(pid=proc.pid, prewarm_s=time.monotonic() - started))
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        return  # the pool closed us while idle
    if not isinstance(msg, StartJob):
        return
    job = agent.Job()
    job.ParseFromString(msg.job)
    fields.job_id = job.id
    asyncio.run(_run_job(conn, msg, entrypoint, proc, shutdown_timeout))


class _ProcessFields(logging.Filter):
    """Tags every log record of a job process with its pid and job id."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()
        self.job_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "pid"):
            record.pid = self.pid
        if self.job_id and not hasattr(record, "job_id"):
            record.job_id = self.job_id
        return True


def _send(conn: Connection, msg: object) -> None:
    # If the main process is gone, nobody is left to tell.
    with contextlib.suppress(OSError):
        conn.send(msg)


async def _run_job(
    conn: Connection,
    start: StartJob,
    entrypoint: EntrypointFnc,
    proc: JobProcess,
    shutdown_timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    job = agent.Job()
    job.ParseFromString(start.job)
    stop = asyncio.Event()
    ctx = JobContext(
        job=job,
        url=start.url,
        token=start.token,
        worker_id=start.worker_id,
        proc=proc,
        accept=start.accept,
        on_shutdown=lambda _reason: stop.set(),
    )

    def on_readable() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            ctx.shutdown("worker process went away")
            return
        if isinstance(msg, ShutdownJob):
            ctx.shutdown(msg.reason)

    loop.add_reader(conn.fileno(), on_readable)
    logger.info("job started", extra={"job_id": job.id, "room": job.room.name})
    task = asyncio.create_task(_call(entrypoint, ctx), name=f"entrypoint {job.id}")
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        # One budget for the whole ending (cancelled entrypoint, then callbacks):
        # the main process kills us shortly after it.
        deadline = loop.time() + shutdown_timeout
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=shutdown_timeout)
        done = _outcome(task, shutdown_timeout)
        ctx.shutdown("entrypoint returned" if done.ok else "entrypoint failed")
        await ctx._run_shutdown_callbacks(max(0.1, deadline - loop.time()))
    finally:
        stopper.cancel()
        loop.remove_reader(conn.fileno())
    reason = ctx.shutdown_reason or ""
    logger.info(
        "job ended", extra={"job_id": job.id, "ok": done.ok, "error": done.error, "reason": reason}
    )
    # Report before asyncio.run() tears down: an entrypoint that ignores
    # cancellation would otherwise hold the outcome back until the pool kills us.
    _send(conn, JobDone(ok=done.ok, error=done.error, reason=reason))


async def _call(entrypoint: EntrypointFnc, ctx: JobContext) -> None:
    result: Any = entrypoint(ctx)
    if isinstance(result, Awaitable):
        await result


def _outcome(task: asyncio.Task[None], shutdown_timeout: float) -> JobDone:
    if not task.done():
        return JobDone(
            ok=False,
            error=f"entrypoint did not stop within {shutdown_timeout:g}s of the shutdown request",
        )
    if task.cancelled():
        return JobDone(ok=True)
    exc = task.exception()
    if exc is None:
        return JobDone(ok=True)
    logger.error("entrypoint raised", exc_info=exc, extra={"error": str(exc)})
    return JobDone(ok=False, error=describe_exception(exc))
