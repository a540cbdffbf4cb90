"""A Node `@livekit/agents` 1.9.0 worker (npm; tests/livekit/node, installed by
scripts/bootstrap --test) behind trunkline. The Node SDK never reports job
status, so its jobs end only from outside: here, by the LiveKit double's signed
`participant_left` webhook for the agent (the media server is the double), or,
for a job that came through the bridge, by the upstream's JobTermination when
its agent leaves. Either way the slot is freed and the next job runs on the
same worker (its cap is 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.lk_thread import UP_KEY, UP_SECRET, DoubleThread
from livekit.protocol import agent_dispatch, models
from support import KEY, SECRET, ServerProcess, child_env, wait_until

NODE_DIR = Path(__file__).with_name("node")
NODE = shutil.which("node")
POOL = "nodebot"
AGENT_KIND = models.ParticipantInfo.Kind.AGENT

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(NODE is None, reason="node not installed (scripts/bootstrap --test)"),
]


class Env:
    def __init__(self, double: DoubleThread, server: ServerProcess, events: Path) -> None:
        self.double = double
        self.server = server
        self.events = events

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    async def started(self, room: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next(
                (e for e in self.read_events() if e["event"] == "start" and e["room"] == room),
                None,
            )

        found: dict[str, Any] = await wait_until(find, 60, what=f"a job starts in {room}")
        return found

    async def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await self.server.get(f"/v1/jobs/{job_id}")
        return job

    async def slots_used(self) -> int:
        data = await self.server.get("/v1/workers")
        return sum(w["used"] for w in data["workers"] if w["agent_name"] == POOL)

    def agent_comes_and_goes(self, room: str, identity: str) -> None:
        """The agent joins the double's room, then leaves it (participant_left)."""
        d = self.double

        def both() -> None:
            d.double.join(room, identity, kind=AGENT_KIND)
            d.double.leave(room, identity)

        d.run(both)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not (NODE_DIR / "node_modules" / "@livekit" / "agents").is_dir():
        pytest.fail(
            "@livekit/agents is not installed in tests/livekit/node: scripts/bootstrap --test"
        )
    tmp = tmp_path_factory.mktemp("node")
    server = ServerProcess(tmp)
    double = DoubleThread(webhook_url=server.url + "/v1/livekit/webhook")
    with server.config.open("a") as f:
        f.write(
            f"""
[livekit]
url = "{double.ws_url}"
api_key = "{UP_KEY}"
api_secret = "{UP_SECRET}"
bridge = true
webhook_grace_s = 0.2
[pools.{POOL}]
max_jobs_per_worker = 1
terminate_timeout_s = 1
"""
        )
    server.start()
    e = Env(double, server, tmp / "events.jsonl")
    log = (tmp / "node-worker.log").open("wb")
    assert NODE is not None
    worker = subprocess.Popen(
        [NODE, "agent.mjs", "start"],
        env=child_env(
            LIVEKIT_URL=server.ws_url,
            LIVEKIT_API_KEY=KEY,
            LIVEKIT_API_SECRET=SECRET,
            TL_AGENT_NAME=POOL,
            TL_EVENTS=str(e.events),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(NODE_DIR),
        start_new_session=True,  # its job processes are ended with it, as a group
    )
    try:

        async def ready() -> None:
            async def registered() -> bool:
                data = await server.get("/v1/workers")
                return any(w["agent_name"] == POOL for w in data["workers"])

            await wait_until(registered, 120, what="the Node worker registers with trunkline")
            await wait_until(
                lambda: double.run(lambda: bool(double.double.workers)),
                30,
                what="the bridge registers upstream",
            )

        asyncio.run(ready())
        yield e
    finally:
        _stop_group(worker)
        log.close()
        server.stop()
        double.close()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker and its job processes (its jobs never end by
    themselves, so its drain would wait), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


async def test_node_job_ends_by_the_participant_left_webhook(env: Env) -> None:
    """A job dispatched to trunkline runs on the Node worker with trunkline's
    room token for the double; the Node SDK never reports it, and it ends only
    when the double's participant_left webhook for its agent arrives: then it
    is cancelled naming the departure, the worker is told to terminate (it
    never confirms: `terminate_timeout_s` frees the slot), and the queued job
    gets the slot (cap 1) on the same worker."""
    status, body = await env.server.post("/v1/dispatches", {"agent_name": POOL, "room": "nd-1"})
    assert status == 201, body
    job_id = body["job_id"]
    ev = await env.started("nd-1")
    assert ev["job_id"] == job_id
    assert ev["url"] == env.double.ws_url
    claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(ev["token"])
    assert claims.video.room == "nd-1"
    assert claims.identity == ev["identity"] == f"agent-{job_id}"
    # The Node SDK reports no job status: the job stays "assigned" here.
    job = await env.job(job_id)
    assert job["state"] == "assigned", job
    assert await env.slots_used() == 1
    status, body = await env.server.post("/v1/dispatches", {"agent_name": POOL, "room": "nd-2"})
    assert status == 201, body
    second = body["job_id"]
    assert (await env.job(second))["state"] == "queued"  # the only slot is taken

    env.agent_comes_and_goes("nd-1", ev["identity"])

    async def ended() -> dict[str, Any] | None:
        j = await env.job(job_id)
        return j if j["ended"] else None

    done = await wait_until(ended, 20, what="the webhook ends the job")
    assert done["state"] == "cancelled", done
    assert f"agent participant {ev['identity']} left room nd-1" in done["reason"]
    sent = env.double.run(lambda: list(env.double.double.webhooks.sent))  # type: ignore[union-attr]
    assert ("participant_left", 200) in sent
    # The freed slot goes to the queued job, on the same worker.
    ev2 = await env.started("nd-2")
    assert ev2["job_id"] == second
    env.agent_comes_and_goes("nd-2", ev2["identity"])
    await wait_until(lambda: _ended(env, second), 20, what="job 2 ends")


async def _ended(env: Env, job_id: str) -> bool:
    return bool((await env.job(job_id))["ended"])


async def test_bridged_node_job_ends_when_its_agent_leaves(env: Env) -> None:
    """An upstream job through the bridge runs on the Node worker with the
    double's URL and token; when its agent leaves the room the upstream
    terminates it (and the webhook says so), and the slot is free for the next
    upstream job."""
    await wait_until(lambda: _free(env), 20, what="the worker's slot is free")
    d = env.double
    for room in ("nb-1", "nb-2"):
        rad = agent_dispatch.RoomAgentDispatch(agent_name=POOL)
        d.run(lambda room=room, rad=rad: d.double.create_room(room, [rad]))  # type: ignore[misc]
        ev = await env.started(room)
        assert ev["url"] == env.double.ws_url
        claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(ev["token"])
        assert claims.video.room == room
        assert claims.attributes["lk.agent_name"] == POOL
        job_id = ev["job_id"]
        results = d.run(lambda: [r.outcome for r in d.double.results if r.job.id == job_id])  # noqa: B023
        assert results == ["running"]
        env.agent_comes_and_goes(room, ev["identity"])
        await wait_until(lambda ev=ev: _ended(env, ev["job_id"]), 20, what=f"{room}'s job ends")
        job = await env.job(ev["job_id"])
        assert job["state"] == "cancelled", job
        await wait_until(lambda: _free(env), 20, what="the slot is freed")


async def _free(env: Env) -> bool:
    return await env.slots_used() == 0
