"""The Dispatcher's query side: its clock and every read of the scheduler's
tables and the job history (runtime/dispatcher.py holds the commands).

Queries hand out the core's records (`Job`, `Worker`, `Pool`) for reading
only, and immutable `JobRecord`s of live and ended jobs; none changes state,
except `record_scale_event`, which files a record with the history writer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from trunkline.core import Job, Scheduler, Worker
from trunkline.core.autoscale import Demand, ScaleEvent
from trunkline.core.pool import Pool
from trunkline.runtime import job_query
from trunkline.runtime.dispatch_ports import new_id
from trunkline.runtime.history import HistoryStatus, HistoryWriter
from trunkline.runtime.retention import Retention
from trunkline.stores import JobFilter, JobRecord, SipCallRecord
from trunkline.stores.usage import ScaleEventRecord, UsageRow


def not_started() -> float:
    """The clock before `Dispatcher.start`."""
    raise AssertionError("Dispatcher.start() was not called")


class DispatcherQueries:
    """The `Dispatcher`'s queries (it inherits them); the state they read is
    the Dispatcher's, set up in its `__init__`."""

    _sched: Scheduler
    _writer: HistoryWriter
    _retention: Retention
    _sip: dict[str, SipCallRecord]  # live jobs of SIP calls
    _wall_offset: float  # Unix time minus the loop's clock
    _clock: Callable[[], float]  # the loop's clock once started

    def now(self) -> float:
        return self._clock()

    def wall(self, t: float | None) -> float | None:
        """A scheduler time as a Unix timestamp."""
        return None if t is None else t + self._wall_offset

    @property
    def wall_offset(self) -> float:
        return self._wall_offset

    def record(self, job: Job) -> JobRecord:
        """An immutable snapshot of `job` (live or ended) in wall-clock time."""
        return JobRecord.from_job(job, self._wall_offset, sip=self._sip.get(job.id))

    def live_job(self, job_id: str) -> Job | None:
        return self._sched.jobs.get(job_id)

    def live_jobs(self) -> Iterable[Job]:
        """Live jobs, oldest first."""
        return self._sched.jobs.values()

    def live_job_count(self) -> int:
        return len(self._sched.jobs)

    def live_jobs_in_room(self, room: str) -> list[Job]:
        """Live jobs whose room is `room` (the webhook intake ends them)."""
        return list(self._sched.by_room.get(room, {}).values())

    def live_dispatches(self, room: str = "", dispatch_id: str = "") -> list[Job]:
        """Live jobs created by a dispatch, in `room` and/or of `dispatch_id`."""
        if dispatch_id:
            job = self._sched.by_dispatch.get(dispatch_id)
            found = [job] if job is not None else []
        elif room:
            found = list(self._sched.by_room.get(room, {}).values())
        else:
            found = list(self._sched.jobs.values())
        return [j for j in found if j.dispatch_id and (not room or j.room == room)]

    async def find_job(self, job_id: str) -> JobRecord | None:
        """The job live or ended (as a snapshot), or None."""
        job = self._sched.jobs.get(job_id)
        if job is not None:
            return self.record(job)
        return await self._writer.get(job_id)

    async def list_jobs(self, flt: JobFilter, limit: int) -> list[JobRecord]:
        """Up to `limit` jobs matching `flt`: live ones (oldest first), then
        ended ones, newest first."""
        out: list[JobRecord] = []
        live: Iterable[Job]
        if flt.room is not None:
            live = self._sched.by_room.get(flt.room, {}).values()
        else:
            live = self._sched.jobs.values()
        for job in live:
            rec = self.record(job)
            if flt.matches(rec):
                out.append(rec)
                if len(out) >= limit:
                    return out
        async for rec in self._writer.query(flt, limit - len(out)):
            out.append(rec)
        return out

    async def query_jobs(
        self, flt: JobFilter, *, limit: int, cursor: str | None = None
    ) -> job_query.JobPage:
        """A page of up to `limit` jobs matching `flt`: live ones first (oldest
        first), then ended ones (newest first) from the history, starting at
        `cursor` (a `next_cursor` handed out before; see `runtime.job_query`).
        Raises `InvalidQuery` (limit) or `BadCursor`."""
        return await job_query.page(self._live_records(flt), self._writer.page, flt, limit, cursor)

    def _live_records(self, flt: JobFilter) -> Iterable[JobRecord]:
        """Snapshots of the live jobs that may match `flt` (the caller checks
        `flt.matches`); the cheap fields are checked before a snapshot is made."""
        jobs: Iterable[Job]
        if flt.room is not None:
            jobs = self._sched.by_room.get(flt.room, {}).values()
        else:
            jobs = self._sched.jobs.values()
        if (flt.trunk is not None or flt.caller is not None) and not self._sip:
            return
        for job in list(jobs):
            if (
                (flt.states is None or job.state.value in flt.states)
                and (flt.agent_name is None or job.agent_name == flt.agent_name)
                and (flt.worker_id is None or job.worker_id == flt.worker_id)
                and (flt.dispatch_id is None or job.dispatch_id == flt.dispatch_id)
            ):
                yield self.record(job)

    def record_scale_event(self, ev: ScaleEvent) -> None:
        """Keep the autoscaler's event `ev` in the history (through the
        writer: never blocks; shed and counted when the writer is full)."""
        self._writer.put_scale_event(
            ScaleEventRecord.from_event(ev, self._wall_offset, new_id("SE_"))
        )

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[ScaleEventRecord]:
        """Scale events from the history, newest first (see
        `HistoryStore.scale_events`). Raises `InvalidQuery`."""
        return await self._writer.scale_events(pool=pool, since=since, until=until, limit=limit)

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        """The usage report from the history (see `HistoryStore.usage`).
        Raises `InvalidQuery`, or `StoreError` while the store fails."""
        return await self._writer.usage(since=since, until=until, bucket=bucket, pool=pool)

    def recent_ended(self, limit: int) -> list[JobRecord]:
        """The newest ended jobs still held in memory, newest first (the
        dashboard's list; may be fewer than the store holds)."""
        return self._writer.recent(limit)

    def worker(self, worker_id: str) -> Worker | None:
        return self._sched.workers.get(worker_id)

    def workers(self) -> Iterable[Worker]:
        return self._sched.workers.values()

    def worker_count(self) -> int:
        return len(self._sched.workers)

    def pools(self) -> Iterable[Pool]:
        return self._sched.pools.values()

    def pool(self, name: str) -> Pool | None:
        """The pool of an agent name, None if none was configured or seen."""
        return self._sched.pools.get(name)

    def pool_has_capacity(self, name: str) -> bool:
        """Could a job of this pool be offered right now?"""
        p = self._sched.pools.get(name)
        return p is not None and not p.quota_full() and p.free_slots() > 0

    def demand(self, pool: str, refused_window_s: float) -> Demand:
        """The pool's demand for the autoscaler (each caller counted once)."""
        return self._sched.demand(self.now(), pool, refused_window_s)

    def slots_used(self, worker_id: str) -> int | None:
        """Slots the worker holds (offers + jobs); None if not connected."""
        w = self._sched.workers.get(worker_id)
        return w.used if w is not None else None

    def counters(self) -> tuple[Iterable[tuple[str, int]], Iterable[tuple[tuple[str, str], int]]]:
        """(requests per pool, ended jobs per (pool, outcome)) since start."""
        return self._sched.requested.items(), self._sched.ended.items()

    def offer_answers(self) -> Iterable[tuple[tuple[str, str], int]]:
        """Offers per (pool, how they were answered) since start."""
        return self._sched.offer_answers.items()

    def history_status(self) -> HistoryStatus:
        """The history's health: backend, degraded or not (and why), records
        pending, written, shed, pruned (/healthz, /metrics)."""
        st = self._writer.status()
        return dataclasses.replace(
            st, pruned=self._retention.pruned, prune_errors=self._retention.errors
        )

    @property
    def history_dropped(self) -> int:
        """Ended records the history writer had to shed (store too slow)."""
        return self._writer.dropped
