"""Warm pool of job processes, seen from the worker's main process.

Theory of operation: the pool keeps `num_idle_processes` processes started and
prewarmed (each ran `prewarm_fnc` once) so a job starts without paying the
interpreter start-up. A process serves exactly one job and then exits; the
pool replaces it. `acquire()` returns a ready process: an idle one, else one
still warming, else a new one, and raises `ProcessInitError` if the process it
waited for could not get ready. Processes come from a `forkserver` (default:
each new process is a fork of a server that already imported the worker and
the entrypoint's module) or a `spawn` context, never a plain fork of the
worker, which holds sockets and an event loop.

`JobProcessHandle` watches one process through its pipe (messages) and its
sentinel (exit) with event-loop readers, so nothing blocks the loop. Starting
a process runs in a thread: the first start boots the forkserver and blocks
until it has imported its modules.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
from multiprocessing.context import BaseContext
from typing import Any

from trunkline.common import exits

from ._child import run_process
from ._ipc import JobDone, ProcessFailed, ProcessReady, ShutdownJob, StartJob
from ._options import WorkerOptions

logger = logging.getLogger("trunkline.worker")

# A process whose prewarm fails is replaced after this delay, doubling up to the cap.
_RESPAWN_BACKOFF_S = (1.0, 30.0)


class ProcessInitError(Exception):
    """A job process could not start or its `prewarm_fnc` failed."""


def describe_exit(code: int | None) -> str:
    """Human text for a job process that ended without reporting an outcome:
    "job process was killed by SIGKILL", "job process exited with code 1
    without reporting an outcome", or "job process vanished" (no exit code)."""
    if code is None:
        return "job process vanished"
    if code < 0:
        return f"job process was {exits.describe_exit(code)}"
    return f"job process {exits.describe_exit(code)} without reporting an outcome"


class JobProcessHandle:
    """One job process. Futures: `ready` (prewarmed), `done` (outcome), `exited` (code).

    `done` always resolves once a job was started: with the `JobDone` the
    process sent, or with a failure describing how the process died.
    """

    def __init__(
        self, mp: BaseContext, opts: WorkerOptions, log_level: str, log_format: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._conn, child_conn = mp.Pipe(duplex=True)
        self._child_conn: Any = child_conn
        self._process: Any = mp.Process(  # type: ignore[attr-defined]
            target=run_process,
            args=(
                child_conn,
                opts.entrypoint_fnc,
                opts.prewarm_fnc,
                log_level,
                log_format,
                opts.shutdown_process_timeout,
            ),
            name="trunkline-job",
            daemon=False,  # a job may start its own subprocesses
        )
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[JobDone] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self.claimed = False
        self.job_started = False
        for fut in (self.ready, self.done):
            fut.add_done_callback(_consume_exception)

    @property
    def pid(self) -> int | None:
        pid: int | None = self._process.pid
        return pid

    async def start(self) -> None:
        """Start the process (in a thread) and begin watching it."""
        await self._loop.run_in_executor(None, self._process.start)
        self._child_conn.close()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        self._loop.add_reader(self._process.sentinel, self._on_exit)

    def start_job(self, msg: StartJob) -> None:
        """Hand the job to the (ready) process; outcome arrives in `done`."""
        self.job_started = True
        self._conn.send(msg)

    def request_shutdown(self, reason: str) -> None:
        """Ask the running job to end; harmless if the process is already gone."""
        with contextlib.suppress(OSError):
            self._conn.send(ShutdownJob(reason))

    def kill(self) -> None:
        """SIGKILL the process if it is still running."""
        if self._process.pid is not None and not self.exited.done():
            with contextlib.suppress(OSError, ValueError):
                self._process.kill()

    async def stop(self, reason: str, limit: float) -> JobDone:
        """Ask the job to end; kill the process if no outcome comes within `limit` s."""
        self.request_shutdown(reason)
        try:
            return await asyncio.wait_for(asyncio.shield(self.done), limit)
        except TimeoutError:
            self.kill()
            outcome = JobDone(
                ok=False,
                error=f"job did not end within {limit:g}s of the shutdown request; process killed",
                reason=reason,
            )
            if not self.done.done():
                self.done.set_result(outcome)
            return self.done.result()

    async def reap(self, limit: float) -> None:
        """Wait for the process to exit after its outcome; kill it if it lingers."""
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), limit)
        except TimeoutError:
            logger.warning("job process did not exit, killing it", extra={"pid": self.pid})
            self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        finally:
            self._close_conn()

    def close_idle(self) -> None:
        """Dismiss a process that never got a job: closing the pipe makes it exit."""
        self._close_conn()

    def _on_readable(self) -> None:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            return
        self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, ProcessReady):
            if not self.ready.done():
                self.ready.set_result(None)
        elif isinstance(msg, ProcessFailed):
            if not self.ready.done():
                self.ready.set_exception(ProcessInitError(f"prewarm_fnc failed: {msg.error}"))
        elif isinstance(msg, JobDone) and not self.done.done():
            self.done.set_result(msg)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        # Messages sent just before exiting may still be in the pipe: read them
        # first, so a clean outcome is never mistaken for a crash.
        with contextlib.suppress(EOFError, OSError, ValueError):
            while not self._conn.closed and self._conn.poll():
                self._handle(self._conn.recv())
        self._process.join(0)
        code: int | None = self._process.exitcode
        if not self.ready.done():
            self.ready.set_exception(ProcessInitError(f"{describe_exit(code)} before it was ready"))
        if self.job_started and not self.done.done():
            self.done.set_result(JobDone(ok=False, error=describe_exit(code)))
        if not self.exited.done():
            self.exited.set_result(code)
        self._close_conn()

    def _close_conn(self) -> None:
        if not self._conn.closed:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())
            self._conn.close()


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    # Nobody may ever await a warm process's futures; don't log "never retrieved".
    if not fut.cancelled():
        fut.exception()


class ProcessPool:
    """Keeps warm job processes; see the module docstring for the contract."""

    def __init__(self, opts: WorkerOptions, *, log_level: str, log_format: str) -> None:
        self._opts = opts
        self._log_level = log_level
        self._log_format = log_format
        self._mp = multiprocessing.get_context(opts.multiprocessing_context)
        self._idle: collections.deque[JobProcessHandle] = collections.deque()
        self._warming: set[JobProcessHandle] = set()
        self._all: set[JobProcessHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._refill_paused = False
        self._backoff = 0.0
        self._respawn_at = 0.0
        self._respawn_timer: asyncio.TimerHandle | None = None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def start(self) -> None:
        """Begin warming `num_idle_processes` processes."""
        if self._opts.multiprocessing_context == "forkserver":
            # "__main__" (the multiprocessing default) re-imports the main script in
            # the server, so functions defined there can be found by name.
            preload = ["__main__", "trunkline.worker._child"]
            for fnc in (self._opts.entrypoint_fnc, self._opts.prewarm_fnc):
                module = getattr(fnc, "__module__", None)
                if module and module not in preload:
                    preload.append(module)
            # Global to the process and read when the forkserver first starts.
            self._mp.set_forkserver_preload(preload)
        self._refill()

    def stop_refilling(self) -> None:
        """Stop replacing used processes (draining: no new jobs will come)."""
        self._refill_paused = True
        while self._idle:
            self._idle.popleft().close_idle()

    async def acquire(self) -> JobProcessHandle:
        """A prewarmed process ready for `start_job`; raises `ProcessInitError`."""
        if self._closed:
            raise ProcessInitError("worker is closing")
        handle: JobProcessHandle | None = None
        while self._idle:
            candidate = self._idle.popleft()
            if not candidate.exited.done():
                handle = candidate
                break
        if handle is None:
            handle = next((h for h in self._warming if not h.claimed), None)
        if handle is None:
            handle = self._spawn()
        handle.claimed = True
        self._refill()
        try:
            await asyncio.wait_for(
                asyncio.shield(handle.ready), self._opts.initialize_process_timeout
            )
        except TimeoutError:
            handle.kill()
            raise ProcessInitError(
                f"job process was not ready within {self._opts.initialize_process_timeout:g}s"
            ) from None
        return handle

    def _spawn(self) -> JobProcessHandle:
        handle = JobProcessHandle(self._mp, self._opts, self._log_level, self._log_format)
        self._warming.add(handle)
        self._all.add(handle)
        self._track(self._warm(handle))
        handle.exited.add_done_callback(lambda _f: self._on_exit(handle))
        return handle

    def _on_exit(self, handle: JobProcessHandle) -> None:
        self._all.discard(handle)
        if handle in self._idle:
            # A warm process died while waiting (OOM killer, operator): replace it.
            self._idle.remove(handle)
            logger.warning("idle job process exited", extra={"pid": handle.pid})
            self._refill()

    def _track(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm(self, handle: JobProcessHandle) -> None:
        loop = asyncio.get_running_loop()
        try:
            await handle.start()
            if self._closed:
                # aclose() ran while the process was starting and could not see it.
                handle.kill()
                return
            await asyncio.wait_for(
                asyncio.shield(handle.ready), self._opts.initialize_process_timeout
            )
        except (ProcessInitError, TimeoutError, OSError) as exc:
            self._warming.discard(handle)
            handle.kill()
            if not handle.ready.done():
                # e.g. the OS refused a new process: whoever claimed it must not wait.
                handle.ready.set_exception(ProcessInitError(str(exc) or type(exc).__name__))
            if self._closed:
                return
            low, high = _RESPAWN_BACKOFF_S
            self._backoff = min(high, max(low, self._backoff * 2))
            self._respawn_at = loop.time() + self._backoff
            logger.error(
                "job process failed to start",
                extra={"error": str(exc) or type(exc).__name__, "retry_in_s": self._backoff},
            )
            if not handle.claimed and self._respawn_timer is None:
                self._respawn_timer = loop.call_later(self._backoff, self._respawn)
            return
        self._warming.discard(handle)
        self._backoff = 0.0
        if not handle.claimed:
            if self._closed or self._refill_paused:
                handle.close_idle()
            else:
                self._idle.append(handle)
        logger.debug("job process ready", extra={"pid": handle.pid})

    def _respawn(self) -> None:
        self._respawn_timer = None
        self._refill()

    def _refill(self) -> None:
        if self._closed or self._refill_paused:
            return
        if asyncio.get_running_loop().time() < self._respawn_at:
            return
        spare = len(self._idle) + sum(1 for h in self._warming if not h.claimed)
        for _ in range(self._opts.num_idle_processes - spare):
            self._spawn()

    async def aclose(self) -> None:
        """Dismiss idle processes, kill starting ones, and make sure every process
        this pool started has exited (job processes must have been stopped first:
        any still alive after a short grace are killed)."""
        self._closed = True
        if self._respawn_timer is not None:
            self._respawn_timer.cancel()
        while self._idle:
            self._idle.popleft().close_idle()
        for handle in list(self._warming):
            handle.kill()
        # Warm-up tasks end promptly once closed (a process still starting is
        # killed as soon as its start returns); cancelling one mid-start would
        # leave a process nobody watches, which multiprocessing joins at exit.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._opts.initialize_process_timeout)
        for task in list(self._tasks):
            task.cancel()
        alive = [h for h in self._all if h.pid is not None and not h.exited.done()]
        if alive:
            await asyncio.wait([h.exited for h in alive], timeout=2.0)
        for handle in alive:
            if not handle.exited.done():
                logger.warning("killing leftover job process", extra={"pid": handle.pid})
                handle.kill()
        if alive:
            await asyncio.wait([h.exited for h in alive], timeout=2.0)
