"""A fuzz test of `/agent` (issue 9): random valid-but-hostile protobuf `WorkerMessage`s
from one connection, next to a well-behaved worker, against a real server.

The hostile worker holds a valid token and sends what a broken or malicious worker
could: answers for jobs never offered to it (the good worker's, made up, huge ids),
job updates for others' jobs, status reports with extreme values (NaN and infinite
loads, job counts of 2^32-1, unknown enum values), migrates of random and others' ids
(and more than any worker may run), repeated registers, pings; a client keeps
dispatching into the pool meanwhile. Whatever closes its connection (a protocol
error) it reconnects. After every example the server's tables must still add up:
no worker over its capacity, each pool's active and queued counters equal to its
live jobs, the worker's JSON served strictly, and the good worker's jobs exactly
as they were: running on it, never terminated, never handed to anyone else.

Deterministic for CI: `derandomize=True`, no example database, 60 examples of up to
12 steps (about 5 s on 2 cores). TRUNKLINE_FUZZ_EXAMPLES raises it for a deep run
(e.g. 2000), with fresh random draws when TRUNKLINE_FUZZ_RANDOM=1.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit.protocol import agent
from protoworker import ProtoWorker
from server.conftest import MakeServer
from server.helpers import Srv
from server.limits import strict_json
from support import wait_until

from trunkline.core import JobState

POOL = "fz"
EXAMPLES = int(os.environ.get("TRUNKLINE_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("TRUNKLINE_FUZZ_RANDOM") == "1"
CONFIG = {
    "server": {"max_trace_events": 50},
    "pools": {
        POOL: {
            "max_jobs_per_worker": 3,
            "max_concurrent_jobs": 12,
            "availability_timeout_s": 0.3,
            "queue_max_wait_s": 1.0,
            "max_queued": 10,
            "reconnect_grace_s": 0.5,
            "refusal_backoff_s": 0.2,
            "terminate_timeout_s": 0.5,
        }
    },
}

# ------------------------------------------------------------------ strategies

T = TypeVar("T")


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, drawn in proportion to its weight (`st.one_of` would
    treat a repeated strategy as one)."""
    slots = [i for i, (n, _) in enumerate(choices) for _ in range(n)]
    return st.sampled_from(slots).flatmap(lambda i: choices[i][1])


# Which job id a step names; resolved against the live run (see `Fuzz.job_id`):
# mostly ids the run knows (its latest offers first), sometimes made-up or huge ones.
known = st.tuples(
    st.sampled_from(["offered", "offered", "offered", "assigned", "assigned", "good", "seen"]),
    st.integers(0, 5),
)
made_up = st.tuples(st.just("made-up"), st.text(min_size=0, max_size=20))
huge = st.tuples(st.just("huge"), st.integers(129, 4000))  # a protocol error in a migrate
job_ref = weighted((4, known), (2, made_up), (1, huge))
# Mostly loads a worker could report, so it keeps getting offers; sometimes anything.
load = weighted(
    (3, st.floats(0.0, 0.9)),
    (1, st.floats(width=32, allow_nan=True, allow_infinity=True)),
    (1, st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 1e30, -1e30])),
)
job_status = st.sampled_from(
    [
        agent.JobStatus.JS_PENDING,
        agent.JobStatus.JS_RUNNING,
        agent.JobStatus.JS_SUCCESS,
        agent.JobStatus.JS_FAILED,
        99,
    ]
)
status = st.tuples(
    st.just("status"),
    st.sampled_from([agent.WorkerStatus.WS_AVAILABLE, agent.WorkerStatus.WS_FULL, 7, None]),
    load,
    st.integers(0, 2**32 - 1),
    st.sampled_from([False, False, False, False, True]),  # draining sticks: seldom
)
# The steps, weighted: those that move jobs come up most (the hostile worker playing
# along for once, answering its latest offer and reporting its latest assignment, so it
# holds jobs to lose, migrate and fail); those that get its connection closed (an
# oversized migrate, a second register, a dropped socket) seldom.
step = weighted(
    (2, st.tuples(st.just("answer"), job_ref, st.booleans(), st.booleans())),
    (4, st.tuples(st.just("answer_latest"), st.booleans(), st.booleans())),
    (3, st.tuples(st.just("report_latest"), job_status)),
    (2, st.tuples(st.just("update_job"), job_ref, job_status, st.text(max_size=30))),
    (2, status),
    (2, st.tuples(st.just("migrate"), st.lists(weighted((3, known), (1, made_up)), max_size=6))),
    (4, st.tuples(st.just("dispatch"))),
    (1, st.tuples(st.just("cancel_all"))),
    (1, st.tuples(st.just("ping"))),
    (1, st.tuples(st.just("migrate"), st.lists(huge, min_size=1, max_size=2))),
    (1, st.tuples(st.just("migrate_many"), st.integers(1001, 1500))),
    (1, st.tuples(st.just("register"))),
    (1, st.tuples(st.just("reconnect"))),
)


# ------------------------------------------------------------------- the rig


@dataclass
class Fuzz:
    srv: Srv
    good: ProtoWorker
    baseline: list[str]  # the good worker's running jobs: must stay exactly so
    hostile: ProtoWorker | None = None
    hostiles: list[ProtoWorker] = field(default_factory=list)  # every connection so far
    seen: list[str] = field(default_factory=list)  # every job id dispatched in the run

    async def connect_hostile(self) -> ProtoWorker:
        h = self.hostile
        if h is not None and not h.closed.is_set():
            return h
        if h is not None:
            old = h.worker_id
            await h.close()
            await wait_until(lambda: self.srv.dispatcher.worker(old) is None, 5.0, 0.005)
        h = self.srv.worker(POOL, max_jobs=3, worker_token="hostile")
        await h.connect()
        self.hostile = h
        self.hostiles.append(h)
        return h

    def job_id(self, ref: tuple[str, Any]) -> str:
        kind, arg = ref
        if kind in ("made-up", "latest-offer", "latest-assigned"):
            return str(arg)
        if kind == "huge":
            return "AJ_" + "h" * int(arg)
        pools = {
            "good": self.baseline,
            "offered": [j for h in self.hostiles for j in h.offers],
            "assigned": [j for h in self.hostiles for j in h.assigned],
            "seen": self.seen,
        }
        ids = pools[kind] or self.baseline
        return ids[-1 - int(arg) % len(ids)]  # the latest first

    def message(self, s: tuple[Any, ...]) -> agent.WorkerMessage | None:
        kind = s[0]
        h = self.hostile
        if kind == "answer_latest" and h is not None and h.offers:
            s = ("answer", ("latest-offer", h.offers[-1]), *s[1:])
        elif kind == "report_latest" and h is not None and h.assigned:
            s = ("update_job", ("latest-assigned", h.assigned[-1]), s[1], "")
        elif kind in ("answer_latest", "report_latest"):
            return agent.WorkerMessage(ping=agent.WorkerPing(timestamp=10**12))
        kind = s[0]
        if kind == "answer":
            _, ref, available, terminate = s
            resp = agent.AvailabilityResponse(
                job_id=self.job_id(ref),
                available=available,
                terminate=terminate,
                participant_identity="hostile",
            )
            return agent.WorkerMessage(availability=resp)
        if kind == "update_job":
            _, ref, status, error = s
            upd = agent.UpdateJobStatus(job_id=self.job_id(ref), status=status, error=error)
            return agent.WorkerMessage(update_job=upd)
        if kind == "status":
            _, ws, value, count, draining = s
            report = agent.UpdateWorkerStatus(load=value, job_count=count, draining=draining)
            if ws is not None:
                report.status = ws
            return agent.WorkerMessage(update_worker=report)
        if kind == "migrate":
            ids = [self.job_id(r) for r in s[1]]
            return agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=ids))
        if kind == "migrate_many":
            ids = [f"AJ_many{i}" for i in range(s[1])]
            return agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=ids))
        if kind == "register":
            reg = agent.RegisterWorkerRequest(type=agent.JobType.JT_ROOM, agent_name=POOL)
            return agent.WorkerMessage(register=reg)
        if kind == "ping":  # a timestamp no barrier of ProtoWorker's uses
            return agent.WorkerMessage(ping=agent.WorkerPing(timestamp=10**12))
        return None

    async def run(self, script: list[tuple[Any, ...]]) -> None:
        for s in script:
            if s[0] == "dispatch":
                status, body = await self.srv.call(
                    "POST", "/v1/dispatches", json={"agent_name": POOL}
                )
                assert status in (201, 429), body
                self.seen.append(body["job_id"])
                if self.hostile is not None:
                    await self.settle(self.hostile)  # its offer, if any, has arrived
                continue
            if s[0] == "cancel_all":  # a client ends every job but the good worker's
                for job in list(self.srv.dispatcher.live_jobs()):
                    if job.id not in self.baseline:
                        await self.srv.call("DELETE", f"/v1/jobs/{job.id}")
                continue
            h = await self.connect_hostile()
            if s[0] == "reconnect":
                await h.abort()
                continue
            msg = self.message(s)
            assert msg is not None
            if h.closed.is_set():
                continue
            try:
                await h.send(msg)
            except ConnectionError:
                continue  # closed under us by an earlier protocol error
        if self.hostile is not None:
            await self.settle(self.hostile)
        await self.good.barrier()

    async def settle(self, h: ProtoWorker) -> None:
        """Return once the server has handled everything `h` sent: its pong came
        back, or it was closed (a protocol error) and the server let it go."""
        if not h.closed.is_set():
            barrier = asyncio.ensure_future(h.barrier())
            closed = asyncio.ensure_future(h.closed.wait())
            done, pending = await asyncio.wait(
                {barrier, closed}, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            assert done, "the hostile connection neither answered nor closed"
            if barrier in done and barrier.exception() is None:
                return
        d = self.srv.dispatcher
        await wait_until(lambda: d.worker(h.worker_id) is None, 5.0, 0.005)

    async def check(self) -> None:
        """The server's tables still add up, and the good worker is untouched."""
        d = self.srv.dispatcher
        for w in d.workers():
            assert w.capacity is not None
            assert w.used <= w.capacity, f"{w.id}: {w.used} used, capacity {w.capacity}"
            assert len(w.jobs) + len(w.offers) == w.used
        live = list(d.live_jobs())
        for pool in d.pools():
            mine = [j for j in live if j.agent_name == pool.name]
            assert pool.active == sum(1 for j in mine if j.state.active), pool.name
            queued = [j for j in mine if j.state is JobState.QUEUED and j.queued_since]
            assert pool.queued == len(queued), pool.name
            quota = pool.config.max_concurrent_jobs
            assert quota is None or pool.active <= quota
        good = d.worker(self.good.worker_id)
        assert good is not None, "the good worker was disconnected"
        for job_id in self.baseline:
            job = d.live_job(job_id)
            assert job is not None, f"{job_id} of the good worker ended"
            assert (job.state, job.worker_id) == (JobState.RUNNING, self.good.worker_id)
            assert good.jobs.get(job_id) is job
            assert len(job.trace) <= 50
        assert self.good.terminated == []
        async with self.srv.session.get(self.srv.url + "/v1/workers", headers=self.srv.auth) as r:
            assert r.status == 200
            for info in strict_json(await r.text())["workers"]:
                assert 0.0 <= info["load"] <= 1.0


@pytest.fixture
async def fuzz(make_server: MakeServer) -> AsyncIterator[Fuzz]:
    """A server, a good worker holding two running jobs, then the hostile worker."""
    srv = await make_server(CONFIG)
    good = ProtoWorker(srv.url, POOL, max_jobs=3, auto="accept", auto_run=True)
    srv.workers.append(good)
    await good.connect()
    baseline = [(await srv.dispatch(POOL))["job_id"] for _ in range(2)]
    for job_id in baseline:
        await srv.wait_state(job_id, "running")
    good.auto = "ignore"  # from now on it holds its two jobs and takes nothing new
    await good.status(full=True)
    await good.barrier()
    rig = Fuzz(srv, good, baseline)
    await rig.connect_hostile()
    yield rig
    # After the whole run the server still serves: with the hostile gone and the jobs
    # it left cancelled, the good worker takes a new job.
    if rig.hostile is not None:
        await rig.hostile.close()
        await rig.settle(rig.hostile)
    for job in list(srv.dispatcher.live_jobs()):
        if job.id not in baseline:
            srv.dispatcher.cancel(job.id, "fuzz run over")
    good.auto = "accept"
    await good.status()
    job_id = (await srv.dispatch(POOL, max_wait_s=5))["job_id"]
    await srv.wait_state(job_id, "running", within=10)


@settings(
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(step, min_size=1, max_size=12))
async def test_hostile_worker_messages_leave_slot_accounting_and_others_intact(
    fuzz: Fuzz, script: list[tuple[Any, ...]]
) -> None:
    """Random valid-but-hostile WorkerMessages from one connection never break slot
    accounting, the pool counters or the good worker's jobs (one server for the run)."""
    await fuzz.run(script)
    await fuzz.check()
