"""Reconnects on both sides of the bridge with a real livekit-agents 1.8.9 worker
behind trunkline: the LiveKit double drops the bridge's connections, then
trunkline itself restarts; the running call is never cut, and the job's status
agrees on both sides at every step (running, then succeeded / JS_SUCCESS).

The double honours `MigrateJobRequest` (as a server that implements it would;
the open-source server ignores it, see lk_double.py), so the upstream side's
status can be followed across the reconnects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.lk_thread import UP_KEY, UP_SECRET, DoubleThread
from livekit.protocol import agent, agent_dispatch
from support import KEY, SECRET, ServerProcess, child_env, stop_process, wait_until

pytestmark = pytest.mark.compat

AGENT = Path(__file__).with_name("lk_bridge_agent.py")
POOL = "lkrestart"


class Env:
    def __init__(self, double: DoubleThread, server: ServerProcess, events: Path) -> None:
        self.double = double
        self.server = server
        self.events = events

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    def upstream(self) -> set[str]:
        """Ids of the bridge's connections registered with the double now."""
        d = self.double
        return d.run(lambda: {w.id for w in d.double.workers.values() if w.agent_name == POOL})

    def up_state(self, job_id: str) -> tuple[int, str | None]:
        """(status, id of the connection it is attached to) on the double's side."""
        d = self.double

        def read() -> tuple[int, str | None]:
            w = d.double.job_worker.get(job_id)
            return d.double.job_states[job_id].status, (w.id if w is not None else None)

        return d.run(read)

    async def tl_state(self, job_id: str) -> str:
        job: dict[str, Any] = await self.server.get(f"/v1/jobs/{job_id}")
        return str(job["state"])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    double = DoubleThread(honour_migrate=True)
    config = f"""
[livekit]
url = "{double.ws_url}"
api_key = "{UP_KEY}"
api_secret = "{UP_SECRET}"
bridge = true
bridge_agent_names = ["{POOL}"]
[pools.{POOL}]
max_jobs_per_worker = 4
"""
    server = ServerProcess(tmp_path, config)
    server.start()
    e = Env(double, server, tmp_path / "events.jsonl")
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, str(AGENT), "start"],
        env=child_env(
            LIVEKIT_URL=server.ws_url,
            LIVEKIT_API_KEY=KEY,
            LIVEKIT_API_SECRET=SECRET,
            TL_AGENT_NAME=POOL,
            TL_TAG=POOL,
            TL_EVENTS=str(e.events),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(AGENT.parent),
    )
    try:
        yield e
    finally:
        stop_process(worker, 15)
        log.close()
        server.stop()
        double.close()


async def _worker_ready(e: Env) -> None:
    async def registered() -> bool:
        data = await e.server.get("/v1/workers")
        return any(w["agent_name"] == POOL for w in data["workers"])

    await wait_until(registered, 120, what="the worker registers with trunkline")
    await wait_until(e.upstream, 30, what="the bridge registers upstream")


async def test_upstream_reconnect_and_trunkline_restart_cut_no_call(
    env: Env, tmp_path: Path
) -> None:
    """A running bridged call survives the upstream dropping the bridge and a
    trunkline restart: never terminated, migrated upstream both times (after
    the restart as an adopted job), running on both sides throughout, and its
    end recorded as succeeded here and JS_SUCCESS upstream."""
    await _worker_ready(env)
    release = tmp_path / "release"
    meta = json.dumps({"release": str(release)})
    rad = agent_dispatch.RoomAgentDispatch(agent_name=POOL, metadata=meta)
    d = env.double
    d.run(lambda: d.double.create_room("room-restart", [rad]))

    def started() -> dict[str, Any] | None:
        return next((e for e in env.read_events() if e["event"] == "start"), None)

    ev = await wait_until(started, 60, what="the call starts on the worker")
    job_id = ev["job_id"]

    async def running_both(conns: set[str]) -> bool:
        status, conn = env.up_state(job_id)
        return (
            status == agent.JobStatus.JS_RUNNING
            and conn in conns
            and await env.tl_state(job_id) == "running"
        )

    first = env.upstream()
    await wait_until(lambda: running_both(first), 20, what="running on both sides")

    # 1. The upstream drops the bridge's connections (a LiveKit restart, say).
    d.run_async(d.double.drop_connections)
    await wait_until(lambda: env.upstream() - first, 20, what="the bridge reconnects")
    second = env.upstream() - first
    await wait_until(
        lambda: running_both(second), 20, what="the job migrated to the new connection"
    )

    # 2. trunkline restarts: its workers reconnect and migrate, the restarted
    # server adopts the job and the bridge names it upstream again.
    env.server.stop()
    await wait_until(lambda: not env.upstream(), 20, what="the old bridge is gone upstream")
    assert env.up_state(job_id) == (agent.JobStatus.JS_RUNNING, None)
    env.server.start()
    await wait_until(env.upstream, 30, what="the restarted bridge registers upstream")
    third = env.upstream()
    await wait_until(lambda: running_both(third), 60, what="adopted here, migrated upstream")
    job = await env.server.get(f"/v1/jobs/{job_id}")
    assert "adopted" in [t["event"] for t in job["trace"]]

    # Nothing was cut: the call is still in progress on the worker.
    assert [e["event"] for e in env.read_events() if e.get("job_id") == job_id] == ["start"]

    release.touch()
    await wait_until(
        lambda: any(e["event"] == "end" for e in env.read_events()), 30, what="the call ends"
    )

    async def ended_both() -> bool:
        status, conn = env.up_state(job_id)
        return (
            status == agent.JobStatus.JS_SUCCESS
            and conn is None
            and await env.tl_state(job_id) == "succeeded"
        )

    await wait_until(ended_both, 30, what="succeeded here and JS_SUCCESS upstream")
