"""Real `livekit-agents` 1.8.9 workers against a real trunkline server.

One server process for the module, with a pool per scenario; the workers are
started once (each takes a few seconds to import and warm a process) and the
tests dispatch to their agent names. What a job did is read from the events
file the agent appends to (see lk_agent.py) and from trunkline's job traces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit import api
from support import KEY, SECRET, ServerProcess, child_env, peak_level, wait_until

pytestmark = pytest.mark.compat

AGENT = Path(__file__).with_name("lk_agent.py")

CONFIG = """
[pools.cap4]
max_jobs_per_worker = 4
queue_max_wait_s = 60
[pools.pair]
max_jobs_per_worker = 2
[pools.solo]
max_jobs_per_worker = 2
"""


class Env:
    def __init__(self, server: ServerProcess, events: Path) -> None:
        self.server = server
        self.events = events

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    async def workers(self, agent_name: str) -> list[dict[str, Any]]:
        data = await self.server.get("/v1/workers")
        return [w for w in data["workers"] if w["agent_name"] == agent_name]

    async def job(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.server.get(f"/v1/jobs/{job_id}")
        return data

    async def ended(self, job_id: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["ended"] else None

        result: dict[str, Any] = await wait_until(check, 60, what=f"job {job_id} ends")
        return result


def _start_worker(env: Env, agent_name: str, tag: str, log_dir: Path) -> subprocess.Popen[bytes]:
    with (log_dir / f"worker-{agent_name}-{tag}.log").open("wb") as log:
        return _popen_worker(env, agent_name, tag, log)


def _popen_worker(env: Env, agent_name: str, tag: str, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(AGENT), "start"],
        env=child_env(
            LIVEKIT_URL=env.server.ws_url,
            LIVEKIT_API_KEY=KEY,
            LIVEKIT_API_SECRET=SECRET,
            TL_AGENT_NAME=agent_name,
            TL_TAG=tag,
            TL_EVENTS=str(env.events),
            # trunkline alone must hold the cap: switch off the worker's own guard
            TL_NO_LOAD_GUARD="1",
            TL_IDLE="1",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(AGENT.parent),
    )


@pytest.fixture(scope="module")
def lk_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("compat")
    server = ServerProcess(tmp, CONFIG)
    server.start()
    env = Env(server, tmp / "events.jsonl")
    # Order matters for "pair": A registers first, so pack placement offers to A first.
    procs = [_start_worker(env, "cap4", "C", tmp), _start_worker(env, "pair", "A", tmp)]
    try:

        async def ready() -> None:
            await wait_until(lambda: env.workers("pair"), 60, what="worker A registers")
            procs.append(_start_worker(env, "pair", "B", tmp))
            procs.append(_start_worker(env, "solo", "S", tmp))
            for name, n in (("cap4", 1), ("pair", 2), ("solo", 1)):

                async def registered(name: str = name, n: int = n) -> bool:
                    return len(await env.workers(name)) == n

                await wait_until(registered, 60, what=f"{n} {name} workers register")

        asyncio.run(ready())
        yield env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()


def _lkapi(env: Env) -> api.LiveKitAPI:
    return api.LiveKitAPI(env.server.url, KEY, SECRET)


async def test_worker_registers_with_its_agent_name(lk_env: Env) -> None:
    """An unmodified livekit-agents worker registers and shows up with its pool's cap."""
    workers = await lk_env.workers("cap4")
    assert len(workers) == 1
    assert workers[0]["capacity"] == 4
    assert workers[0]["status"] == "available"


async def test_livekit_api_dispatch_runs_entrypoint_with_metadata(lk_env: Env) -> None:
    """A dispatch made with livekit-api's client runs the entrypoint with metadata intact."""
    metadata = json.dumps({"hold_s": 0.1, "caller": "+15551234567", "note": "héllo"})
    lkapi = _lkapi(lk_env)
    try:
        dispatch = await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="solo", room="room-meta", metadata=metadata)
        )
        listed = await lkapi.agent_dispatch.list_dispatch(room_name="room-meta")
    finally:
        await lkapi.aclose()
    assert dispatch.id.startswith("AD_")
    assert dispatch.agent_name == "solo"
    assert dispatch.room == "room-meta"
    job_id = dispatch.state.jobs[0].id
    assert any(d.id == dispatch.id for d in listed) or (await lk_env.job(job_id))["ended"]
    job = await lk_env.ended(job_id)
    assert job["state"] == "succeeded", job
    starts = [e for e in lk_env.read_events() if e["event"] == "start" and e["job_id"] == job_id]
    assert len(starts) == 1
    assert starts[0]["metadata"] == metadata
    assert starts[0]["tag"] == "S"


async def test_burst_of_13_never_exceeds_cap_and_loses_nothing(lk_env: Env) -> None:
    """13 simultaneous dispatches on one worker capped at 4: never more than 4 run at
    once; the other 9 queue and run as slots free; all 13 succeed."""
    meta = json.dumps({"hold_s": 1.0})
    results = await asyncio.gather(
        *(
            lk_env.server.post("/v1/dispatches", {"agent_name": "cap4", "metadata": meta})
            for _ in range(13)
        )
    )
    assert all(status == 201 for status, _ in results)
    job_ids = [body["job_id"] for _, body in results]
    jobs = [await lk_env.ended(j) for j in job_ids]
    # Every job ran its entrypoint to the end. (livekit-agents 1.8.9's job process
    # sometimes exits 255 after ctx.shutdown() under CPU contention; the worker then
    # reports JS_FAILED, which trunkline records as `failed` - never as lost.)
    assert {j["state"] for j in jobs} <= {"succeeded", "failed"}, [j["reason"] for j in jobs]
    assert all(j["worker_id"] for j in jobs)
    queued = [j for j in jobs if any(ev["event"] == "queued" for ev in j["trace"])]
    assert len(queued) == 9, [ev for ev in queued[0]["trace"]] if queued else None
    # Concurrency as the agent itself saw it: +1 at start, -1 at end.
    mine = set(job_ids)
    marks = sorted(
        (e["t"], 1 if e["event"] == "start" else -1)
        for e in lk_env.read_events()
        if e.get("job_id") in mine and e["event"] in ("start", "end")
    )
    assert len(marks) == 26
    assert peak_level(marks) == 4


async def test_soft_reject_moves_job_to_another_worker(lk_env: Env) -> None:
    """reject(terminate=False) on worker A sends the job to worker B, and the trace says so."""
    meta = json.dumps({"hold_s": 0.1, "soft_reject_tag": "A"})
    status, body = await lk_env.server.post(
        "/v1/dispatches", {"agent_name": "pair", "metadata": meta}
    )
    assert status == 201
    job = await lk_env.ended(body["job_id"])
    assert job["state"] == "succeeded", job
    events = [(ev["event"], ev["worker_id"]) for ev in job["trace"]]
    workers = {w["worker_id"]: w for w in await lk_env.workers("pair")}
    assert len(workers) == 2
    refused = [wid for ev, wid in events if ev == "refused"]
    accepted = [wid for ev, wid in events if ev == "accepted"]
    assert len(refused) == 1
    assert len(accepted) == 1
    assert refused[0] != accepted[0]
    ran = [
        e
        for e in lk_env.read_events()
        if e.get("job_id") == body["job_id"] and e["event"] == "start"
    ]
    assert [e["tag"] for e in ran] == ["B"]


async def test_hard_reject_ends_job_rejected(lk_env: Env) -> None:
    """reject() (terminate=True by default) ends the job `rejected` with a reason."""
    meta = json.dumps({"hard_reject_tag": "S"})
    status, body = await lk_env.server.post(
        "/v1/dispatches", {"agent_name": "solo", "metadata": meta}
    )
    assert status == 201
    job = await lk_env.ended(body["job_id"])
    assert job["state"] == "rejected"
    assert "terminate=true" in job["reason"]
    assert not [
        e
        for e in lk_env.read_events()
        if e.get("job_id") == body["job_id"] and e["event"] == "start"
    ]


async def test_bad_token_gets_401_at_upgrade(lk_env: Env) -> None:
    """A worker with a token signed by the wrong secret is refused with HTTP 401 before
    the websocket upgrade (accept-then-close would make livekit-agents hot-loop)."""
    bad = api.AccessToken(KEY, "not-the-secret").with_grants(api.VideoGrants(agent=True)).to_jwt()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(
                lk_env.server.ws_url + "/agent", headers={"Authorization": f"Bearer {bad}"}
            )
    assert info.value.status == 401
    # and the server is still serving the others
    assert len(await lk_env.workers("cap4")) == 1
