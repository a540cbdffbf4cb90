"""Every LiveKit dispatch path reaches a real livekit-agents 1.8.9 worker
connected to trunkline, through the bridge: trunkline registers with the
LiveKit double as a worker; the double's jobs run on trunkline's workers with
the double's URL and token in the assignment.

One double, one trunkline server and one worker per pool for the module.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.lk_thread import UP_KEY, UP_SECRET, DoubleThread
from livekit.protocol import agent, agent_dispatch, room
from support import KEY, SECRET, ServerProcess, child_env, peak_level, stop_process, wait_until

pytestmark = pytest.mark.compat

AGENT = Path(__file__).with_name("lk_bridge_agent.py")
POOLS = ("lkroom", "lkpart", "lkburst")


class Env:
    def __init__(self, double: DoubleThread, server: ServerProcess, events: Path) -> None:
        self.double = double
        self.server = server
        self.events = events

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    async def started(self, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for ev in self.read_events():
                if ev["event"] == "start" and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            return None

        found: dict[str, Any] = await wait_until(find, 60, what=f"a job starts with {match}")
        return found

    async def ended(self, job_id: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job: dict[str, Any] = await self.server.get(f"/v1/jobs/{job_id}")
            return job if job["ended"] else None

        result: dict[str, Any] = await wait_until(check, 60, what=f"job {job_id} ends")
        return result


@pytest.fixture(scope="module")
def env(lk_double: DoubleThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("bridge")
    config = f"""
[livekit]
url = "{lk_double.ws_url}"
api_key = "{UP_KEY}"
api_secret = "{UP_SECRET}"
bridge = true
bridge_job_types = {{ lkpart = ["participant"] }}
[pools.lkroom]
max_jobs_per_worker = 4
[pools.lkpart]
max_jobs_per_worker = 4
[pools.lkburst]
max_jobs_per_worker = 4
queue_max_wait_s = 60
"""
    server = ServerProcess(tmp, config)
    server.start()
    e = Env(lk_double, server, tmp / "events.jsonl")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in POOLS:
            with (tmp / f"worker-{name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(AGENT), "start"],
                        env=child_env(
                            LIVEKIT_URL=server.ws_url,
                            LIVEKIT_API_KEY=KEY,
                            LIVEKIT_API_SECRET=SECRET,
                            TL_AGENT_NAME=name,
                            TL_TAG=name,
                            TL_EVENTS=str(e.events),
                            TL_IDLE="2",
                        ),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=str(AGENT.parent),
                    )
                )

        async def ready() -> None:
            async def workers() -> bool:
                data = await server.get("/v1/workers")
                return {w["agent_name"] for w in data["workers"]} >= set(POOLS)

            await wait_until(workers, 120, what="a worker per pool registers with trunkline")

            def upstream() -> bool:
                regs = lk_double.run(
                    lambda: {(w.agent_name, w.job_type) for w in lk_double.double.workers.values()}
                )
                return regs >= {
                    ("lkroom", agent.JT_ROOM),
                    ("lkpart", agent.JT_PARTICIPANT),
                    ("lkburst", agent.JT_ROOM),
                }

            await wait_until(upstream, 30, what="the bridge registers upstream")

        asyncio.run(ready())
        yield e
    finally:
        for p in procs:
            stop_process(p, 15)
        server.stop()


def _check_assignment(env: Env, ev: dict[str, Any], room_name: str) -> api.Claims:
    """The job joined the double's URL with a token the double minted for it."""
    assert ev["url"] == env.double.ws_url
    claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(ev["token"])
    assert claims.video.room == room_name
    assert claims.video.room_join
    assert claims.video.agent
    assert claims.identity == f"agent-{ev['tag']}-{ev['job_id']}"
    assert claims.name == f"Agent {ev['tag']}"
    assert claims.attributes["lk.agent_name"] == ev["tag"]
    assert claims.attributes["tl.tag"] == ev["tag"]
    return claims


async def test_room_created_dispatch_runs_on_a_trunkline_worker(env: Env) -> None:
    """A room created with a RoomAgentDispatch on the LiveKit side runs its JT_ROOM
    job on trunkline's worker, with the double's token and URL."""
    d = env.double
    meta = json.dumps({"hold_s": 0.1, "via": "room"})
    rad = agent_dispatch.RoomAgentDispatch(agent_name="lkroom", metadata=meta)
    created = d.run(lambda: d.double.create_room("room-auto", [rad]).proto)
    ev = await env.started(room="room-auto")
    assert ev["tag"] == "lkroom"
    assert ev["metadata"] == meta
    assert ev["room_sid"] == created.sid
    assert ev["type"] == agent.JT_ROOM
    _check_assignment(env, ev, "room-auto")
    job = await env.ended(ev["job_id"])
    assert job["state"] == "succeeded", job
    results = d.run(lambda: [r for r in d.double.results if r.job.id == ev["job_id"]])
    assert [r.outcome for r in results] == ["running"]
    assert results[0].token == ev["token"]


async def test_participant_join_dispatch_from_a_token_room_config(env: Env) -> None:
    """A participant whose token's room configuration names an agent creates the room;
    its join launches a JT_PARTICIPANT job that runs on trunkline's worker."""
    d = env.double
    cfg = room.RoomConfiguration(agents=[agent_dispatch.RoomAgentDispatch(agent_name="lkpart")])
    d.run(lambda: d.double.join("room-join", "caller-1", room_config=cfg))
    ev = await env.started(room="room-join")
    assert ev["tag"] == "lkpart"
    assert ev["type"] == agent.JT_PARTICIPANT
    assert ev["participant"] == "caller-1"
    _check_assignment(env, ev, "room-join")
    job = await env.ended(ev["job_id"])
    assert job["state"] == "succeeded", job
    # The room-created (JT_ROOM) launch found no JT_ROOM worker for lkpart, as the
    # bridge registers lkpart for participant jobs only.
    assert ("lkpart", agent.JT_ROOM) in d.run(lambda: list(d.double.not_dispatched))


async def test_create_dispatch_sent_to_livekit_runs_on_a_trunkline_worker(env: Env) -> None:
    """CreateDispatch sent with livekit-api to the LiveKit double runs on
    trunkline's worker with the double's token and URL."""
    meta = json.dumps({"hold_s": 0.1, "via": "api"})
    async with api.LiveKitAPI(env.double.url, UP_KEY, UP_SECRET) as lkapi:
        dispatch = await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="lkroom", room="room-api", metadata=meta)
        )
    assert dispatch.id.startswith("AD_")
    ev = await env.started(room="room-api", metadata=meta)
    assert ev["tag"] == "lkroom"
    _check_assignment(env, ev, "room-api")
    job = await env.ended(ev["job_id"])
    assert job["state"] == "succeeded", job
    assert job["dispatch_id"] == dispatch.id


async def test_burst_of_13_through_the_bridge(env: Env) -> None:
    """13 simultaneous upstream dispatches, worker capped at 4: never more than 4
    on it, none lost, the overflow queued within the window or answered "not
    available" in time; the upstream never times out."""
    d = env.double
    meta = json.dumps({"hold_s": 0.3})

    def launch() -> None:
        for i in range(13):
            d.double.add_dispatch(f"burst-{i}", "lkburst", meta)

    d.run(launch)

    def results() -> list[Any]:
        return [r for r in d.double.results if r.job.agent_name == "lkburst"]

    done = await wait_until(lambda: len(d.run(results)) == 13 and d.run(results), 30)
    outcomes = [r.outcome for r in done]
    assert set(outcomes) <= {"running", "no_worker"}, [(r.outcome, r.error) for r in done]
    assert "running" in outcomes
    for r in done:
        # Every answer came before the upstream's deadline (3 s less 0.2 s of bids).
        assert r.elapsed_s < d.double.request_timeout_s, r
        assert all(s < d.double.request_timeout_s - d.double.affinity_wait_s for s in r.answer_s)
        if r.outcome == "no_worker":
            assert r.attempts, r
            assert r.attempts[-1][1] == "worker not available", r
    ran = {r.job.id for r in done if r.outcome == "running"}
    for job_id in ran:
        assert (await env.ended(job_id))["state"] in ("succeeded", "failed")
    refused = {r.job.id for r in done} - ran
    for job_id in refused:
        job = await env.ended(job_id)
        assert job["state"] in ("no_capacity", "cancelled"), job
    marks = sorted(
        (e["t"], 1 if e["event"] == "start" else -1)
        for e in env.read_events()
        if e.get("job_id") in ran and e["event"] in ("start", "end")
    )
    assert len(marks) == 2 * len(ran)  # every job that ran started and ended
    assert peak_level(marks) <= 4
