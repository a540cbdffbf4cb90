"""Jobs a worker runs: each in its own pool process, from launch to outcome.

Theory of operation: `launch()` registers the job at once (so it counts as a
used slot with no gap after its reservation) and starts it in a task: get a
warm process, hand it the job, report `JS_RUNNING`, wait for the outcome, and
report `JS_SUCCESS` or `JS_FAILED` with the error. `stop()` asks a job to end
(server termination, drain timeout, close); a job still waiting for its
process is not started at all. A process that does not end within
`shutdown_process_timeout` of a stop request is killed and the job reported
failed. Every launched job produces exactly one final report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from livekit.protocol import agent

from ._ipc import JobDone, StartJob
from ._job import AcceptArguments
from ._options import WorkerOptions
from ._pool import JobProcessHandle, ProcessInitError, ProcessPool
from ._types import ReportFnc, SpawnFnc

logger = logging.getLogger("trunkline.worker")

# Extra time after shutdown_process_timeout before a stopping job's process is killed.
_STOP_GRACE_S = 2.0


@dataclasses.dataclass(eq=False)
class _RunningJob:
    job: agent.Job
    start: StartJob
    launched: asyncio.Future[None]
    handle: JobProcessHandle | None = None
    stop_reason: str | None = None


class JobRunner:
    """The running jobs of one worker; see the module docstring.

    `report(job_id, status, error)` is called for JS_RUNNING and the final
    status; `changed()` after a job ended; `spawn(coro)` runs background work
    under the worker's supervision.
    """

    def __init__(
        self,
        opts: WorkerOptions,
        pool: ProcessPool,
        *,
        report: ReportFnc,
        changed: Callable[[], None],
        spawn: SpawnFnc,
    ) -> None:
        self._opts = opts
        self._pool = pool
        self._report = report
        self._changed = changed
        self._spawn = spawn
        self._jobs: dict[str, _RunningJob] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    @property
    def ids(self) -> list[str]:
        return list(self._jobs)

    @property
    def jobs(self) -> list[agent.Job]:
        return [rj.job for rj in self._jobs.values()]

    def launch(
        self,
        job: agent.Job,
        *,
        url: str,
        token: str,
        accept: AcceptArguments,
        worker_id: str,
    ) -> asyncio.Future[None]:
        """Start `job`; it counts as running from now. The returned future resolves
        once the job was handed to its process (or could not be)."""
        start = StartJob(
            job=job.SerializeToString(), url=url, token=token, worker_id=worker_id, accept=accept
        )
        rj = _RunningJob(job=job, start=start, launched=asyncio.get_running_loop().create_future())
        self._jobs[job.id] = rj
        self._spawn(self._run(rj))
        return rj.launched

    def stop(self, job_id: str, reason: str) -> bool:
        """Ask a running job to end; False if no such job runs here."""
        rj = self._jobs.get(job_id)
        if rj is None:
            return False
        self._spawn(self._stop(rj, reason))
        return True

    def stop_all(self, reason: str) -> None:
        for job_id in list(self._jobs):
            self.stop(job_id, reason)

    async def _run(self, rj: _RunningJob) -> None:
        job_id = rj.job.id
        outcome: JobDone
        try:
            handle = await self._pool.acquire()
        except ProcessInitError as exc:
            outcome = JobDone(ok=False, error=f"could not start the job process: {exc}")
        else:
            rj.handle = handle
            if rj.stop_reason is not None:
                # Stopped before it started: it never ran, so nothing failed.
                handle.close_idle()
                outcome = JobDone(ok=True, reason=rj.stop_reason)
            else:
                handle.start_job(rj.start)
                self._report(job_id, agent.JobStatus.JS_RUNNING, "")
                logger.info("job launched", extra={"job_id": job_id, "pid": handle.pid})
                rj.launched.set_result(None)
                outcome = await asyncio.shield(handle.done)
            self._spawn(handle.reap(self._opts.shutdown_process_timeout))
        finally:
            if not rj.launched.done():
                rj.launched.set_result(None)
        status = agent.JobStatus.JS_SUCCESS if outcome.ok else agent.JobStatus.JS_FAILED
        self._report(job_id, status, outcome.error)
        del self._jobs[job_id]
        self._changed()
        logger.info(
            "job finished",
            extra={
                "job_id": job_id,
                "ok": outcome.ok,
                "error": outcome.error,
                "reason": outcome.reason,
            },
        )

    async def _stop(self, rj: _RunningJob, reason: str) -> None:
        if rj.stop_reason is None:
            rj.stop_reason = reason
        if rj.handle is not None and rj.handle.job_started:
            # The process spends up to shutdown_process_timeout ending the job;
            # the grace covers reporting it before we resort to SIGKILL.
            await rj.handle.stop(reason, self._opts.shutdown_process_timeout + _STOP_GRACE_S)
