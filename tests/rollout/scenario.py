"""The rollout scenario, shared by the local and the Kubernetes provider tests.

A trunkline server in this process runs pool "roll" (cap 4) of real trunkline
SDK workers (tests/autoscale/sdk_agent.py; each call appends start/end lines
with its replica's id). A version is the pool's env `TL_V`: the test rewrites
the config file and asks the server to reload it or to roll out. What each
call ran on comes from three places that must agree: the agents' own lines,
the job's trace (`version` event) and `/v1/pools` (each replica's version).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from support import KEY, SECRET, peak_level, wait_until

from trunkline.auth import admin_token

AGENTS = Path(__file__).resolve().parent.parent / "autoscale"
CAP = 4


def pool_toml(version: str, events: Path, *, extra: str = "", provider: str = "local") -> str:
    command = [sys.executable, "-m", "trunkline", "worker", "sdk_agent:entrypoint"]
    command += ["--max-jobs", str(CAP), "--agent-name", "roll", "--num-idle-processes", "1"]
    return f"""
[pools.roll]
command = {json.dumps(command)}
env = {{ PYTHONPATH = "{AGENTS}", TL_EVENTS = "{events}", TL_V = "{version}" }}
max_jobs_per_worker = {CAP}
queue_max_wait_s = 30
min_replicas = 2
max_replicas = 4
scale_down_delay_s = 60
drain_timeout_s = 60
{extra}
"""


class Client:
    """An admin client of the server under test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        )

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as r:
            r.raise_for_status()
            return await r.json()

    async def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body or {}) as r:
            return r.status, await r.json()

    async def pool(self, name: str = "roll") -> dict[str, Any]:
        data = await self.get("/v1/pools")
        (pool,) = [p for p in data["pools"] if p["agent_name"] == name]
        return dict(pool)

    async def dispatch(self, hold_s: float, name: str = "roll") -> str:
        status, body = await self.post(
            "/v1/dispatches", {"agent_name": name, "metadata": {"hold_s": hold_s}}
        )
        assert status == 201, body
        return str(body["job_id"])

    async def ended(self, job_id: str, within: float = 90.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job: dict[str, Any] = await self.get(f"/v1/jobs/{job_id}")
            return job if job["ended"] else None

        result: dict[str, Any] = await wait_until(check, within, what=f"job {job_id} ends")
        return result

    async def rollout_phase(self, phase: str, within: float = 120.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            ro = (await self.pool())["rollout"]
            return ro if ro is not None and ro["phase"] == phase else None

        result: dict[str, Any] = await wait_until(check, within, what=f"rollout {phase}")
        return result

    async def ready_of(self, version: str, n: int = 1, within: float = 60.0) -> None:
        async def check() -> bool:
            reps = (await self.pool())["replicas"]
            return sum(1 for r in reps if r["state"] == "ready" and r["version"] == version) >= n

        await wait_until(check, within, what=f"{n} ready replica(s) of {version}")


def job_versions(job: dict[str, Any]) -> list[str]:
    return [ev["detail"] for ev in job["trace"] if ev["event"] == "version"]


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def peaks(events: list[dict[str, Any]]) -> dict[str, int]:
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for ev in events:
        changes[ev["replica"]].append((ev["t"], 1 if ev["event"] == "start" else -1))
    return {rid: peak_level(c) for rid, c in changes.items()}


async def stream(
    client: Client,
    stop: asyncio.Event,
    every_s: float,
    hold_s: float,
    steady: asyncio.Event | None = None,
    steady_after: int = 7,
) -> list[str]:
    """Dispatch a call every `every_s` until `stop` is set; the job ids.
    `steady` is set once `steady_after` calls have been dispatched."""
    ids: list[str] = []
    while not stop.is_set():
        ids.append(await client.dispatch(hold_s))
        if steady is not None and len(ids) >= steady_after:
            steady.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return ids


async def run_scenario(
    client: Client, events: Path, set_version: Callable[[str], None]
) -> dict[str, Any]:
    """A -> B under a steady stream, then a 25 % canary of C, then its abort.
    Returns figures for the caller's own checks."""
    pool = await client.pool()
    version_a = pool["autoscale"]["version"]
    await client.ready_of(version_a, 2)

    # ---- A -> B while calls keep coming (about 6 at once: 2 replicas' worth)
    stop = asyncio.Event()
    steady = asyncio.Event()
    task = asyncio.create_task(stream(client, stop, every_s=0.35, hold_s=2.0, steady=steady))
    await asyncio.wait_for(steady.wait(), 60)  # the stream is steady before the rollout
    set_version("B")
    status, body = await client.post("/v1/config/reload")
    assert status == 200, body
    assert "rollout" in body["rollouts"]["roll"], body
    done = await client.rollout_phase("done")
    stop.set()
    ids = await task
    jobs = await asyncio.gather(*(client.ended(j) for j in ids))
    assert [j["state"] for j in jobs] == ["succeeded"] * len(jobs), [j["reason"] for j in jobs]
    version_b = done["to"]
    assert done["from"] == version_a
    assert version_b != version_a
    # Every call was served by exactly one replica, of one version, start to end.
    served = [job_versions(j) for j in jobs]
    assert all(len(v) == 1 for v in served), served
    assert [j["version"] for j in jobs] == [v[0] for v in served]
    on_a = [j for j, v in zip(jobs, served, strict=True) if v == [version_a]]
    on_b = [j for j, v in zip(jobs, served, strict=True) if v == [version_b]]
    assert on_a, "no call on A"
    assert on_b, "no call on B"
    assert len(on_a) + len(on_b) == len(jobs)
    mine = {j["job_id"] for j in jobs}
    evs = [e for e in read_events(events) if e["job_id"] in mine]
    per_replica = peaks(evs)
    assert max(per_replica.values()) <= CAP, per_replica
    replicas = {r["id"]: r for r in (await client.pool())["replicas"]}
    for j in on_a:  # ...on an A replica, by the agents' own lines
        (rid,) = {e["replica"] for e in evs if e["job_id"] == j["job_id"]}
        assert replicas[rid]["version"] == version_a, (rid, replicas[rid])
    pool = await client.pool()
    serving = [r for r in pool["replicas"] if r["state"] in ("ready", "starting")]
    assert {r["version"] for r in serving} == {version_b}
    figures = {"calls": len(jobs), "peak_serving": done["peak_serving"]}
    assert done["peak_serving"] <= len(serving) + done["surge"] + 1, done

    # ---- canary of C at 25 %
    set_version("C")
    status, body = await client.post("/v1/pools/roll/rollout", {"canary_percent": 25})
    assert status == 200, body
    assert body["rollout"]["phase"] == "canary", body
    version_c = body["rollout"]["to"]
    await client.ready_of(version_c, 1)
    n = 80
    ids = []
    for _ in range(n):
        ids.append(await client.dispatch(0.3))
        await asyncio.sleep(0.08)
    jobs = await asyncio.gather(*(client.ended(j) for j in ids))
    assert [j["state"] for j in jobs] == ["succeeded"] * n
    on_c = sum(1 for j in jobs if job_versions(j) == [version_c])
    # binomial(80, 0.25): mean 20, sd 3.9; 3 sd either side
    assert 8 <= on_c <= 32, on_c
    assert all(job_versions(j) in ([version_b], [version_c]) for j in jobs)
    figures["canary_share"] = on_c / n

    # ---- abort: every new call goes back to B
    status, body = await client.post("/v1/pools/roll/rollout", {"action": "abort"})
    assert status == 200, body
    rolled_back = await client.rollout_phase("rolled_back")
    assert rolled_back["target"] == version_b
    ids = [await client.dispatch(0.2) for _ in range(20)]
    jobs = await asyncio.gather(*(client.ended(j) for j in ids))
    assert [job_versions(j) for j in jobs] == [[version_b]] * 20
    pool = await client.pool()
    assert pool["autoscale"]["version"] == version_c  # the file names C; B runs
    serving = [r for r in pool["replicas"] if r["state"] in ("ready", "starting")]
    assert {r["version"] for r in serving} == {version_b}
    return figures
