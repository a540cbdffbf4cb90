"""Rollout of an autoscaled pool under load: time to complete, extra replicas.

Theory of operation: the trunkline server runs in this process (`build_app` on
a loopback port) with one pool of `--replicas` real SDK replicas (local
provider, `trunkline worker`, cap `--cap`), `min_replicas` = `--replicas`. A
steady stream of calls keeps about `--load` of its slots busy (one call every
hold / (load * replicas * cap) seconds, each held `--hold` s). Once the stream
is steady, the config file's env changes (a new version) and the server
reloads it; the benchmark then waits for the rollout to report `done` (every
old replica drained and stopped) and reports:

- time to complete: reload -> done (includes each old replica's drain: the
  longest call it held when it was retired);
- extra replicas at the peak: the most serving replicas at once, beyond the
  pool's size (what the surge costs);
- calls: how many ran during the rollout, how many did not succeed (must be 0),
  the slowest queue wait.

Run: `.venv/bin/python benchmarks/rollout.py` (10 replicas, cap 4, load 0.5,
hold 3 s, surge 1); `--surge 2` for a faster, wider rollout; `--compare 1,2`
runs both in one invocation (on a shared machine, compare within one).
Exit status 1 if any call did not succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import free_port
from aiohttp.test_utils import TestServer

from trunkline.auth import admin_token
from trunkline.config import load_config
from trunkline.server import build_app

KEY, SECRET = "APIbench", "s" * 40
AGENTS = Path(__file__).resolve().parent.parent / "tests" / "autoscale"


def _write(path: Path, port: int, run_dir: Path, args: argparse.Namespace, version: str) -> None:
    command = [sys.executable, "-m", "trunkline", "worker", "sdk_agent:entrypoint"]
    command += ["--max-jobs", str(args.cap), "--agent-name", "bench", "--num-idle-processes", "1"]
    command += ["--log-level", "warning"]
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "warning"\n'
        f'[keys]\n{KEY} = "{SECRET}"\n[store]\nbackend = "memory"\n'
        f'[autoscale]\nrun_dir = "{run_dir}"\n'
        f"[pools.bench]\ncommand = {json.dumps(command)}\n"
        f'env = {{ PYTHONPATH = "{AGENTS}", TL_EVENTS = "{run_dir}/events.jsonl", '
        f'TL_V = "{version}" }}\n'
        f"max_jobs_per_worker = {args.cap}\nmin_replicas = {args.replicas}\n"
        f"max_replicas = {args.replicas * 2}\nscale_down_delay_s = 600\n"
        f"queue_max_wait_s = 60\ndrain_timeout_s = 120\n"
        f"rollout = {{ surge = {args.surge} }}\n"
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tl-rollout-") as tmp:
        port = free_port()
        path = Path(tmp) / "trunkline.toml"
        _write(path, port, Path(tmp), args, "A")
        server = TestServer(build_app(load_config(path)), host="127.0.0.1", port=port)
        await server.start_server()
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        async with aiohttp.ClientSession(headers=headers) as s:

            async def pool() -> dict[str, Any]:
                async with s.get(url + "/v1/pools") as r:
                    data = await r.json()
                (p,) = [p for p in data["pools"] if p["agent_name"] == "bench"]
                return dict(p)

            t0 = time.monotonic()
            while sum(r["state"] == "ready" for r in (await pool())["replicas"]) < args.replicas:
                await asyncio.sleep(0.2)
                if time.monotonic() - t0 > 120:
                    raise SystemExit("replicas did not become ready within 120 s")
            every = args.hold / (args.load * args.replicas * args.cap)
            ids: list[str] = []
            stop = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    body = {"agent_name": "bench", "metadata": {"hold_s": args.hold}}
                    async with s.post(url + "/v1/dispatches", json=body) as r:
                        ids.append((await r.json())["job_id"])
                    await asyncio.sleep(every)

            task = asyncio.create_task(stream())
            await asyncio.sleep(args.hold * 1.5)  # steady state
            _write(path, port, Path(tmp), args, "B")
            first = len(ids)
            t_reload = time.monotonic()
            async with s.post(url + "/v1/config/reload") as r:
                assert r.status == 200, await r.text()
            peak = 0
            said = 0.0
            while True:
                p = await pool()
                serving = sum(r["state"] in ("ready", "starting") for r in p["replicas"])
                peak = max(peak, serving)
                ro = p["rollout"]
                if ro and ro["phase"] == "done":
                    break
                if time.monotonic() - said > 5:  # progress, for a slow machine
                    said = time.monotonic()
                    live = [r for r in (ro or {}).get("replicas", []) if r["state"] != "stopped"]
                    print(f"{said - t_reload:5.1f} s {live}", file=sys.stderr)
                if time.monotonic() - t_reload > args.timeout:
                    raise SystemExit(f"rollout not done within {args.timeout:g} s: {ro}")
                await asyncio.sleep(0.1)
            took = time.monotonic() - t_reload
            stop.set()
            await task
            during = ids[first:]
            states, waits = [], []
            for jid in ids:
                while True:
                    async with s.get(url + f"/v1/jobs/{jid}") as r:
                        job = await r.json()
                    if job["ended"]:
                        break
                    await asyncio.sleep(0.1)
                states.append(job["state"])
                waits.append(job["queue_wait_s"])
        await server.close()
    return {
        "replicas": args.replicas,
        "cap": args.cap,
        "surge": args.surge,
        "load": args.load,
        "hold_s": args.hold,
        "time_to_complete_s": round(took, 2),
        "peak_serving": max(peak, ro["peak_serving"]),
        "extra_replicas_at_peak": max(peak, ro["peak_serving"]) - args.replicas,
        "calls_during_rollout": len(during),
        "calls_total": len(ids),
        "calls_not_succeeded": sum(st != "succeeded" for st in states),
        "slowest_queue_wait_s": round(max(waits), 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--cap", type=int, default=4)
    ap.add_argument("--load", type=float, default=0.5)
    ap.add_argument("--hold", type=float, default=3.0)
    ap.add_argument("--surge", type=int, default=1)
    ap.add_argument(
        "--compare",
        default="",
        metavar="S1,S2",
        help="run once per surge listed, in one invocation (compare ratios, not runs)",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")
    args = ap.parse_args()
    surges = [int(x) for x in args.compare.split(",")] if args.compare else [args.surge]
    results = []
    for surge in surges:
        args.surge = surge
        results.append(asyncio.run(main(args)))
        print(json.dumps(results[-1], indent=2), flush=True)
    sys.exit(1 if any(r["calls_not_succeeded"] for r in results) else 0)
