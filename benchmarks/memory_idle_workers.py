"""Server memory per connected idle worker.

Starts the server (or `--baseline`, the plain-aiohttp yardstick), connects a
few warm-up workers so that lazily built state (imports, protobuf classes,
first-connection buffers) is already paid for, waits until the server's RSS has
been still for a few seconds, and reads VmRSS from /proc/PID/status. Then it
connects 1,000 more idle workers from a separate process (they register and
send `UpdateWorkerStatus` every 2.5 s, like LiveKit workers, and nothing else),
waits for the server to list them all and for RSS to settle again, and reads
VmRSS again. Memory per worker = the difference / 1,000. Target ≤ 50 KB.

    .venv/bin/python benchmarks/memory_idle_workers.py [--baseline] [--workers 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from _common import (
    ServerUnderTest,
    WorkersProcess,
    machine_info,
    rss_kb,
    run_driver,
    verdict,
    wait_rss_quiet,
    worker_command,
)

TARGET_KB_PER_WORKER = 50.0


async def wait_listed(server: ServerUnderTest, want: int, timeout_s: float = 30.0) -> int:
    """Poll `GET /v1/workers` until the server lists `want` workers; returns the count."""
    deadline = time.monotonic() + timeout_s
    listed = 0
    while time.monotonic() < deadline:
        listed = await asyncio.to_thread(server.count_workers)
        if listed >= want:
            break
        await asyncio.sleep(0.2)
    return listed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = ServerUnderTest(baseline=args.baseline)
    print(f"machine: {machine_info()}")
    print(f"server: {server.name} on 127.0.0.1:{server.port}")
    server.start()
    rss_start = rss_kb(server.pid)

    warm = WorkersProcess(worker_command(server.ws_url, args.warmup_workers))
    await warm.start()
    await warm.wait_ready(30.0)
    if await wait_listed(server, args.warmup_workers) < args.warmup_workers:
        raise RuntimeError("warm-up workers not listed by the server")
    before = await asyncio.to_thread(wait_rss_quiet, server.pid, args.settle)

    idle = WorkersProcess(worker_command(server.ws_url, args.workers))
    t0 = time.monotonic()
    await idle.start()
    ready = await idle.wait_ready(120.0)
    total = args.warmup_workers + args.workers
    listed = await wait_listed(server, total)
    connect_s = time.monotonic() - t0
    if listed < total:
        raise RuntimeError(f"server lists only {listed} of {total} workers")
    after = await asyncio.to_thread(wait_rss_quiet, server.pid, args.settle)
    per_worker = (after - before) / args.workers
    ok = per_worker <= TARGET_KB_PER_WORKER

    print(f"server RSS at start: {rss_start / 1024:.1f} MiB")
    print(f"server RSS with {args.warmup_workers} warm-up workers: {before / 1024:.1f} MiB")
    print(f"server RSS with {args.workers} more idle workers: {after / 1024:.1f} MiB")
    print(
        f"{args.workers} workers connected and registered in {ready['seconds']} s "
        f"(listed by the server after {connect_s:.2f} s)"
    )
    print(f"memory per idle worker: {per_worker:.1f} KiB")
    print(verdict(ok, f"{per_worker:.1f} KiB per worker <= {TARGET_KB_PER_WORKER:.0f} KB"))

    await idle.stop()
    await warm.stop()
    return {
        "machine": machine_info(),
        "server": server.name,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "workers": args.workers,
        "kb_per_worker": per_worker,
        "connect_s": ready["seconds"],
        "pass": ok,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", action="store_true", help="measure the plain-aiohttp yardstick")
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--warmup-workers", type=int, default=10)
    p.add_argument("--settle", type=float, default=3.0, help="seconds RSS must hold still")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = run_driver(lambda: run(args), args.json)
    if out is None:
        return 130
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
