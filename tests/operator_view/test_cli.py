"""The operator CLI (`status`, `jobs`, `trace`, `dispatch`, `drain`) as a user
runs it: a real `trunkline` child process against a real server child process,
with protocol-level workers from protoworker.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator

import pytest
from protoworker import ProtoWorker
from support import KEY, SECRET, ServerProcess, free_port, server_process, wait_until

from trunkline.cli._client import CliError, normalize_url, resolve_target
from trunkline.cli.trace import timeline

CONFIG = """
[pools.support]
max_jobs_per_worker = 4
[pools.trace]
max_jobs_per_worker = 4
[pools.empty]
queue_max_wait_s = 0.2
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from server_process(tmp_path_factory.mktemp("cli"), CONFIG)


async def start(
    server: ServerProcess, out: list[ProtoWorker], *args: object, **kw: object
) -> ProtoWorker:
    w = ProtoWorker.autonomous(server.ws_url, *args, **kw)  # type: ignore[arg-type]
    await w.connect()
    out.append(w)
    return w


async def cli(server: ServerProcess | None, *args: str, **env: str) -> tuple[int, str, str]:
    """Run `python -m trunkline ARGS`; returns (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "TRUNKLINE_"))}
    full_env.update(COLUMNS="200", NO_COLOR="1")
    if server is not None:
        full_env["TRUNKLINE_URL"] = server.url
        # The test server's key, not the CLI's dev default (only --dev serves that).
        full_env.update(LIVEKIT_API_KEY=KEY, LIVEKIT_API_SECRET=SECRET)
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trunkline",
        *args,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_prints_pools_and_workers_with_slot_bars(
    server: ServerProcess, workers: list[ProtoWorker]
) -> None:
    """`status` names each pool and each worker, with its used/capacity and a slot bar."""
    w = await start(server, workers, "support", max_jobs=3)
    _, job = await server.post("/v1/dispatches", {"agent_name": "support", "wait": True})
    assert job["state"] == "running"
    rc, out, err = await cli(server, "status")
    assert rc == 0, err
    assert "pool support" in out
    assert "pool trace" in out
    line = next(ln for ln in out.splitlines() if w.worker_id in ln)
    assert "1/3" in line
    assert "■□□" in line
    assert "available" in line
    rc, out, _ = await cli(server, "status", "--json")
    data = json.loads(out)
    assert {p["agent_name"] for p in data["pools"]} >= {"support", "trace", "empty"}
    assert any(x["worker_id"] == w.worker_id and x["running"] == 1 for x in data["workers"])
    await w.succeed(job["job_id"])


async def test_trace_names_each_offer_and_its_answer(
    server: ServerProcess, workers: list[ProtoWorker]
) -> None:
    """`trace` prints offer #1 to the refusing worker with its answer, then offer #2
    accepted by the other, running, and the end with its reason."""
    # pack placement offers to the fullest worker that fits: the 1-slot one first.
    refuser = await start(server, workers, "trace", max_jobs=1, auto="refuse")
    taker = await start(server, workers, "trace", max_jobs=3)
    _, job = await server.post("/v1/dispatches", {"agent_name": "trace", "wait": True})
    assert job["state"] == "running", job
    await taker.succeed(job["job_id"])

    async def ended() -> bool:
        return bool((await server.get(f"/v1/jobs/{job['job_id']}"))["ended"])

    await wait_until(ended, what="job ended")
    rc, out, err = await cli(server, "trace", job["job_id"])
    assert rc == 0, err
    rows = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("+")]

    def row(label: str) -> str:
        return next(ln for ln in rows if label in ln)

    assert refuser.worker_id in row("offer #1")
    assert refuser.worker_id in row("answer #1")
    assert "refused" in row("answer #1")
    assert taker.worker_id in row("offer #2")
    assert "accepted" in row("answer #2")
    assert taker.worker_id in row("answer #2")
    assert taker.worker_id in row("running")
    assert "job finished" in row("succeeded")
    assert "placed after" in out
    rc, out, _ = await cli(server, "trace", job["job_id"], "--json")
    assert rc == 0
    events = [ev["event"] for ev in json.loads(out)["trace"]]
    assert events[:4] == ["requested", "offered", "refused", "offered"]


async def test_trace_of_unknown_job_exits_1_with_server_message(server: ServerProcess) -> None:
    """An unknown job id exits 1 and prints the server's error message."""
    rc, out, err = await cli(server, "trace", "AJ_nope")
    assert rc == 1
    assert "no job 'AJ_nope'" in err
    assert "not_found" in err
    assert out == ""


async def test_jobs_filters_and_json(server: ServerProcess, workers: list[ProtoWorker]) -> None:
    """`jobs --state --agent --json` filters on the server and prints parseable JSON."""
    w = await start(server, workers, "support", max_jobs=2)
    _, job = await server.post("/v1/dispatches", {"agent_name": "support", "wait": True})
    rc, out, err = await cli(server, "jobs", "--state", "running", "--agent", "support", "--json")
    assert rc == 0, err
    jobs = json.loads(out)["jobs"]
    assert job["job_id"] in {j["job_id"] for j in jobs}
    assert all(j["state"] == "running" and j["agent_name"] == "support" for j in jobs)
    rc, out, _ = await cli(server, "jobs", "--limit", "5")
    assert rc == 0
    assert "job" in out.splitlines()[0]
    await w.succeed(job["job_id"])


async def test_jobs_with_unknown_state_exits_2(server: ServerProcess) -> None:
    """A state the server does not know is a usage error (2) naming the allowed ones."""
    rc, _, err = await cli(server, "jobs", "--state", "bogus")
    assert rc == 2
    assert "unknown state 'bogus'" in err
    assert "running" in err


async def test_dispatch_wait_exit_codes(server: ServerProcess, workers: list[ProtoWorker]) -> None:
    """`dispatch --wait` exits 0 once running and 1 with the reason when no
    capacity came in time; without --wait it exits 0 at once."""
    w = await start(server, workers, "support", max_jobs=4)
    rc, out, err = await cli(
        server, "dispatch", "support", "--wait", "--metadata", '{"caller": "+15550100"}', "--json"
    )
    assert rc == 0, err
    job = json.loads(out)
    assert job["state"] == "running"
    assert job["metadata"] == '{"caller": "+15550100"}'
    await w.succeed(job["job_id"])
    rc, out, err = await cli(server, "dispatch", "empty", "--wait", "--max-wait", "0.2")
    assert rc == 1
    assert "no_capacity" in out
    assert "has no worker registered" in err
    rc, out, _ = await cli(server, "dispatch", "empty", "--max-wait", "0", "--json")
    assert rc == 0
    assert json.loads(out)["agent_name"] == "empty"


async def test_drain_worker(server: ServerProcess, workers: list[ProtoWorker]) -> None:
    """`drain` marks a connected worker draining (0); an unknown one exits 1."""
    w = await start(server, workers, "support", max_jobs=1)
    rc, out, err = await cli(server, "drain", w.worker_id, "--json")
    assert rc == 0, err
    assert json.loads(out)["draining"] is True
    rc, out, _ = await cli(server, "drain", w.worker_id)
    assert rc == 0
    assert "draining" in out
    rc, _, err = await cli(server, "drain", "AW_gone")
    assert rc == 1
    assert "no connected worker 'AW_gone'" in err


async def test_unreachable_server_and_refused_credentials_exit_3(server: ServerProcess) -> None:
    """No server at the URL, or a secret the server does not accept: exit 3."""
    rc, _, err = await cli(None, "status", "--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 3
    assert "cannot reach trunkline" in err
    rc, _, err = await cli(server, "status", "--api-secret", "wrong-secret")
    assert rc == 3
    assert "refused the credentials" in err
    assert "invalid token" in err


async def test_livekit_environment_is_the_fallback(server: ServerProcess) -> None:
    """LIVEKIT_URL (ws://) and LiveKit's key variables are used when no flag or
    TRUNKLINE_URL is given; a bad URL is a usage error (2)."""
    ws = server.url.replace("http://", "ws://")
    rc, out, err = await cli(
        None, "status", "--json", LIVEKIT_URL=ws, LIVEKIT_API_KEY=KEY, LIVEKIT_API_SECRET=SECRET
    )
    assert rc == 0, err
    assert "pools" in json.loads(out)
    rc, _, err = await cli(None, "status", "--url", "ftp://example")
    assert rc == 2
    assert "not an http(s)" in err


async def test_dashboard_url_opens_the_dashboard(server: ServerProcess) -> None:
    """`status --dashboard-url` prints a link carrying a token the dashboard accepts."""
    rc, out, err = await cli(server, "status", "--dashboard-url")
    assert rc == 0, err
    link = out.strip()
    assert link.startswith(server.url + "/?token=")
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(link, allow_redirects=False) as r:
        assert r.status == 303
        assert "trunkline_dashboard" in r.cookies


def test_target_resolution_order() -> None:
    """Flags beat TRUNKLINE_URL, which beats LIVEKIT_URL, which beats the default."""
    ns = argparse.Namespace(url=None, api_key=None, api_secret=None)
    assert resolve_target(ns, {}).url == "http://127.0.0.1:7880"
    assert resolve_target(ns, {}).api_key == "devkey"
    env = {
        "LIVEKIT_URL": "wss://lk.example:443/",
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s",
    }
    t = resolve_target(ns, env)
    assert (t.url, t.api_key, t.api_secret) == ("https://lk.example:443", "k", "s")
    assert resolve_target(ns, {**env, "TRUNKLINE_URL": "h:1"}).url == "http://h:1"
    ns.url = "http://flag:2"
    assert resolve_target(ns, {**env, "TRUNKLINE_URL": "h:1"}).url == "http://flag:2"
    with pytest.raises(CliError) as exc:
        normalize_url("ftp://x")
    assert exc.value.exit_code == 2


def test_timeline_pairs_answers_with_offers() -> None:
    """Each answer is labelled with the number of the offer it answers."""
    trace = [
        {"t_ms": 0.0, "event": "requested"},
        {"t_ms": 0.1, "event": "offered", "worker_id": "A"},
        {"t_ms": 3000.1, "event": "offer_timeout", "worker_id": "A", "detail": "no answer in 3 s"},
        {"t_ms": 3000.2, "event": "offered", "worker_id": "B"},
        {"t_ms": 3001.0, "event": "rejected", "worker_id": "B", "detail": "terminate=true"},
        {"t_ms": 3001.0, "event": "rejected", "worker_id": "B", "detail": "worker B rejected"},
    ]
    lines = timeline(trace)
    labels = [ln.label.strip() for ln in lines]
    assert labels == [
        "requested",
        "offer #1",
        "answer #1",
        "offer #2",
        "answer #2",
        "[red]rejected[/]",
    ]
    assert "no answer" in lines[2].detail
    assert "no answer in 3 s" in lines[2].detail
    assert "terminate=true" not in lines[4].detail.split(";")[-1]


def test_status_renders_replicas_and_scale_events(capsys: pytest.CaptureFixture[str]) -> None:
    """Pools carrying the autoscaler's `replicas` and `scale_events` show them (ended
    replicas left out); pools without them still render."""
    from trunkline.cli.status import render

    pools = [
        {
            "agent_name": "voice",
            "queued": 2,
            "slots_used": 3,
            "slots_free": 1,
            "active_jobs": 3,
            "config": {"max_jobs_per_worker": 2},
            "replicas": [
                {
                    "id": "r-1",
                    "state": "ready",
                    "worker_id": "AW_1",
                    "slots_used": 2,
                    "slots_cap": 2,
                },
                {"id": "r-2", "state": "starting", "worker_id": None, "slots_used": 0},
                {"id": "r-0", "state": "exited", "ended_at": 1.0, "slots_used": 0},
            ],
            "scale_events": [
                {
                    "at": 1_700_000_000.0,
                    "kind": "scale_up",
                    "from": 1,
                    "to": 2,
                    "demand": {"total": 5, "running": 3, "queued": 2, "refused": 0},
                    "reason": "demand above capacity",
                }
            ],
        },
        {"agent_name": "plain", "queued": 0},
    ]
    render("http://x", pools, [])
    out = capsys.readouterr().out
    assert "r-1" in out
    assert "r-2" in out
    assert "r-0" not in out
    assert "scale_up 1 → 2 replicas" in out
    assert "demand above capacity" in out
    assert "pool plain" in out
