"""The worker SDK against trunkline's real dispatch server (`trunkline serve` process)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    KEY,
    SECRET,
    ServerProcess,
    child_env,
    peak_level,
    server_process,
    stop_process,
    wait_until,
)
from worker import agents
from worker.helpers import Events, make_opts, running

TESTS_DIR = Path(__file__).resolve().parent.parent

CONFIG = """
[defaults]
queue_max_wait_s = 30
[pools.killed]
reconnect_grace_s = 0.5
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from server_process(tmp_path_factory.mktemp("server"), CONFIG)


async def dispatch(server: ServerProcess, agent_name: str, metadata: str) -> str:
    status, body = await server.post(
        "/v1/dispatches", {"agent_name": agent_name, "metadata": metadata}
    )
    assert status == 201, body
    job_id: str = body["job_id"]
    return job_id


async def ended(server: ServerProcess, job_id: str, within: float = 20.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job: dict[str, Any] = await server.get(f"/v1/jobs/{job_id}")
        return job if job["ended"] else None

    result: dict[str, Any] = await wait_until(check, within=within, what=f"job {job_id} ended")
    return result


async def workers(server: ServerProcess, agent_name: str) -> list[dict[str, Any]]:
    data = await server.get("/v1/workers")
    return [w for w in data["workers"] if w["agent_name"] == agent_name]


def max_overlap(events: Events, job_ids: list[str]) -> int:
    """Most jobs whose started..finished intervals overlap at one instant."""
    edges: list[tuple[float, int]] = []
    for job_id in job_ids:
        edges.append((events.of(job_id, "started")[0]["t"], 1))
        edges.append((events.of(job_id, "finished")[0]["t"], -1))
    return peak_level(edges)


async def test_burst_never_exceeds_declared_cap(server: ServerProcess, events: Events) -> None:
    """6 jobs on a worker declaring max_jobs=2: all succeed, never more than 2 at once."""
    opts = make_opts(server.url, agent_name="burst", max_jobs=2, num_idle_processes=2)
    async with running(opts):
        listed = await workers(server, "burst")
        assert [w["capacity"] for w in listed] == [2]
        ids = await asyncio.gather(
            *(dispatch(server, "burst", events.metadata(hold_s=0.3)) for _ in range(6))
        )
        results = [await ended(server, job_id) for job_id in ids]
        assert {r["state"] for r in results} == {"succeeded"}
        assert max_overlap(events, ids) <= 2
        assert max(w["used"] for w in await workers(server, "burst")) == 0


async def test_exception_message_reaches_server(server: ServerProcess, events: Events) -> None:
    """A job whose entrypoint raises ends `failed` on the server with the exception text."""
    opts = make_opts(server.url, agent_name="failing", entrypoint_fnc=agents.fail)
    async with running(opts):
        job = await ended(server, await dispatch(server, "failing", events.metadata()))
        assert job["state"] == "failed"
        assert "RuntimeError: agent exploded on" in job["reason"]


async def test_server_termination_ends_job(server: ServerProcess, events: Events) -> None:
    """DELETE /v1/jobs/{id} stops the job; the server records it cancelled once confirmed."""
    opts = make_opts(server.url, agent_name="term", entrypoint_fnc=agents.forever)
    async with running(opts):
        job_id = await dispatch(server, "term", events.metadata())
        await wait_until(lambda: events.of(job_id, "started"), what="job started")
        headers = server.headers()
        async with (
            aiohttp.ClientSession() as s,
            s.delete(f"{server.url}/v1/jobs/{job_id}", headers=headers) as r,
        ):
            assert r.status == 200
        job = await ended(server, job_id)
        assert job["state"] == "cancelled"
        assert events.of(job_id, "shutdown_callback")[0]["reason"] == "terminated by server"


def spawn(server: ServerProcess, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a worker process pointed at `server` through LiveKit's variables."""
    env = child_env(LIVEKIT_URL=server.url, LIVEKIT_API_KEY=KEY, LIVEKIT_API_SECRET=SECRET)
    with log.open("wb") as out:
        # cwd: `worker.agents` is importable from the tests directory.
        return subprocess.Popen(argv, cwd=TESTS_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_cli_worker(server: ServerProcess, agent_name: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "trunkline", "worker", "worker.agents:hold"]
    return spawn(server, [*argv, "--max-jobs", "2", "--agent-name", agent_name], log)


async def test_sigterm_drains_cli_worker(
    server: ServerProcess, events: Events, tmp_path: Path
) -> None:
    """SIGTERM on `trunkline worker`: the job finishes, the server records success, exit 0."""
    log = tmp_path / "worker.log"
    proc = start_cli_worker(server, "sigterm", log)
    try:
        await wait_until(lambda: workers(server, "sigterm"), what="worker registered")
        job_id = await dispatch(server, "sigterm", events.metadata(hold_s=1.0))
        await wait_until(lambda: events.of(job_id, "started"), what="job started")
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: proc.poll() is not None, within=20, what="worker exit")
        assert proc.returncode == 0, log.read_text()
        job = await ended(server, job_id)
        assert job["state"] == "succeeded", job
        assert events.of(job_id, "finished")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_cli_worker_registers(server: ServerProcess, tmp_path: Path) -> None:
    """A new `trunkline worker` registers with the server. How soon (target 1 s)
    is a benchmark's figure, not a test's: benchmarks/autoscale_coldstart.py
    measures spawn -> registered."""
    log = tmp_path / "worker.log"
    proc = start_cli_worker(server, "ready", log)
    try:
        await wait_until(
            lambda: workers(server, "ready"), within=30, interval=0.01, what="registered"
        )
    finally:
        stop_process(proc, 20)
        assert proc.returncode == 0, log.read_text()


async def test_echo_example_script_runs_a_job(server: ServerProcess, tmp_path: Path) -> None:
    """examples/echo_agent.py run as a script takes a job to success and exits 0 on SIGTERM."""
    log = tmp_path / "echo.log"
    example = TESTS_DIR.parent / "examples" / "echo_agent.py"
    proc = spawn(server, [sys.executable, str(example)], log)
    try:
        await wait_until(lambda: workers(server, "echo"), what="echo worker registered")
        job = await ended(server, await dispatch(server, "echo", '{"hold_s": 0.1}'))
        assert job["state"] == "succeeded", log.read_text()
        assert "job metadata" in log.read_text()
    finally:
        stop_process(proc, 20)
    assert proc.returncode == 0, log.read_text()


async def test_sigkilled_worker_leaves_no_job_running(
    server: ServerProcess, events: Events, tmp_path: Path
) -> None:
    """SIGKILL of the worker: its job process ends itself and the server marks the job lost."""
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "trunkline", "worker", "worker.agents:forever"]
    proc = spawn(server, [*argv, "--agent-name", "killed"], log)
    try:
        await wait_until(lambda: workers(server, "killed"), what="worker registered")
        job_id = await dispatch(server, "killed", events.metadata())
        started = await wait_until(lambda: events.of(job_id, "started"), what="job started")
        proc.kill()
        proc.wait()
        reason = await wait_until(
            lambda: events.of(job_id, "shutdown_callback"), what="job shut itself down"
        )
        assert reason[0]["reason"] == "worker process went away"
        pid = started[0]["pid"]
        await wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="job process exit")
        job = await ended(server, job_id, within=30)
        assert job["state"] == "worker_lost"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
