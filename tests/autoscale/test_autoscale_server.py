"""Autoscaled pools on real processes: a `trunkline serve` child process whose
local provider starts real SDK (and livekit-agents) replicas.

One server for the module, one pool per scenario. What each replica ran is
read from the events file the agents append to (start/end with the replica's
id, see sdk_agent.py), what the server decided from `/v1/pools` and job
traces. Every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, peak_level, wait_until

HERE = Path(__file__).resolve().parent
COMPAT = HERE.parent / "compat"


def _sdk_pool(name: str, cap: int, extra: str, events: Path) -> str:
    command = [sys.executable, "-m", "trunkline", "worker", "sdk_agent:entrypoint"]
    command += ["--max-jobs", str(cap), "--agent-name", name, "--num-idle-processes", "1"]
    return f"""
[pools.{name}]
command = {json.dumps(command)}
env = {{ PYTHONPATH = "{HERE}", TL_EVENTS = "{events}" }}
max_jobs_per_worker = {cap}
queue_max_wait_s = 30
{extra}
"""


def _config(events: Path, run_dir: Path) -> str:
    lk_command = [sys.executable, str(COMPAT / "lk_agent.py"), "start"]
    return (
        f'[autoscale]\nrun_dir = "{run_dir}"\n'
        + _sdk_pool(
            "burst", 4, "min_replicas = 1\nmax_replicas = 5\nscale_down_delay_s = 60", events
        )
        + _sdk_pool(
            "down",
            2,
            "min_replicas = 1\nmax_replicas = 2\nscale_down_delay_s = 0.3\ndrain_timeout_s = 60",
            events,
        )
        + _sdk_pool("kill", 2, "min_replicas = 1\nmax_replicas = 1\nreconnect_grace_s = 60", events)
        + _sdk_pool(
            "redispatch",
            2,
            "min_replicas = 1\nmax_replicas = 1\nreconnect_grace_s = 60\n"
            "redispatch_on_worker_loss = true",
            events,
        )
        + """
[pools.broken]
command = ["/nonexistent/agent-binary"]
max_jobs_per_worker = 1
min_replicas = 1
"""
        + f"""
[pools.lk]
command = {json.dumps(lk_command)}
env = {{ TL_EVENTS = "{events}.lk", TL_AGENT_NAME = "lk", TL_IDLE = "1", TL_NO_LOAD_GUARD = "1" }}
max_jobs_per_worker = 2
min_replicas = 1
max_replicas = 1
queue_max_wait_s = 30

[pools.lkburst]
command = {json.dumps(lk_command)}
env = {{ TL_EVENTS = "{events}.lkburst", TL_AGENT_NAME = "lkburst", TL_IDLE = "1", \
TL_LOAD_PER_JOB = "0.32" }}
max_jobs_per_worker = 4
min_replicas = 1
max_replicas = 6
scale_down_delay_s = 60
queue_max_wait_s = 30
"""
    )  # fmt: skip


class Env:
    def __init__(self, server: ServerProcess, events: Path) -> None:
        self.server = server
        self.events = events

    def read_events(self, path: Path | None = None) -> list[dict[str, Any]]:
        path = path or self.events
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    async def pool(self, name: str) -> dict[str, Any]:
        data = await self.server.get("/v1/pools")
        (pool,) = [p for p in data["pools"] if p["agent_name"] == name]
        result: dict[str, Any] = pool
        return result

    async def replicas(self, name: str, state: str | None = None) -> list[dict[str, Any]]:
        reps = (await self.pool(name))["replicas"]
        return [r for r in reps if state is None or r["state"] == state]

    async def dispatch(self, name: str, hold_s: float | Path) -> str:
        """A call to pool `name` held `hold_s` seconds, or until the file
        `hold_s` exists (when given a path)."""
        meta = {"until": str(hold_s)} if isinstance(hold_s, Path) else {"hold_s": hold_s}
        status, body = await self.server.post(
            "/v1/dispatches", {"agent_name": name, "metadata": meta}
        )
        assert status == 201, body
        job_id: str = body["job_id"]
        return job_id

    async def job(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.server.get(f"/v1/jobs/{job_id}")
        return data

    async def ended(self, job_id: str, within: float = 30.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["ended"] else None

        result: dict[str, Any] = await wait_until(check, within, what=f"job {job_id} ends")
        return result

    async def running(self, job_id: str) -> None:
        async def check() -> bool:
            return (await self.job(job_id))["state"] == "running"

        await wait_until(check, 20, what=f"job {job_id} runs")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("autoscale")
    events = tmp / "events.jsonl"
    server = ServerProcess(tmp, _config(events, tmp / "run"))
    server.start()
    e = Env(server, events)
    try:

        async def all_ready() -> None:
            for name in ("burst", "down", "kill", "redispatch", "lk", "lkburst"):

                async def ready(name: str = name) -> bool:
                    return bool(await e.replicas(name, "ready"))

                await wait_until(ready, 60, what=f"pool {name} has a ready replica")

        asyncio.run(all_ready())
        yield e
    finally:
        server.stop()


def peak_per_replica(events: list[dict[str, Any]], job_ids: set[str]) -> dict[str, int]:
    """The most calls each replica held at one instant, from its start/end lines."""
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for ev in events:
        if ev["job_id"] in job_ids:
            # at equal times an end sorts before a start: a freed slot reused at once
            changes[ev["replica"]].append((ev["t"], 1 if ev["event"] == "start" else -1))
    return {replica: peak_level(deltas) for replica, deltas in changes.items()}


def server_peak_per_worker(jobs: list[dict[str, Any]]) -> dict[str, int]:
    """The most slots each worker held at one instant by the server's records
    (from the offer that placed the job to its end)."""
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for job in jobs:
        offers = [ev["at"] for ev in job["trace"] if ev["event"] == "offered"]
        changes[job["worker_id"]] += [(offers[-1], 1), (job["ended_at"], -1)]
    return {wid: peak_level(deltas) for wid, deltas in changes.items()}


async def test_burst_of_13_places_every_call_within_the_cap(env: Env) -> None:
    """13 simultaneous calls at cap 4 with one warm replica: replicas are started
    at once (4 serving, no more), every call is placed and succeeds, no replica
    ever holds a 5th call, and the slowest wait is about one cold start."""
    job_ids = await asyncio.gather(*(env.dispatch("burst", 2.0) for _ in range(13)))
    jobs = await asyncio.gather(*(env.ended(j) for j in job_ids))
    assert [j["state"] for j in jobs] == ["succeeded"] * 13

    peaks = peak_per_replica(env.read_events(), set(job_ids))
    # 4 replicas run calls, or 3 when a call ends before the 4th replica is up
    # and the 13th call takes the freed slot instead
    assert len(peaks) in (3, 4), peaks
    assert max(peaks.values()) <= 4, peaks
    assert max(server_peak_per_worker(jobs).values()) <= 4

    pool = await env.pool("burst")
    ups = [ev for ev in pool["scale_events"] if ev["kind"] == "up" and ev["from"] >= 1]
    # Calls arrive over a few ms of HTTP requests, so the scale-up may come in
    # steps, but never past what 13 calls need: 3 more replicas, 4 serving.
    assert max(ev["to"] for ev in ups) == 4, ups
    started = [rid for ev in ups for rid in ev["replicas"]]
    assert len(started) == 3, ups
    created = sorted(j["created_at"] for j in jobs)
    assert ups[0]["at"] - created[4] < 0.1  # the first overflow call: issued at once
    assert ups[-1]["at"] - created[-1] < 0.1
    cold = [r["cold_start_s"] for r in pool["replicas"] if r["id"] in started]
    slowest = max(j["queue_wait_s"] for j in jobs)
    assert slowest <= max(cold) + 0.5, (slowest, cold)
    # /metrics tells the operator the same story.
    async with (
        aiohttp.ClientSession() as session,
        session.get(env.server.url + "/metrics") as resp,
    ):
        text = await resp.text()
    samples = {
        (s.name, s.labels.get("state") or s.labels.get("kind")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.labels.get("pool") == "burst" and s.name.startswith("trunkline_")
    }
    assert samples[("trunkline_replicas", "ready")] == len(pool["replicas"]) - sum(
        r["state"] != "ready" for r in pool["replicas"]
    )
    kinds = [ev["kind"] for ev in pool["scale_events"]]
    assert samples[("trunkline_scale_events_total", "up")] >= kinds.count("up")
    assert samples[("trunkline_scale_events_total", "up")] >= 2  # the warm replica + the burst


async def test_livekit_agents_burst_with_its_load_guard_starts_4_replicas_not_5(env: Env) -> None:
    """13 calls at cap 4 on livekit-agents replicas whose own load guard is on and
    soft-refuses offers (here: at its threshold with three calls, so every
    re-offer of a 4th slot is refused): each refused call is queued or placed
    elsewhere and counted there once, so the pool grows to the 4 replicas that
    ceil(13 / 4) asks for (counting refusals too started a 5th), and every call
    succeeds."""
    job_ids = await asyncio.gather(*(env.dispatch("lkburst", 3.0) for _ in range(13)))
    jobs = await asyncio.gather(*(env.ended(j, 60) for j in job_ids))
    assert [j["state"] for j in jobs] == ["succeeded"] * 13
    traces = [await env.job(j) for j in job_ids]
    refusals = sum(ev["event"] == "refused" for t in traces for ev in t["trace"])
    assert refusals > 0  # the guard did refuse burst offers (else this pins nothing)
    pool = await env.pool("lkburst")
    ups = [ev for ev in pool["scale_events"] if ev["kind"] == "up" and ev["from"] >= 1]
    assert max(ev["to"] for ev in ups) == 4, ups
    assert len(pool["replicas"]) == 4, pool["replicas"]
    assert max(server_peak_per_worker(jobs).values()) <= 4


async def test_scale_down_drains_and_never_ends_a_live_job(env: Env) -> None:
    """When demand falls, the emptiest replica is drained; one that still holds a
    call gets no new offers and is stopped only after that call has ended."""
    # Each call ends when the scenario says (its file appears), not after a
    # fixed hold: a cold start on a loaded machine can outlast any hold, and
    # B ending before C had its own replica put C in B's slot.
    end_a, end_b, end_c = (env.events.parent / f"down-end-{x}" for x in "abc")
    a = await env.dispatch("down", end_a)
    await env.running(a)
    b = await env.dispatch("down", end_b)  # fills the warm replica (pack)
    c = await env.dispatch("down", end_c)  # needs a second replica
    await wait_until(
        lambda: _runs(env, c), 30, what=f"job {c} runs on a second replica (a cold start)"
    )
    end_b.touch()  # demand falls: A and C still live
    job_b = await env.ended(b)

    async def scaled_down() -> bool:
        return any(ev["kind"] == "down" for ev in (await env.pool("down"))["scale_events"])

    await wait_until(scaled_down, 20, what="a replica of 'down' is drained")
    end_c.touch()
    job_c = await env.ended(c)
    end_a.touch()
    job_a = await env.ended(a)
    assert [j["state"] for j in (job_a, job_b, job_c)] == ["succeeded"] * 3
    assert job_c["worker_id"] != job_a["worker_id"]

    async def stopped() -> list[dict[str, Any]]:
        return await env.replicas("down", "stopped")

    (gone,) = await wait_until(stopped, 20, what="the drained replica stops")
    assert gone["worker_id"] is None
    assert gone["ended_at"] >= job_c["ended_at"]
    assert gone["drain_started_at"] < job_c["ended_at"]  # drained while C was live
    downs = [ev for ev in (await env.pool("down"))["scale_events"] if ev["kind"] == "down"]
    assert downs
    assert downs[0]["replicas"] == [gone["id"]]
    assert downs[0]["demand"]["running"] == 2  # A and C still live when it was chosen


async def _runs(env: Env, job_id: str) -> bool:
    return (await env.job(job_id))["state"] == "running"


async def _kill_replica(env: Env, pool: str) -> dict[str, Any]:
    (replica,) = await env.replicas(pool, "ready")
    os.kill(replica["pid"], signal.SIGKILL)
    return replica


async def _replaced(env: Env, pool: str, old: dict[str, Any]) -> dict[str, Any]:
    async def new_ready() -> dict[str, Any] | None:
        ready = [r for r in await env.replicas(pool, "ready") if r["id"] != old["id"]]
        return ready[0] if ready else None

    result: dict[str, Any] = await wait_until(new_ready, 30, what="a replacement is ready")
    return result


async def test_sigkilled_replica_is_replaced_and_its_jobs_end_worker_lost(env: Env) -> None:
    """SIGKILL on a replica: its calls end `worker_lost` at once (a dead process
    cannot migrate them, so the 60 s reconnect grace is skipped), the failure
    is recorded, and a replacement starts and takes new calls."""
    jobs = [await env.dispatch("kill", 30.0) for _ in range(2)]
    for j in jobs:
        await env.running(j)
    old = await _kill_replica(env, "kill")
    ended = [await env.ended(j, within=10) for j in jobs]
    assert [j["state"] for j in ended] == ["worker_lost"] * 2
    assert "killed by SIGKILL" in ended[0]["reason"]
    new = await _replaced(env, "kill", old)
    pool = await env.pool("kill")
    kinds = [ev["kind"] for ev in pool["scale_events"]]
    assert kinds[-2:] == ["failed", "replace"]
    failed = next(r for r in pool["replicas"] if r["id"] == old["id"])
    assert failed["state"] == "failed"
    assert failed["exit_code"] == -signal.SIGKILL
    job = await env.ended(await env.dispatch("kill", 0.1))
    assert job["state"] == "succeeded"
    assert job["worker_id"] == new["worker_id"]


async def test_sigkilled_replica_jobs_are_redispatched_when_configured(env: Env) -> None:
    """With redispatch_on_worker_loss, a killed replica's calls are placed again
    on its replacement and succeed there."""
    jobs = [await env.dispatch("redispatch", 1.0) for _ in range(2)]
    for j in jobs:
        await env.running(j)
    old = await _kill_replica(env, "redispatch")
    new = await _replaced(env, "redispatch", old)
    ended = [await env.ended(j) for j in jobs]
    assert [j["state"] for j in ended] == ["succeeded"] * 2
    assert {j["worker_id"] for j in ended} == {new["worker_id"]}
    assert all(any(ev["event"] == "redispatched" for ev in j["trace"]) for j in ended)


@pytest.mark.compat
async def test_livekit_agents_replica_takes_jobs(env: Env) -> None:
    """An unmodified livekit-agents worker started by the local provider is tied
    to its replica by LIVEKIT_WORKER_TOKEN and runs jobs."""
    (replica,) = await env.replicas("lk", "ready")
    assert replica["worker_id"]
    assert replica["log"]
    job_ids = [await env.dispatch("lk", 0.2) for _ in range(2)]
    jobs = [await env.ended(j) for j in job_ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 2
    assert {j["worker_id"] for j in jobs} == {replica["worker_id"]}
    started = {e["job_id"] for e in env.read_events(Path(f"{env.events}.lk"))}
    assert set(job_ids) <= started


async def test_a_replica_that_cannot_start_is_retried_with_backoff_and_visible(env: Env) -> None:
    """A command that cannot run: each attempt is a `failed` event naming the
    cause, the replica is `failed` with the reason, and retries back off."""

    async def failures() -> list[dict[str, Any]] | None:
        events = (await env.pool("broken"))["scale_events"]
        failed = [ev for ev in events if ev["kind"] == "failed"]
        return failed if len(failed) >= 3 else None

    failed = await wait_until(failures, 30, what="three failed starts")
    assert "cannot run '/nonexistent/agent-binary'" in failed[0]["reason"]
    assert "next start in 0 s" in failed[0]["reason"]
    assert "next start in 1 s" in failed[1]["reason"]
    assert failed[2]["at"] - failed[1]["at"] >= 0.9  # the 1 s backoff was waited
    replicas = (await env.pool("broken"))["replicas"]
    assert replicas[0]["state"] == "failed"
    assert "No such file" in replicas[0]["detail"]
