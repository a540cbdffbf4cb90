"""What the job history costs per job cycle, all threads of the process counted.

Job cycles run through the Dispatcher in-process, as in `dispatch_cycle.py`
(the REST field checks, request -> offer -> accept -> assignment -> running
-> success, the 201's JSON; no sockets), with the history in one of:

- `null`: a store that keeps nothing (the writer's own bookkeeping only),
- `memory`: the in-process store (`[store] backend = "memory"`, what the
  end-to-end benchmark calls history off),
- `sqlite`: SQLite, a fresh file in a temporary directory, written on a
  thread of this process (`[store] writer = "thread"`),
- `sqlite-process`: the same written as a server does by default, by the
  history writer process; its CPU is not this process's (under valgrind,
  which does not follow children, the figure is what the server pays).

Cycles run in chunks of `--batch` (default 240: 1,200 cycles/s times the
writer's 0.2 s window, what an end-to-end run gives); after each chunk the
loop waits until the writer has stored all of it, so every record's whole
cost (record building, `put`, the writer task, the store's thread, the
SQLite insert, its indexes and commit) falls inside the measurement, and
batches are the same size on every run whatever the machine's speed.

Two measures:

- default: process CPU time (every thread) per cycle, the stores measured
  in turn in one invocation, `--rounds` times alternating, medians compared:

      .venv/bin/python benchmarks/history_cost.py

- `--valgrind`: instructions per cycle under valgrind (every thread), which a
  shared machine cannot disturb: for each store, one run with `--cycles` and
  one with none; the difference divided by `--cycles`:

      .venv/bin/python benchmarks/history_cost.py --valgrind --cycles 2400

The bar (issue 12): SQLite within 5 % of memory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trunkline.config import Config
from trunkline.core import JobState
from trunkline.core.entities import AcceptInfo
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.server.rest import dispatch_problem
from trunkline.server.views import json_dumps, live_job_json
from trunkline.stores import HistoryStore, JobFilter, JobRecord, MemoryHistory, Page
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.sqlite import SqliteHistory

STORES = ("null", "memory", "sqlite", "sqlite-process")
LIMIT = 0.05  # SQLite at most 5 % above memory
_POLL_S = 0.02


class NullHistory(MemoryHistory):
    """A store that keeps nothing: what is left is the writer's own cost."""

    backend = "null"

    async def add(self, records: Sequence[JobRecord]) -> None:
        pass

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        return Page(())


class Link:
    """A worker connection that keeps nothing."""

    def send(self, frame: bytes) -> None:
        pass

    async def close(self, message: bytes) -> None:
        pass


def make_store(kind: str, tmp: Path) -> HistoryStore:
    if kind == "null":
        return NullHistory()
    if kind == "memory":
        return MemoryHistory(Config().server.history_size)
    if kind == "sqlite":
        return SqliteHistory(tmp / "history.sqlite3")
    if kind == "sqlite-process":
        return OffloadedStore(SqliteHistory(tmp / "history.sqlite3"))
    raise SystemExit(f"unknown store {kind!r}: one of {', '.join(STORES)}")


class Bench:
    """One Dispatcher with 200 workers and the history `kind`."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.d = Dispatcher(Config(), Metrics(), history=make_store(kind, tmp))
        self.acc = AcceptInfo("id", "name", "", {})
        self.k = 0

    async def start(self, workers: int) -> None:
        await self.d.open_history()
        self.d.start(asyncio.get_running_loop())
        for i in range(workers):
            self.d.worker_connected(Link(), f"AW_{i:04d}", "echo", 4)

    def one(self) -> None:
        d, k = self.d, self.k
        self.k += 1
        if dispatch_problem("echo", "", str(k), {}) is not None:
            raise AssertionError("refused")
        job = d.request("echo", metadata=str(k), max_wait_s=5.0)
        wid = job.worker_id
        assert wid is not None, "no worker took the job"
        json_dumps(live_job_json(job, d.wall_offset))
        d.offer_answered(wid, job.id, available=True, terminate=False, accept=self.acc)
        d.job_reported(wid, job.id, JobState.RUNNING, "")
        d.job_reported(wid, job.id, JobState.SUCCEEDED, "")

    async def drained(self) -> None:
        """Wait until the writer has stored everything put so far."""
        while True:
            st = self.d.history_status()
            if st.pending == 0:
                return
            if st.degraded:
                raise SystemExit(f"history store failing: {st.reason}")
            await asyncio.sleep(_POLL_S)

    async def cycles(self, n: int, batch: int) -> None:
        done = 0
        while done < n:
            m = min(batch, n - done)
            for _ in range(m):
                self.one()
            done += m
            await self.drained()

    async def aclose(self) -> None:
        await self.d.aclose()


async def once(args: argparse.Namespace) -> None:
    """One store, `--warm` then `--cycles` cycles, no output (under valgrind)."""
    tmp = Path(tempfile.mkdtemp(prefix="trunkline-hcost-"))
    try:
        b = Bench(args.store, tmp)
        await b.start(args.workers)
        gc.freeze()
        await b.cycles(args.warm, args.batch)
        await b.cycles(args.cycles, args.batch)
        await b.aclose()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def timed(args: argparse.Namespace, stores: list[str]) -> dict[str, float]:
    """Process CPU (all threads) per cycle for each store, rounds alternating."""
    per: dict[str, list[float]] = {s: [] for s in stores}
    sys_per: dict[str, list[float]] = {s: [] for s in stores}
    for r in range(args.rounds):
        order = stores if r % 2 == 0 else stores[::-1]
        for kind in order:
            tmp = Path(tempfile.mkdtemp(prefix="trunkline-hcost-"))
            try:
                b = Bench(kind, tmp)
                await b.start(args.workers)
                gc.collect()
                gc.freeze()
                await b.cycles(args.warm, args.batch)
                t, t_sys = time.process_time(), os.times().system
                await b.cycles(args.cycles, args.batch)
                us = (time.process_time() - t) / args.cycles * 1e6
                sys_us = (os.times().system - t_sys) / args.cycles * 1e6
                await b.aclose()
                gc.unfreeze()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            per[kind].append(us)
            sys_per[kind].append(sys_us)
            print(
                f"  round {r + 1} {kind:6} {us:7.1f} us CPU per cycle ({sys_us:.1f} in the kernel)",
                flush=True,
            )
    for k in stores:
        med, med_sys = statistics.median(per[k]), statistics.median(sys_per[k])
        print(f"  median {k:6} {med:7.1f} us, kernel {med_sys:.1f}")
    return {k: statistics.median(v) for k, v in per.items()}


def valgrind(args: argparse.Namespace, stores: list[str]) -> dict[str, float]:
    """Instructions per cycle for each store (valgrind counts every thread)."""
    out: dict[str, float] = {}
    for kind in stores:
        refs = []
        for n in (0, args.cycles):
            cmd = [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                "--cachegrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--once",
                "--store",
                kind,
                "--cycles",
                str(n),
                "--warm",
                str(args.warm),
                "--batch",
                str(args.batch),
                "--workers",
                str(args.workers),
            ]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            m = re.search(r"I\s+refs:\s+([\d,]+)", p.stderr)
            if p.returncode != 0 or m is None:
                raise SystemExit(f"valgrind run failed ({p.returncode}):\n{p.stderr[-2000:]}")
            refs.append(int(m.group(1).replace(",", "")))
        out[kind] = (refs[1] - refs[0]) / args.cycles
        print(f"  {kind:14} {out[kind]:11,.0f} instructions per cycle", flush=True)
    return out


def report(figures: dict[str, float], unit: str) -> bool:
    if "memory" not in figures:
        return True
    mem, ok = figures["memory"], True
    if "null" in figures:
        print(f"\nmemory vs null:   {mem - figures['null']:+,.1f} {unit} per cycle")
    for kind in ("sqlite", "sqlite-process"):
        if kind in figures:
            sql = figures[kind]
            extra = sql / mem - 1
            print(f"{kind} vs memory: {sql - mem:+,.1f} {unit} per cycle ({extra:+.1%})")
            passed = extra <= LIMIT
            ok = ok and passed
            print(f"  {'PASS' if passed else 'FAIL'}: within {LIMIT:.0%} of memory ({unit})")
    return ok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stores", default=",".join(STORES), help="comma-separated: " + ",".join(STORES)
    )
    p.add_argument("--store", default="memory", help=argparse.SUPPRESS)
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--valgrind", action="store_true", help="count instructions under valgrind")
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--warm", type=int, default=2400, help="unmeasured cycles first")
    p.add_argument("--cycles", type=int, default=12_000, help="measured cycles per run")
    p.add_argument("--batch", type=int, default=240, help="cycles between waits for the writer")
    p.add_argument("--rounds", type=int, default=3, help="rounds (CPU time mode)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.cycles < 0 or args.warm < 0 or args.rounds < 1:
        p.error("--batch and --rounds must be >= 1, --cycles and --warm >= 0")
    if not args.once and args.cycles < 1:
        p.error("--cycles must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    if args.once:
        asyncio.run(once(args))
        return 0
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in STORES:
            raise SystemExit(f"unknown store {s!r}: one of {', '.join(STORES)}")
    load = os.getloadavg()
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(
        f"machine: {info['cpus']} cores, Python {info['python']}; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; batch {args.batch}, "
        f"{args.cycles} cycles after {args.warm}"
    )
    if args.valgrind:
        ok = report(valgrind(args, stores), "instructions")
    else:
        ok = report(asyncio.run(timed(args, stores)), "us CPU")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
