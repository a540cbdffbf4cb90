"""`trunkline demo`: watch an autoscaled pool absorb a burst of calls.

One command, no setup. It runs a trunkline server in this process on a free
loopback port, with one autoscaled pool whose replicas are real child
processes (`trunkline worker trunkline.cli._demo_agent:entrypoint`), waits for
the warm replica(s), then requests all the calls at the same instant. Progress
is live in a terminal (plain lines otherwise, e.g. in CI). At the end: a table
per call (how long it queued, which replica took it, how it ended), a table
per replica (cold start, peak slots in use, calls served) and a verdict.

The cap is checked where it matters: after every scheduler event the demo
reads each worker's used slots (offers + assigned + running jobs), so "peak"
is the true maximum at any instant. Exit code 0 only when no replica ever
went over the cap and every call succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

from trunkline.server.keys import AUTOSCALER, DISPATCHER

_STATE_STYLE = {
    "starting": "yellow",
    "ready": "green",
    "draining": "magenta",
    "stopped": "dim",
    "failed": "red",
}


def register(subparsers: Any) -> None:
    """Add the `demo` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="burst calls at an autoscaled pool and watch it scale (no setup)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--calls", type=int, default=13, help="calls in the burst (default: 13)")
    p.add_argument("--cap", type=int, default=4, help="concurrent calls per replica (default: 4)")
    p.add_argument("--min-replicas", type=int, default=1, help="warm replicas (default: 1)")
    p.add_argument("--max-replicas", type=int, default=5, help="replica ceiling (default: 5)")
    p.add_argument(
        "--call-seconds", type=float, default=8.0, help="how long each call lasts (default: 8)"
    )
    p.add_argument(
        "--max-wait", type=float, default=30.0, help="longest a call may queue (default: 30)"
    )
    p.set_defaults(handler=_run)


@dataclasses.dataclass
class Call:
    n: int
    job_id: str
    created_at: float
    placed_at: float | None = None
    worker_id: str | None = None
    state: str = "queued"
    reason: str = ""


class Demo:
    """The in-process server, the burst and what was observed of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calls: dict[str, Call] = {}
        self.peak: dict[str, int] = {}  # worker id -> most slots used at any instant
        self.served: dict[str, int] = {}  # worker id -> calls placed on it
        self.worker_replica: dict[str, str] = {}
        self.lines: list[str] = []
        self.t0 = 0.0
        self._seen: dict[str, str] = {}  # replica id -> state last reported
        self._n_events = 0  # scale events already reported
        self._printed = 0  # progress lines already printed
        self.run_dir = tempfile.mkdtemp(prefix="trunkline-demo-")

    # --------------------------------------------------------------- observers

    def job_placed(self, job: Any) -> None:
        call = self.calls.get(job.id)
        if call is None:
            return
        call.placed_at = job.placed_at
        call.worker_id = job.worker_id
        call.state = "running"
        self.served[job.worker_id] = self.served.get(job.worker_id, 0) + 1
        wait = (job.placed_at or call.created_at) - call.created_at
        where = self._replica_of(job.worker_id)
        self.say(f"call {call.n} placed on {where} after {wait:.2f} s")

    def job_ended(self, job: Any) -> None:
        call = self.calls.get(job.id)
        if call is None:
            return
        call.state = job.state.value
        call.reason = job.reason
        call.worker_id = job.worker_id or call.worker_id
        self.say(f"call {call.n} ended {call.state}")

    def worker_registered(self, worker_id: str, agent_name: str, token: str) -> None:
        self._note_scaling()  # after the controller's own hook: the replica is READY

    def worker_gone(self, worker_id: str) -> None:
        pass

    def after_flush(self) -> None:
        pool = self.dispatcher.pool("demo")
        for w in pool.workers.values() if pool is not None else ():
            if w.used > self.peak.get(w.id, 0):
                self.peak[w.id] = w.used

    def say(self, text: str) -> None:
        """Record a progress line; printed from the demo's loop, never from inside
        a dispatcher callback (an exception there would break the flush)."""
        self.lines.append(f"+{self.elapsed():6.2f}s  {text}")

    def _print_new_lines(self) -> None:
        for line in self.lines[self._printed :]:
            print(line, flush=True)
        self._printed = len(self.lines)

    def elapsed(self) -> float:
        return self.dispatcher.now() - self.t0 if self.t0 else 0.0

    # -------------------------------------------------------------------- run

    async def run(self) -> int:
        from aiohttp import web
        from rich.console import Console

        from trunkline.config import parse_config
        from trunkline.server import build_app

        args = self.args
        self.console = Console()
        self.tty = self.console.is_terminal
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        command = [sys.executable, "-m", "trunkline", "worker"]
        command += ["trunkline.cli._demo_agent:entrypoint", "--max-jobs", str(args.cap)]
        command += ["--agent-name", "demo", "--log-level", "warning"]
        config = parse_config(
            {
                "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
                "autoscale": {"run_dir": self.run_dir},
                "pools": {
                    "demo": {
                        "command": command,
                        "max_jobs_per_worker": args.cap,
                        "min_replicas": args.min_replicas,
                        "max_replicas": args.max_replicas,
                        "queue_max_wait_s": args.max_wait,
                        "scale_down_delay_s": 30,
                    }
                },
            },
            dev=True,
        )
        app = build_app(config)
        self.dispatcher = app[DISPATCHER]
        self.controller = app[AUTOSCALER]
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            self.dispatcher.add_job_observer(self)
            self.dispatcher.add_flush_listener(self.after_flush)
            self.dispatcher.add_worker_observer(self)
            print(
                f"trunkline demo: server on 127.0.0.1:{port}; pool 'demo': cap {args.cap}, "
                f"{args.min_replicas}..{args.max_replicas} replicas; replica logs in "
                f"{self.run_dir}",
                flush=True,
            )
            if not await self._warm():
                return 1
            await self._burst()
            self._report()
            return 0 if self._verdict() else 1
        finally:
            await runner.cleanup()

    def _scaler(self) -> Any:
        return self.controller.scalers["demo"]

    async def _warm(self) -> bool:
        want = self.args.min_replicas
        print(f"starting {want} warm replica(s)...", flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = [r for r in self._scaler().replicas.values() if r.state.value == "ready"]
            if len(ready) >= want:
                for r in ready:
                    cold = (r.ready_at or r.created_at) - r.created_at
                    print(f"replica {r.id} ready (cold start {cold:.2f} s)", flush=True)
                return True
            await asyncio.sleep(0.05)
        print(f"trunkline demo: replicas not ready after 60 s; see {self.run_dir}", flush=True)
        return False

    async def _burst(self) -> None:
        from trunkline.runtime.dispatcher import new_id

        args = self.args
        d = self.dispatcher
        self.t0 = d.now()
        self._n_events = self._scaler().event_count
        self._seen = {r.id: r.state.value for r in self._scaler().replicas.values()}
        meta = json.dumps({"hold_s": args.call_seconds})
        self.say(f"burst: {args.calls} calls of {args.call_seconds:g} s at once")
        for i in range(args.calls):
            job_id = new_id("AJ_")
            self.calls[job_id] = Call(i + 1, job_id, d.now())
            d.request(
                "demo",
                room=f"demo-call-{i + 1}",
                metadata=meta,
                max_wait_s=args.max_wait,
                job_id=job_id,
            )
        limit = args.max_wait + args.call_seconds + 30
        if self.tty:
            from rich.live import Live

            with Live(self._live(), console=self.console, refresh_per_second=10) as live:
                while not self._done() and self.elapsed() < limit:
                    await asyncio.sleep(0.1)
                    live.update(self._live())
        else:
            while not self._done() and self.elapsed() < limit:
                self._note_scaling()
                self._print_new_lines()
                await asyncio.sleep(0.05)
            self._note_scaling()
            self._print_new_lines()

    def _done(self) -> bool:
        return all(c.state not in ("queued", "running") for c in self.calls.values())

    def _note_scaling(self) -> None:
        """Report scale events and replica state changes not reported yet."""
        if not self.t0:
            return
        scaler = self._scaler()
        fresh = scaler.event_count - self._n_events
        self._n_events = scaler.event_count
        for ev in list(scaler.events)[-fresh:] if fresh > 0 else []:
            self.say(
                f"scale {ev.kind} {ev.from_replicas}->{ev.to_replicas}: {ev.reason} "
                f"(running {ev.demand.running}, reserved {ev.demand.reserved}, "
                f"queued {ev.demand.queued})"
            )
        for r in scaler.replicas.values():
            if r.worker_id:
                self.worker_replica[r.worker_id] = r.id
            if self._seen.get(r.id) != r.state.value:
                self._seen[r.id] = r.state.value
                extra = ""
                if r.state.value == "ready" and r.ready_at is not None:
                    extra = f" (cold start {r.ready_at - r.created_at:.2f} s)"
                self.say(f"replica {r.id} {r.state.value}{extra}")

    def _live(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        scaler = self._scaler()
        cap = self.args.cap
        table = Table(title=f"pool demo: +{self.elapsed():.1f} s", title_justify="left")
        for col in ("replica", "state", "cold start", "slots"):
            table.add_column(col)
        d = self.dispatcher
        for r in scaler.replicas.values():
            if r.worker_id:
                self.worker_replica[r.worker_id] = r.id
            w = d.worker(r.worker_id) if r.worker_id else None
            used = w.used if w is not None else 0
            cold = f"{r.ready_at - r.created_at:.2f} s" if r.ready_at is not None else "-"
            style = _STATE_STYLE.get(r.state.value, "")
            bar = "[green]" + "■" * used + "[/][dim]" + "□" * max(cap - used, 0) + "[/]"
            table.add_row(r.id, f"[{style}]{r.state.value}[/]", cold, f"{bar} {used}/{cap}")
        counts = {s: 0 for s in ("queued", "running", "succeeded")}
        for c in self.calls.values():
            counts[c.state] = counts.get(c.state, 0) + 1
        summary = "  ".join(f"{k}: {v}" for k, v in counts.items() if v or k in counts)
        events = [
            f"[dim]{ev.kind} {ev.from_replicas}->{ev.to_replicas}[/] {ev.reason}"
            for ev in list(scaler.events)[-4:]
        ]
        return Group(table, f"calls  {summary}", *events)

    # ------------------------------------------------------------------ report

    def _replica_of(self, worker_id: str | None) -> str:
        if worker_id is None:
            return "-"
        for r in self._scaler().replicas.values():
            if r.worker_id == worker_id:
                self.worker_replica[worker_id] = r.id
        return self.worker_replica.get(worker_id, worker_id)

    def _report(self) -> None:
        from rich.table import Table

        calls = Table(title="calls", title_justify="left")
        for col in ("call", "queued for", "replica", "outcome"):
            calls.add_column(col, justify="right" if col == "queued for" else "left")
        for c in sorted(self.calls.values(), key=lambda c: c.n):
            waited = f"{c.placed_at - c.created_at:.2f} s" if c.placed_at is not None else "-"
            outcome = c.state if c.state == "succeeded" else f"{c.state}: {c.reason}"
            calls.add_row(str(c.n), waited, self._replica_of(c.worker_id), outcome)
        self.console.print(calls)
        reps = Table(title="replicas", title_justify="left")
        for col in ("replica", "state", "cold start", "peak slots", "calls"):
            reps.add_column(col)
        by_replica = {self._replica_of(w): w for w in self.peak}
        for r in self._scaler().replicas.values():
            wid = by_replica.get(r.id)
            cold = f"{r.ready_at - r.created_at:.2f} s" if r.ready_at is not None else "-"
            peak = self.peak.get(wid, 0) if wid else 0
            served = self.served.get(wid, 0) if wid else 0
            reps.add_row(r.id, r.state.value, cold, f"{peak}/{self.args.cap}", str(served))
        self.console.print(reps)

    def _verdict(self) -> bool:
        cap = self.args.cap
        peak = max(self.peak.values(), default=0)
        lost = [c for c in self.calls.values() if c.state != "succeeded"]
        waits = [c.placed_at - c.created_at for c in self.calls.values() if c.placed_at]
        cap_ok = peak <= cap
        ok = cap_ok and not lost
        verdict = "PASS" if ok else "FAIL"
        self.console.print(
            f"verdict: {verdict}: cap respected: {'yes' if cap_ok else 'NO'} "
            f"(peak {peak} of {cap} slots on a replica); calls lost: {len(lost)} of "
            f"{len(self.calls)}; slowest wait {max(waits, default=0.0):.2f} s",
            highlight=False,
            soft_wrap=True,
        )
        return ok


def _run(args: argparse.Namespace) -> int:
    for name in ("calls", "cap", "max_replicas"):
        if getattr(args, name) < 1:
            print(f"trunkline demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not 0 <= args.min_replicas <= args.max_replicas:
        print("trunkline demo: need 0 <= --min-replicas <= --max-replicas", file=sys.stderr)
        return 2
    if args.call_seconds < 0 or args.max_wait < 0:
        print("trunkline demo: --call-seconds and --max-wait must be >= 0", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Demo(args).run())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
