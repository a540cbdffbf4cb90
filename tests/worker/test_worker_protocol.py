"""The worker SDK on the wire, against a fake server that records every frame."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from livekit.protocol import agent
from worker import agents
from worker.fake_server import FakeServer, Session, make_job, wait_for
from worker.helpers import Events, make_opts

from trunkline.worker import JobRequest, Worker, WorkerOptions, run_app

JS = agent.JobStatus
WS = agent.WorkerStatus


def final_status(s: Session, job_id: str) -> agent.UpdateJobStatus | None:
    done = [u for u in s.job_statuses(job_id) if u.status in (JS.JS_SUCCESS, JS.JS_FAILED)]
    return done[-1] if done else None


async def run_job(s: Session, job: agent.Job, *, token: str = "tok") -> None:
    """Offer, expect an accept, assign."""
    await s.offer(job)
    answer = await wait_for(lambda: s.answer(job.id), what="answer")
    assert answer.available
    await s.assign(job, url="ws://media", token=token)


async def test_registers_declaring_max_jobs(
    fake: FakeServer, run_worker: Callable[..., Any]
) -> None:
    """The worker registers as JT_ROOM with its agent name and declares max_jobs in the URL."""
    async with run_worker(max_jobs=3) as worker:
        s = fake.last
        assert s.query["max_jobs"] == "3"
        assert s.register is not None
        assert s.register.type == agent.JobType.JT_ROOM
        assert s.register.agent_name == "tester"
        assert s.register.version
        assert worker.id == s.worker_id


async def test_job_runs_and_reports_running_then_success(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """An assigned job runs with the assignment's URL/token; reports JS_RUNNING then JS_SUCCESS."""
    async with run_worker():
        s = fake.last
        job = make_job("J1", events.metadata())
        await run_job(s, job)
        answer = s.answer("J1")
        assert answer is not None
        assert answer.participant_identity == "agent-J1"
        assert answer.participant_attributes["lk.agent.name"] == "tester"
        final = await wait_for(lambda: final_status(s, "J1"), what="final status")
        assert final.status == JS.JS_SUCCESS
        assert [u.status for u in s.job_statuses("J1")] == [JS.JS_RUNNING, JS.JS_SUCCESS]
        started = events.of("J1", "started")[0]
        assert (started["url"], started["token"]) == ("ws://media", "tok")
        assert events.of("J1", "shutdown_callback")[0]["reason"] == "held"


async def test_exception_reports_failed_with_message(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """An entrypoint that raises is JS_FAILED with the exception's type and message."""
    async with run_worker(entrypoint_fnc=agents.fail):
        s = fake.last
        await run_job(s, make_job("J2", events.metadata(), room="r2"))
        final = await wait_for(lambda: final_status(s, "J2"))
        assert final.status == JS.JS_FAILED
        assert final.error == "RuntimeError: agent exploded on r2"


async def test_process_death_reports_failed(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A job process killed by a signal is JS_FAILED naming the signal."""
    async with run_worker(entrypoint_fnc=agents.crash):
        s = fake.last
        await run_job(s, make_job("J3", events.metadata()))
        final = await wait_for(lambda: final_status(s, "J3"))
        assert final.status == JS.JS_FAILED
        assert "killed by SIGKILL" in final.error


async def test_refuses_beyond_max_jobs_counting_accepted_not_running(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """Accepted-but-unassigned offers count: at max_jobs=2 the third is refused softly, WS_FULL."""
    async with run_worker(max_jobs=2) as worker:
        s = fake.last
        jobs = [make_job(f"B{i}", events.metadata()) for i in range(3)]
        for job in jobs:
            await s.offer(job)
        await wait_for(lambda: all(s.answer(j.id) for j in jobs), what="three answers")
        answers = [s.answer(j.id) for j in jobs]
        assert [a.available for a in answers if a] == [True, True, False]
        assert answers[2] is not None
        assert not answers[2].terminate
        assert worker.used_slots == 2
        await wait_for(lambda: any(u.status == WS.WS_FULL for u in s.of("update_worker")))
        for job in jobs[:2]:
            await s.assign(job)
        await wait_for(lambda: all(final_status(s, j.id) for j in jobs[:2]))


async def test_assignment_timeout_frees_the_slot(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """An accepted offer never assigned releases its slot after the assignment timeout."""
    async with run_worker(max_jobs=1, assignment_timeout=0.2) as worker:
        s = fake.last
        await s.offer(make_job("T1", events.metadata()))
        await wait_for(lambda: s.answer("T1"))
        assert worker.used_slots == 1
        await wait_for(lambda: worker.used_slots == 0, what="slot released")
        await run_job(s, make_job("T2", events.metadata()))
        await wait_for(lambda: final_status(s, "T2"))
        assert events.of("T1") == []


async def test_request_fnc_reject_and_silence(
    fake: FakeServer, run_worker: Callable[..., Any]
) -> None:
    """reject() is terminate=true, reject(terminate=False) and silence are soft; no slot kept."""

    async with run_worker(request_fnc=decide) as worker:
        s = fake.last
        for job_id in ("hard", "soft", "silent"):
            await s.offer(make_job(job_id))
        await wait_for(lambda: all(s.answer(j) for j in ("hard", "soft", "silent")))
        got = {
            j: (s.answer(j).available, s.answer(j).terminate) for j in ("hard", "soft", "silent")
        }  # type: ignore[union-attr]
        assert got == {"hard": (False, True), "soft": (False, False), "silent": (False, False)}
        await wait_for(lambda: worker.used_slots == 0)


async def decide(req: JobRequest) -> None:
    if req.id == "hard":
        await req.reject()
    elif req.id == "soft":
        await req.reject(terminate=False)


async def test_termination_cancels_job_and_runs_callbacks(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """JobTermination cancels the entrypoint, runs shutdown callbacks, reports final status."""
    async with run_worker(entrypoint_fnc=agents.forever):
        s = fake.last
        await run_job(s, make_job("K1", events.metadata()))
        await wait_for(lambda: events.of("K1", "started"))
        await s.terminate("K1")
        final = await wait_for(lambda: final_status(s, "K1"))
        assert final.status == JS.JS_SUCCESS
        assert events.of("K1", "cancelled")
        assert events.of("K1", "shutdown_callback")[0]["reason"] == "terminated by server"


async def test_status_periodic_and_on_change(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """Status goes out every status_interval and at once when availability changes."""
    async with run_worker(max_jobs=1, status_interval=0.1):
        s = fake.last
        await wait_for(lambda: len(s.of("update_worker")) >= 3, what="periodic status")
        first = s.of("update_worker")[0]
        assert (first.status, first.job_count, first.load) == (WS.WS_AVAILABLE, 0, 0.0)
        await run_job(s, make_job("S1", events.metadata(hold_s=0.3)))
        full = await wait_for(
            lambda: [u for u in s.of("update_worker") if u.status == WS.WS_FULL], what="full"
        )
        assert full[0].load == 1.0
        await wait_for(lambda: final_status(s, "S1"))
        n = len(s.received)
        await wait_for(
            lambda: any(
                m.WhichOneof("message") == "update_worker"
                and m.update_worker.status == WS.WS_AVAILABLE
                for m in s.received[n - 1 :]
            ),
            what="available again",
        )


async def test_reconnect_migrates_running_jobs(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """After a dropped connection the first message re-attaches running jobs (MigrateJobRequest)."""
    async with run_worker(entrypoint_fnc=agents.forever):
        s1 = fake.last
        await run_job(s1, make_job("M1", events.metadata()))
        await wait_for(lambda: events.of("M1", "started"))
        await s1.ws.close()
        await wait_for(lambda: len(fake.sessions) == 2, what="reconnect")
        s2 = fake.last
        await wait_for(lambda: s2.received)
        assert s2.kinds()[0] == "migrate_job"
        assert list(s2.of("migrate_job")[0].job_ids) == ["M1"]
        await s2.terminate("M1")
        final = await wait_for(lambda: final_status(s2, "M1"))
        assert final.status == JS.JS_SUCCESS


async def test_refused_login_backs_off(fake: FakeServer, events: Events) -> None:
    """A 401 is retried with growing jittered delays (no hot loop) until the server accepts."""
    fake.refuse_auth = True
    worker = Worker(make_opts(fake.url, reconnect_base=0.1, reconnect_cap=0.4))
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(fake.attempts) >= 5, what="five refused attempts")
    times = [t for t, _ in fake.attempts[:5]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # nominal 0.1, 0.2, 0.4, 0.4: each gap at least half of it
    for gap, nominal in zip(gaps, (0.1, 0.2, 0.4, 0.4), strict=True):
        assert gap >= nominal / 2 - 0.01
    fake.refuse_auth = False
    await asyncio.wait_for(worker.wait_registered(), 5)
    await worker.aclose()
    await task


async def test_drain_refuses_new_offers_and_lets_jobs_finish(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """drain() reports WS_FULL+draining, refuses offers softly and waits for running jobs."""
    async with run_worker() as worker:
        s = fake.last
        await run_job(s, make_job("D1", events.metadata(hold_s=0.4)))
        await wait_for(lambda: events.of("D1", "started"))
        drain = asyncio.create_task(worker.drain())
        await wait_for(lambda: any(u.draining for u in s.of("update_worker")), what="draining")
        status = next(u for u in s.of("update_worker") if u.draining)
        assert (status.status, status.load) == (WS.WS_FULL, 0.0)
        await s.offer(make_job("D2"))
        answer = await wait_for(lambda: s.answer("D2"))
        assert (answer.available, answer.terminate) == (False, False)
        assert not drain.done()
        await asyncio.wait_for(drain, 10)
        final = await wait_for(lambda: final_status(s, "D1"))
        assert final.status == JS.JS_SUCCESS


async def test_drain_timeout_shuts_jobs_down(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """Jobs still running at the drain timeout are shut down and their status is sent."""
    async with run_worker(entrypoint_fnc=agents.forever) as worker:
        s = fake.last
        await run_job(s, make_job("D3", events.metadata()))
        await wait_for(lambda: events.of("D3", "started"))
        started = time.monotonic()
        await asyncio.wait_for(worker.drain(timeout=0.2), 10)
        assert time.monotonic() - started >= 0.2
        final = await wait_for(lambda: final_status(s, "D3"))
        assert final.status == JS.JS_SUCCESS
        assert events.of("D3", "shutdown_callback")[0]["reason"] == "worker drain timeout"


async def test_prewarm_userdata_reaches_the_job(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """prewarm_fnc runs once in the job's process before the job and its userdata is there."""
    async with run_worker(prewarm_fnc=agents.prewarm):
        s = fake.last
        await run_job(s, make_job("P1", events.metadata()))
        await wait_for(lambda: final_status(s, "P1"))
        started = events.of("P1", "started")[0]
        assert started["userdata"] == {"model": "loaded", "prewarm_pid": started["pid"]}


async def test_failing_prewarm_fails_the_job(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A prewarm_fnc that raises fails the job with the prewarm error."""
    async with run_worker(prewarm_fnc=agents.bad_prewarm, num_idle_processes=0):
        s = fake.last
        await run_job(s, make_job("P2", events.metadata()))
        final = await wait_for(lambda: final_status(s, "P2"))
        assert final.status == JS.JS_FAILED
        assert "ValueError: model file missing" in final.error


async def test_load_fnc_at_threshold_refuses(
    fake: FakeServer, run_worker: Callable[..., Any]
) -> None:
    """An offer is refused softly while load_fnc reports load at or above the threshold."""
    async with run_worker(load_fnc=high_load, load_threshold=0.5):
        s = fake.last
        await s.offer(make_job("L1"))
        answer = await wait_for(lambda: s.answer("L1"))
        assert (answer.available, answer.terminate) == (False, False)


def high_load() -> float:
    return 0.75


async def test_duplicate_offer_refused(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """An offer for a job this worker already runs is refused, never run twice."""
    async with run_worker(entrypoint_fnc=agents.forever):
        s = fake.last
        job = make_job("U1", events.metadata())
        await run_job(s, job)
        await wait_for(lambda: events.of("U1", "started"))
        await s.offer(job)
        await wait_for(lambda: len([a for a in s.of("availability") if a.job_id == "U1"]) == 2)
        second = [a for a in s.of("availability") if a.job_id == "U1"][1]
        assert not second.available
        assert len(events.of("U1", "started")) == 1
        assert json.loads(job.metadata)["events"]


async def test_final_status_sent_after_reconnect(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A job that ends while disconnected has its final status sent on the next session."""
    async with run_worker(reconnect_base=0.05, reconnect_cap=0.1):
        s1 = fake.last
        await run_job(s1, make_job("R1", events.metadata(hold_s=0.3)))
        await wait_for(lambda: events.of("R1", "started"))
        fake.refuse_auth = True
        await s1.ws.close()
        await wait_for(lambda: events.of("R1", "finished"), what="job ended while offline")
        fake.refuse_auth = False
        await wait_for(lambda: len(fake.sessions) == 2, what="reconnect")
        s2 = fake.last
        final = await wait_for(lambda: final_status(s2, "R1"))
        assert final.status == JS.JS_SUCCESS
        assert s2.of("migrate_job") == []


async def test_gives_up_after_max_retry(unused_tcp_port: int) -> None:
    """With max_retry set, run() raises ConnectionError naming the URL after the last attempt."""
    opts = make_opts(f"http://127.0.0.1:{unused_tcp_port}", max_retry=2, reconnect_base=0.01)
    worker = Worker(opts)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{unused_tcp_port}/agent"):
        await asyncio.wait_for(worker.run(), 10)


def test_run_app_without_url_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_app returns exit code 2 when no server URL is configured."""
    monkeypatch.delenv("LIVEKIT_URL", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert run_app(WorkerOptions(entrypoint_fnc=agents.hold)) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_spawn_context_runs_jobs(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """With multiprocessing_context="spawn" jobs run in fresh interpreters just the same."""
    async with run_worker(multiprocessing_context="spawn", prewarm_fnc=agents.prewarm):
        s = fake.last
        await run_job(s, make_job("SP1", events.metadata()))
        final = await wait_for(lambda: final_status(s, "SP1"), within=20)
        assert final.status == JS.JS_SUCCESS
        assert events.of("SP1", "started")[0]["userdata"]["model"] == "loaded"


async def test_garbage_frame_is_ignored(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A frame that is not a ServerMessage is logged and skipped; the session goes on."""
    async with run_worker():
        s = fake.last
        await s.ws.send_bytes(b"\xff\xff\xff\xff")
        await run_job(s, make_job("G1", events.metadata()))
        final = await wait_for(lambda: final_status(s, "G1"))
        assert final.status == JS.JS_SUCCESS
        assert len(fake.sessions) == 1


async def test_job_ignoring_cancellation_is_failed_and_killed(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A job swallowing cancellation is JS_FAILED after shutdown_process_timeout and killed."""
    async with run_worker(entrypoint_fnc=agents.stubborn, shutdown_process_timeout=0.3):
        s = fake.last
        await run_job(s, make_job("X1", events.metadata()))
        started = await wait_for(lambda: events.of("X1", "started"))
        await s.terminate("X1")
        final = await wait_for(lambda: final_status(s, "X1"))
        assert final.status == JS.JS_FAILED
        assert "did not stop within 0.3s" in final.error
        pid = started[0]["pid"]
        await wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="process gone")


async def test_dead_idle_process_is_replaced(
    fake: FakeServer, run_worker: Callable[..., Any], events: Events
) -> None:
    """A warm process that dies while idle is replaced, and jobs still run."""
    async with run_worker(num_idle_processes=1) as worker:
        pool = worker._pool
        await wait_for(lambda: pool.idle_count == 1, what="warm process")
        victim = pool._idle[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await wait_for(
            lambda: pool.idle_count == 1 and pool._idle[0].pid != victim, what="replacement"
        )
        s = fake.last
        await run_job(s, make_job("I1", events.metadata()))
        final = await wait_for(lambda: final_status(s, "I1"))
        assert final.status == JS.JS_SUCCESS
