"""One job cycle through the Dispatcher in-process, no sockets: the REST side's
field checks, request -> offer -> accept -> assignment -> running -> success,
and the 201's JSON. Load-proof when counted in instructions (valgrind), which
the end-to-end figure on a shared machine is not:

    n() { valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
          .venv/bin/python benchmarks/dispatch_cycle.py --warm 3000 --cycles "$1" "${@:2}" \\
          2>&1 | grep 'I *refs'; }
    n 0; n 2000          # instructions per cycle = (second - first) / 2000

Deterministic: after the warm-up and after the measured cycles the loop's
clock jumps 10 s ahead (`JumpLoop`) and the loop runs a few rounds, so every
cycle's offer timer fires (stale, as in a server 3 s later) and the history
writer stores every record, in both runs alike, whatever valgrind's speed.

`--old` drives the API of da803bd (run with PYTHONPATH=<worktree of da803bd>/src);
`--no-check` / `--no-json` leave out the REST checks / the 201 JSON. Without
valgrind it prints the best process time per cycle over `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import sys
import time
from typing import Any

from trunkline.config import Config
from trunkline.core import JobState
from trunkline.core.entities import AcceptInfo


class JumpLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock can be moved ahead (`settle`)."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


async def settle() -> None:
    """Every timer due in the next 10 s (offer timeouts: 3 s; queue deadlines:
    5 s) runs now, and the history writer gets its turns."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, JumpLoop)
    loop.offset += 10.0
    for _ in range(20):
        await asyncio.sleep(0)


class Link:
    """A worker connection that keeps nothing."""

    def send(self, frame: bytes) -> None:
        pass

    async def close(self, message: bytes) -> None:
        pass


async def main(args: argparse.Namespace) -> None:
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, history_size=args.history_size)
    )
    acc = AcceptInfo("id", "name", "", {})
    d: Any
    if args.old:
        from trunkline.server.dispatcher import Dispatcher as OldDispatcher  # type: ignore
        from trunkline.server.metrics import Metrics as OldMetrics  # type: ignore

        from trunkline.server.rest import job_json as old_job_json  # type: ignore

        d = OldDispatcher(cfg, OldMetrics())
        d.start(asyncio.get_running_loop())
        for i in range(args.workers):
            d.conns[f"AW_{i:04d}"] = Link()
            d.apply(d.sched.worker_joined, f"AW_{i:04d}", "echo", 4)

        def one(k: int) -> None:
            job = d.request("echo", metadata=str(k), max_wait_s=5.0)
            wid = job.worker_id
            if args.json:
                json.dumps(old_job_json(d, job))
            d.apply(d.sched.answer, wid, job.id, available=True, terminate=False, accept=acc)
            d.apply(d.sched.job_status, wid, job.id, JobState.RUNNING, "")
            d.apply(d.sched.job_status, wid, job.id, JobState.SUCCEEDED, "")
    else:
        from trunkline.runtime.dispatcher import Dispatcher
        from trunkline.runtime.metrics import Metrics
        from trunkline.server.rest import dispatch_problem
        from trunkline.server.views import json_dumps, live_job_json

        d = Dispatcher(cfg, Metrics())
        d.start(asyncio.get_running_loop())
        for i in range(args.workers):
            d.worker_connected(Link(), f"AW_{i:04d}", "echo", 4)

        def one(k: int) -> None:
            if args.check and dispatch_problem("echo", "", str(k), {}) is not None:
                raise AssertionError("refused")
            job = d.request("echo", metadata=str(k), max_wait_s=5.0)
            wid = job.worker_id
            if args.json:
                json_dumps(live_job_json(job, d.wall_offset))
            d.offer_answered(wid, job.id, available=True, terminate=False, accept=acc)
            d.job_reported(wid, job.id, JobState.RUNNING, "")
            d.job_reported(wid, job.id, JobState.SUCCEEDED, "")

    def cycles(n: int) -> None:
        for k in range(n):
            one(k)

    gc.freeze()
    cycles(args.warm)  # fill the history to its capacity
    await settle()
    if args.rounds == 0:
        cycles(args.cycles)
        await settle()
        return
    best = float("inf")
    for _ in range(args.rounds):
        t = time.process_time()
        cycles(args.cycles)
        best = min(best, (time.process_time() - t) / max(args.cycles, 1))
        await settle()
    print(f"best {best * 1e6:.1f} us of process time per cycle")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", action="store_true", help="the API of da803bd")
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--warm", type=int, default=20_000, help="unmeasured cycles first")
    p.add_argument("--cycles", type=int, default=2000, help="cycles per round")
    p.add_argument(
        "--rounds", type=int, default=0, help="timed rounds (0: run once, print nothing)"
    )
    p.add_argument("--history-size", type=int, default=2000, help="[server] history_size")
    p.add_argument("--no-check", dest="check", action="store_false", help="no REST checks")
    p.add_argument("--no-json", dest="json", action="store_false", help="no 201 JSON")
    return p.parse_args()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=JumpLoop) as runner:
        runner.run(main(parse_args()))
    sys.exit(0)
