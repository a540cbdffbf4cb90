"""Autoscale latencies: demand -> provider start issued, and SDK replica cold start.

Theory of operation: the trunkline server runs in this process (`build_app`
on a loopback port) with one autoscaled pool, `min_replicas = 0`, cap 1,
scale-down delay 0. Each trial requests one job into the empty pool and times:

- demand -> start issued: from the `Scheduler.request` that queued the job to
  the moment the controller calls the provider's `start` (same clock);
- spawn -> ready: from that call to the replica's worker registering
  (`trunkline worker` child process: interpreter start, imports, connect,
  register);
- spawn -> first job running: until the job that caused the scale-up runs
  (offer, accept, job process from the warm pool, JS_RUNNING).

The job lasts 0.1 s, the replica is drained and stopped, and the next trial
starts only once it has exited, so trials do not overlap.

Part two measures demand -> start issued alone, many times, with a recording
provider that starts nothing (`--fake N` trials): the controller's own
latency without process spawning in the loop.

Targets (issue 3): cold start (spawn -> ready for jobs) <= 1.5 s; demand ->
start issued <= 100 ms (DESIGN.md: <= 50 ms). Exit status 1 if missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

from aiohttp import web

from trunkline.config import parse_config
from trunkline.core import JobState
from trunkline.providers import ExitCallback, Launch
from trunkline.providers.fake import FakeProvider, FakeReplica
from trunkline.server import build_app
from trunkline.server.keys import AUTOSCALER, DISPATCHER


def _config(port: int, run_dir: str, max_replicas: int) -> Any:
    command = [sys.executable, "-m", "trunkline", "worker", "trunkline.cli._demo_agent:entrypoint"]
    command += ["--max-jobs", "1", "--agent-name", "cold", "--log-level", "warning"]
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "autoscale": {"run_dir": run_dir},
            "pools": {
                "cold": {
                    "command": command,
                    "max_jobs_per_worker": 1,
                    "min_replicas": 0,
                    "max_replicas": max_replicas,
                    "scale_down_delay_s": 0,
                    "queue_max_wait_s": 60,
                }
            },
        },
        dev=True,
    )


async def _serve(max_replicas: int) -> tuple[web.AppRunner, web.Application]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = build_app(_config(sock.getsockname()[1], tempfile.mkdtemp(), max_replicas))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, app


async def _until(pred: Any, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.002)


async def real_trials(n: int) -> dict[str, list[float]]:
    runner, app = await _serve(1)
    d, ctl = app[DISPATCHER], app[AUTOSCALER]
    scaler = ctl.scalers["cold"]
    out: dict[str, list[float]] = {"issue_ms": [], "ready_s": [], "running_s": []}
    try:
        for _ in range(n):
            t_req = d.now()
            meta = json.dumps({"hold_s": 0.1})
            job = d.request("cold", metadata=meta)
            await _until(lambda: any(r.state.value == "starting" for r in scaler.replicas.values()))
            (r,) = [r for r in scaler.replicas.values() if r.state.value == "starting"]
            await _until(lambda r=r: r.id in ctl.start_issued_at and r.ready_at is not None)
            await _until(lambda j=job: j.running_at is not None or j.state is JobState.FAILED)
            t0 = ctl.start_issued_at[r.id]
            out["issue_ms"].append((t0 - t_req) * 1000)
            out["ready_s"].append(r.ready_at - t0)
            out["running_s"].append(job.running_at - t0)
            await _until(lambda r=r: r.state.value in ("stopped", "failed"))
    finally:
        await runner.cleanup()
    return out


class RecordingProvider(FakeProvider):
    """Starts nothing real; records when `start` was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, float] = {}

    async def start(self, launch: Launch, on_exit: ExitCallback) -> FakeReplica:
        self.calls[launch.replica_id] = asyncio.get_running_loop().time()
        return await super().start(launch, on_exit)


async def fake_trials(n: int) -> list[float]:
    runner, app = await _serve(n + 1)
    d, ctl = app[DISPATCHER], app[AUTOSCALER]
    provider = RecordingProvider()
    ctl.providers["local"] = provider
    out = []
    try:
        for i in range(n):
            t_req = d.now()
            d.request("cold")
            rid = f"cold-{i + 1}"
            await _until(lambda rid=rid: rid in provider.calls, 5)
            out.append((provider.calls[rid] - t_req) * 1000)
    finally:
        await runner.cleanup()
    return out


def _fmt(xs: list[float], unit: str, digits: int) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (
        f"median {statistics.median(xs):.{digits}f} {unit}, min {xs[0]:.{digits}f}, "
        f"p99 {p99:.{digits}f}, max {xs[-1]:.{digits}f} (n={len(xs)})"
    )


async def main(args: argparse.Namespace) -> int:
    real = await real_trials(args.trials)
    fake = await fake_trials(args.fake)
    print(f"SDK replica spawn -> ready (registered): {_fmt(real['ready_s'], 's', 3)}")
    print(f"SDK replica spawn -> first job running:  {_fmt(real['running_s'], 's', 3)}")
    print(f"demand -> start issued (real provider):  {_fmt(real['issue_ms'], 'ms', 2)}")
    print(f"demand -> start issued (no spawn):       {_fmt(fake, 'ms', 2)}")
    ok = statistics.median(real["ready_s"]) <= 1.5 and max(real["issue_ms"] + fake) <= 100
    print(
        "targets (cold start <= 1.5 s median, start issued <= 100 ms max):",
        "met" if ok else "MISSED",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="real replica spawns (default 10)")
    p.add_argument("--fake", type=int, default=200, help="no-spawn trials (default 200)")
    sys.exit(asyncio.run(main(p.parse_args())))
