"""End-to-end dispatch benchmark: request → assignment latency, and job-cycle throughput.

Starts the server (`trunkline serve`, or with `--baseline` the plain-aiohttp
yardstick in `_common.py`) on a free loopback port, starts `protocol_workers.py`
with 200 workers in a second process, waits until the server lists them all,
then runs two phases from this (third) process:

(a) latency, open loop: dispatches at an exact rate (default 500/s for 10 s),
    each sent at its absolute target time over a pool of keep-alive
    connections, never waiting for earlier ones. Latency = the moment the
    request bytes were written → the moment the assignment reached the worker
    (both `time.monotonic()`, which is system-wide on Linux). The job's
    metadata carries its sequence number so the two ends can be matched.
    Target: p50 ≤ 2 ms, p99 ≤ 10 ms.
(b) throughput, closed loop: `--concurrency` independent loops each run
    request → offer → accept → assignment → running → success, starting the
    next cycle the moment the worker has sent success and the 201 has come
    back. Target: ≥ 2,000 cycles/s.

The load generator is checked, not assumed, not to be the bottleneck: the
CPU% of the server, the workers process and this driver are measured over each
window from /proc, and the open-loop schedule lag (actual send - target time)
is reported. Runs are bounded in time and count and clean up every child on
any exit.

With `--history compare` both phases run twice in one invocation, first with
the history in memory (`[store] backend = "memory"`), then in SQLite (the
default store, a fresh data directory), and the two are compared: the bar is
throughput and p99 within 5 % (`--history sqlite` or `memory` runs one).
`--rounds N` repeats the pair N times, alternating which goes first
(memory, sqlite, sqlite, memory, ...), and compares the medians, so a
shared machine's drift lands on both sides.
SQLite's writes run where the server runs them by default, in its history
writer process (`--writer thread`: on a server thread); that process's CPU
is measured and reported next to the server's ("history writer").

    .venv/bin/python benchmarks/e2e_dispatch.py            # trunkline
    .venv/bin/python benchmarks/e2e_dispatch.py --baseline # the yardstick
    .venv/bin/python benchmarks/e2e_dispatch.py --history compare
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    POOL,
    ConnPool,
    CpuMeter,
    HttpConn,
    PySpy,
    ServerUnderTest,
    WorkersProcess,
    add_quiet_options,
    admin_token,
    build_request,
    machine_info,
    percentile,
    profile_summary,
    quiet_machine,
    run_driver,
    verdict,
    worker_command,
)

HISTORY_MODES = ("memory", "sqlite")
SAMPLES = "samples_ms"
WRITER = "history writer"  # the CPU figures' name of the history writer process
HISTORY_COST_LIMIT = 0.05  # SQLite history on: at most 5 % slower than in memory
LATENCY_P50_MS = 2.0
LATENCY_P99_MS = 10.0
THROUGHPUT_PER_S = 2000.0
# Above this share of one core a generator process may be holding the server back.
GENERATOR_CPU_LIMIT = 80.0


def dispatch_body(seq: int, max_wait_s: float) -> bytes:
    return json.dumps(
        {
            "agent_name": POOL,
            "room": f"bench-{seq}",
            "metadata": str(seq),
            "max_wait_s": max_wait_s,
            "wait": False,
        },
        separators=(",", ":"),
    ).encode()


@dataclass
class OpenLoopResult:
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    response_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    missing: int = 0
    bad_status: dict[int, int] = field(default_factory=dict)
    cpu: CpuMeter | None = None
    pool_grown: int = 0
    seconds: float = 0.0
    p99_by_second: str = ""


async def open_loop(
    pool: ConnPool,
    workers: WorkersProcess,
    *,
    first_seq: int,
    rate: float,
    seconds: float,
    token: str,
    cpu: CpuMeter | None,
    drain_s: float = 5.0,
) -> OpenLoopResult:
    """Send `rate * seconds` dispatches at exact absolute times; match them to assignments."""
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    port = pool.port
    requests = [
        build_request(port, "/v1/dispatches", dispatch_body(first_seq + i, 5.0), token)
        for i in range(n)
    ]
    send_t = [0.0] * n
    resp_t = [0.0] * n
    assign_t = [0.0] * n
    status = [0] * n
    done = asyncio.Event()
    outstanding = [2 * n]  # responses + assignments still to come

    def on_assign(seq: int, t: float) -> None:
        i = seq - first_seq
        if 0 <= i < n and assign_t[i] == 0.0:
            assign_t[i] = t
            outstanding[0] -= 1
            if outstanding[0] == 0:
                done.set()

    def on_response(i: int, conn: HttpConn, code: int, _body: bytes) -> None:
        resp_t[i] = time.monotonic()
        status[i] = code
        pool.give(conn)
        outstanding[0] -= 1
        if outstanding[0] == 0:
            done.set()

    workers.on_assign = on_assign
    grown_before = pool.grown
    interval = 1.0 / rate
    t0 = loop.time() + 0.05
    if cpu is not None:
        cpu.start()
    i = 0
    monotonic = time.monotonic
    while i < n:
        now = loop.time()
        while i < n and t0 + i * interval <= now:
            conn = pool.idle.popleft() if pool.idle else await pool.take()
            send_t[i] = monotonic()
            conn.send(requests[i], partial(on_response, i, conn))
            i += 1
        if i < n:
            await asyncio.sleep(t0 + i * interval - loop.time())
    result = OpenLoopResult(sent=n, seconds=seconds, pool_grown=pool.grown - grown_before, cpu=cpu)
    if cpu is not None:
        cpu.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), drain_s)
    workers.on_assign = lambda seq, t: None
    for k in range(n):
        result.lag_ms.append((send_t[k] - (t0 + k * interval)) * 1e3)
        if status[k] != 201:
            result.bad_status[status[k]] = result.bad_status.get(status[k], 0) + 1
        if resp_t[k]:
            result.response_ms.append((resp_t[k] - send_t[k]) * 1e3)
        if assign_t[k]:
            result.latencies_ms.append((assign_t[k] - send_t[k]) * 1e3)
        else:
            result.missing += 1
    answered = [k for k in range(n) if assign_t[k]]
    result.p99_by_second = per_second(
        [send_t[k] for k in answered], [(assign_t[k] - send_t[k]) * 1e3 for k in answered], t0
    )
    return result


@dataclass
class ClosedLoopResult:
    cycles: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    bad_status: dict[int, int] = field(default_factory=dict)
    unfinished: int = 0
    cycle_ms: list[float] = field(default_factory=list)
    cpu: CpuMeter | None = None
    per_second: list[int] = field(default_factory=list)
    next_seq: int = 0


async def closed_loop(
    port: int,
    workers: WorkersProcess,
    *,
    first_seq: int,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    max_cycles: int,
    token: str,
    cpu: CpuMeter | None,
    on_window_start: Callable[[], None] | None = None,
) -> ClosedLoopResult:
    """`concurrency` loops of full job cycles; count those completed in the window."""
    loop = asyncio.get_running_loop()
    conns = [await HttpConn.open(port) for _ in range(concurrency)]
    next_seq = [first_seq]
    # seq -> [slot, cycle start, response seen, assignment seen]
    pending: dict[int, list[Any]] = {}
    result = ClosedLoopResult()
    window = [0.0, 0.0]
    stopping = [False]
    all_done = asyncio.Event()
    started = [0]
    monotonic = time.monotonic

    def start_cycle(slot: int) -> None:
        if stopping[0] or started[0] >= max_cycles:
            if not pending:
                all_done.set()
            return
        seq = next_seq[0]
        next_seq[0] += 1
        started[0] += 1
        pending[seq] = [slot, monotonic(), False, False]
        req = build_request(port, "/v1/dispatches", dispatch_body(seq, 10.0), token)
        conns[slot].send(req, partial(on_response, seq))

    def maybe_finish(seq: int, entry: list[Any]) -> None:
        if not (entry[2] and entry[3]):
            return
        del pending[seq]
        t = monotonic()
        if window[0] <= entry[1] and t <= window[1]:
            result.cycles += 1
            result.cycle_ms.append((t - entry[1]) * 1e3)
            second = int(t - window[0])
            while len(result.per_second) <= second:
                result.per_second.append(0)
            result.per_second[second] += 1
        start_cycle(entry[0])

    def on_response(seq: int, code: int, _body: bytes) -> None:
        entry = pending.get(seq)
        if entry is None:
            return
        if code != 201:
            result.bad_status[code] = result.bad_status.get(code, 0) + 1
            entry[3] = True  # no assignment will come; free the loop
        entry[2] = True
        maybe_finish(seq, entry)

    def on_assign(seq: int, _t: float) -> None:
        entry = pending.get(seq)
        if entry is not None:
            entry[3] = True
            maybe_finish(seq, entry)

    workers.on_assign = on_assign
    t_begin = loop.time()
    window[0] = t_begin + warmup_s
    window[1] = window[0] + seconds
    for slot in range(concurrency):
        start_cycle(slot)
    await asyncio.sleep(max(0.0, window[0] - loop.time()))
    if on_window_start is not None:
        on_window_start()
    if cpu is not None:
        cpu.start()
    await asyncio.sleep(max(0.0, window[1] - loop.time()))
    if cpu is not None:
        cpu.stop()
        result.cpu = cpu
    stopping[0] = True
    if pending:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), 10.0)
    result.unfinished = len(pending)
    result.seconds = seconds
    result.next_seq = next_seq[0]
    result.rate = result.cycles / seconds
    workers.on_assign = lambda seq, t: None
    for conn in conns:
        conn.close()
    return result


def generator_note(cpu: CpuMeter) -> str:
    """CPU use over the window, and whether the generator processes had headroom."""
    pct = cpu.percent
    hot = [f"{k} {v:.0f}%" for k, v in pct.items() if k != "server" and v > GENERATOR_CPU_LIMIT]
    cores = os.cpu_count() or 1
    total = sum(pct.values()) + cpu.rest
    note = f"CPU, % of one core: {cpu.line()}; machine {total:.0f}% of {cores * 100}%"
    if hot:
        note += f"\n  WARNING generator near saturation: {', '.join(hot)}"
    else:
        note += f"\n  generator processes each below {GENERATOR_CPU_LIMIT:.0f}% of a core"
    if cores * 100 - total < 25:
        note += "; WARNING the machine had < 25% of a core to spare"
    return note


def per_second(send_t: list[float], values: list[float], t0: float) -> str:
    """p99 of `values` for each whole second after `t0` (by send time), as one line."""
    buckets: dict[int, list[float]] = {}
    for t, v in zip(send_t, values, strict=True):
        buckets.setdefault(int(t - t0), []).append(v)
    return " ".join(f"{percentile(sorted(b), 99):.1f}" for _, b in sorted(buckets.items()))


def summarize_ms(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "max": s[-1] if s else float("nan"),
    }


def fmt_ms(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f} ms" for k, v in stats.items())


def make_profile(args: argparse.Namespace, pid: int, phase: str) -> PySpy | None:
    """A py-spy recorder for the measured window of `phase`, if `--profile` was given."""
    if not args.profile:
        return None
    out = Path(args.profile) / f"{phase}.txt"
    return PySpy(pid, args.duration, out, blocking=args.profile_blocking)


async def finish_profile(spy: PySpy | None, phase: str) -> None:
    if spy is None:
        return
    await spy.wait()
    if spy.out.exists():
        summary = profile_summary(spy.out)
        spy.out.with_suffix(".summary.txt").write_text(summary + "\n")
        print(f"\nserver profile, {phase} phase ({spy.out}):\n{summary}")


@dataclass
class Bench:
    """What every phase needs: the settings, the two child processes, and ids."""

    args: argparse.Namespace
    server: ServerUnderTest
    workers: WorkersProcess
    pids: dict[str, int]
    token: str
    seq: int = 1


def best_rest(result: OpenLoopResult | ClosedLoopResult) -> float:
    """How disturbed a run was: mean plus worst-second CPU of other programs."""
    return result.cpu.rest + result.cpu.rest_peak if result.cpu is not None else float("inf")


def disturbed(
    args: argparse.Namespace, cpu: CpuMeter, attempt: int, figure: float, unit: str
) -> bool:
    """True (and says so) if other programs used the machine during this attempt,
    so the caller should measure again; the least disturbed attempt is reported."""
    if cpu.rest < args.quiet_below and cpu.rest_peak < 2 * args.quiet_below:
        return False
    last = attempt > args.retries
    print(
        f"  attempt {attempt}: {figure:,.1f} {unit} while the rest of the machine used "
        f"{cpu.rest:.0f}% of a core (worst second {cpu.rest_peak:.0f}%); "
        + ("no retries left, reporting the least disturbed attempt" if last else "measuring again")
    )
    return not last


async def latency_phase(b: Bench) -> dict[str, Any]:
    """(a) open-loop latency; prints the figures, returns them for --json."""
    args = b.args
    pool = ConnPool(b.server.port)
    await pool.fill(args.connections)
    if args.warmup > 0:
        warm = await open_loop(
            pool,
            b.workers,
            first_seq=b.seq,
            rate=args.rate,
            seconds=args.warmup,
            token=b.token,
            cpu=None,
        )
        b.seq += warm.sent
        await asyncio.sleep(args.latency_hold + 0.5)
    best: OpenLoopResult | None = None
    for attempt in range(1, args.retries + 2):
        track_writer(b)
        await quiet_machine(args, b.pids)
        cpu = CpuMeter(b.pids)
        spy = make_profile(args, b.server.pid, "latency")
        if spy is not None:
            spy.start()
        run = await open_loop(
            pool,
            b.workers,
            first_seq=b.seq,
            rate=args.rate,
            seconds=args.duration,
            token=b.token,
            cpu=cpu,
        )
        b.seq += run.sent
        await finish_profile(spy, "latency")
        if best is None or cpu.rest + cpu.rest_peak < best_rest(best):
            best = run
        if not disturbed(args, cpu, attempt, summarize_ms(run.latencies_ms)["p99"], "p99 ms"):
            break
        await asyncio.sleep(args.latency_hold + 0.5)
    pool.close()
    assert best is not None
    lat = best
    stats = summarize_ms(lat.latencies_ms)
    print(
        f"\n(a) latency, open loop {args.rate:.0f}/s for {args.duration:.0f} s "
        f"({lat.sent} dispatches, {args.workers} workers, hold {args.latency_hold} s)"
    )
    print(f"  request -> assignment at worker: {fmt_ms(stats)}")
    print(f"  request -> 201 response:         {fmt_ms(summarize_ms(lat.response_ms))}")
    print(f"  send lag behind schedule:        {fmt_ms(summarize_ms(lat.lag_ms))}")
    print(
        f"  missing assignments: {lat.missing}; non-201: {lat.bad_status or 0}; "
        f"connections opened beyond pool: {lat.pool_grown}"
    )
    print(f"  p99 by second (ms): {lat.p99_by_second}")
    cpu_per_job_us = float("nan")
    if lat.cpu is not None:
        print(f"  {generator_note(lat.cpu)}")
        cpu_per_job_us = lat.cpu.percent["server"] / 100.0 * lat.seconds / lat.sent * 1e6
        print(f"  server CPU per dispatch (incl. its running/success): {cpu_per_job_us:.0f} us")
    ok = (
        stats["p50"] <= LATENCY_P50_MS
        and stats["p99"] <= LATENCY_P99_MS
        and lat.missing == 0
        and not lat.bad_status
    )
    print(
        "  "
        + verdict(
            ok,
            f"p50 {stats['p50']:.2f} ms <= {LATENCY_P50_MS} ms and p99 {stats['p99']:.2f} ms "
            f"<= {LATENCY_P99_MS} ms, none missing",
        )
    )
    await asyncio.sleep(args.latency_hold + 0.5)  # let the held jobs end
    return {
        **stats,
        SAMPLES: lat.latencies_ms,  # pooled over rounds by --history compare, then dropped
        "missing": lat.missing,
        "bad_status": lat.bad_status,
        "p99_by_second": lat.p99_by_second,
        "server_cpu_us_per_dispatch": cpu_per_job_us,
        "cpu": lat.cpu.percent if lat.cpu else {},
        "rest_of_machine_cpu": lat.cpu.rest if lat.cpu else None,
        "rest_of_machine_worst_second": lat.cpu.rest_peak if lat.cpu else None,
        "pass": ok,
    }


async def throughput_phase(b: Bench) -> dict[str, Any]:
    """(b) closed-loop full job cycles; prints the figures, returns them for --json."""
    args = b.args
    await b.workers.command("hold 0")
    best: ClosedLoopResult | None = None
    for attempt in range(1, args.retries + 2):
        track_writer(b)
        await quiet_machine(args, b.pids)
        cpu = CpuMeter(b.pids)
        spy = make_profile(args, b.server.pid, "throughput")
        run = await closed_loop(
            b.server.port,
            b.workers,
            first_seq=b.seq,
            concurrency=args.concurrency,
            warmup_s=args.warmup,
            seconds=args.duration,
            max_cycles=args.max_cycles,
            token=b.token,
            cpu=cpu,
            on_window_start=spy.start if spy is not None else None,
        )
        b.seq = run.next_seq
        await finish_profile(spy, "throughput")
        if best is None or cpu.rest + cpu.rest_peak < best_rest(best):
            best = run
        if not disturbed(args, cpu, attempt, run.rate, "cycles/s"):
            break
    assert best is not None
    thr = best
    cyc = summarize_ms(thr.cycle_ms)
    print(
        f"\n(b) throughput, closed loop, {args.concurrency} concurrent cycles for "
        f"{args.duration:.0f} s"
    )
    print(f"  complete job cycles: {thr.cycles} = {thr.rate:,.0f}/s")
    print(f"  cycle time: {fmt_ms(cyc)}")
    print(f"  non-201: {thr.bad_status or 0}; unfinished at stop: {thr.unfinished}")
    print(f"  cycles by second: {' '.join(str(n) for n in thr.per_second)}")
    cpu_per_cycle_us = writer_per_cycle_us = float("nan")
    if thr.cpu is not None:
        print(f"  {generator_note(thr.cpu)}")
        if thr.cycles:
            server_s = thr.cpu.percent["server"] / 100.0 * thr.seconds
            cpu_per_cycle_us = server_s / thr.cycles * 1e6
            if WRITER in thr.cpu.percent:
                writer_s = thr.cpu.percent[WRITER] / 100.0 * thr.seconds
                writer_per_cycle_us = writer_s / thr.cycles * 1e6
        if cpu_per_cycle_us > 0:
            # Robust to other programs stealing the CPU: what one cycle costs the server.
            print(
                f"  server CPU per job cycle: {cpu_per_cycle_us:.0f} us "
                f"(= {1e6 / cpu_per_cycle_us:,.0f} cycles/s if it had a whole core)"
            )
        if WRITER in thr.cpu.percent:
            print(f"  history writer process CPU per job cycle: {writer_per_cycle_us:.0f} us")
    ok = thr.rate >= THROUGHPUT_PER_S and not thr.bad_status and thr.unfinished == 0
    print("  " + verdict(ok, f"{thr.rate:,.0f} cycles/s >= {THROUGHPUT_PER_S:,.0f}/s"))
    return {
        "rate": thr.rate,
        "cycles": thr.cycles,
        "cycle_ms": cyc,
        "bad_status": thr.bad_status,
        "unfinished": thr.unfinished,
        "per_second": thr.per_second,
        "server_cpu_us_per_cycle": cpu_per_cycle_us,
        "writer_cpu_us_per_cycle": writer_per_cycle_us,
        "cpu": thr.cpu.percent if thr.cpu else {},
        "rest_of_machine_cpu": thr.cpu.rest if thr.cpu else None,
        "rest_of_machine_worst_second": thr.cpu.rest_peak if thr.cpu else None,
        "pass": ok,
    }


class HistoryServer(ServerUnderTest):
    """The server with its job history in memory or in SQLite (its own data
    dir), SQLite's writes in a child process or a thread (`writer`)."""

    def __init__(self, history: str, writer: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.history = history
        self.writer = writer

    def config_text(self) -> str:
        # the base config already puts data_dir in this server's temp dir
        return (
            super().config_text()
            + f'\n[store]\nbackend = "{self.history}"\nwriter = "{self.writer}"\n'
        )


def track_writer(b: Bench) -> None:
    """Count the server's history writer process in the CPU figures, once it
    runs (it starts at the first write)."""
    if WRITER in b.pids:
        return
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != b.server.pid:
                continue
            if b"writer_process" in (stat.parent / "cmdline").read_bytes():
                b.pids[WRITER] = int(stat.parent.name)
                return


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One run (`--history memory|sqlite`), or both compared (`compare`)."""
    if args.history != "compare" or args.baseline:
        one = await run_once(args, "memory" if args.history == "compare" else args.history)
        one.get("latency", {}).pop(SAMPLES, None)
        return one
    out: dict[str, Any] = {"history": {}, "rounds": []}
    for i in range(args.rounds):
        pair: dict[str, dict[str, Any]] = {}
        for mode in HISTORY_MODES if i % 2 == 0 else HISTORY_MODES[::-1]:
            print(f"\n===== job history: {mode} (round {i + 1} of {args.rounds}) =====")
            pair[mode] = await run_once(args, mode)
        out["rounds"].append(pair)
    for i, pair in enumerate(out["rounds"]):
        for mode, r in pair.items():
            nan = float("nan")
            t, lat = r.get("throughput", {}), r.get("latency", {})
            print(
                f"  round {i + 1} {mode:6s}: {t.get('rate', nan):,.0f} cycles/s, "
                f"{t.get('server_cpu_us_per_cycle', nan):.0f} us CPU/cycle, "
                f"p50 {lat.get('p50', nan):.2f} / p99 {lat.get('p99', nan):.2f} ms"
            )
    pooled = {m: pooled_p99(out["rounds"], m) for m in HISTORY_MODES}
    out["history"] = {m: median_run([r[m] for r in out["rounds"]]) for m in HISTORY_MODES}
    out["history_cost"] = history_cost(out["history"], pooled)
    return out


def pooled_p99(rounds: list[dict[str, dict[str, Any]]], mode: str) -> float:
    """p99 of every latency sample `mode`'s rounds took (taking them out of
    the figures): one p99 over all rounds, steadier than any one round's."""
    samples: list[float] = []
    for pair in rounds:
        samples += pair[mode].get("latency", {}).pop(SAMPLES, [])
    return percentile(sorted(samples), 99) if samples else float("nan")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run of figures: each phase's numbers the median over `runs`
    (each run's own pass verdicts kept only if all passed)."""
    out = dict(runs[-1])
    for phase in ("latency", "throughput"):
        if phase in runs[0]:
            merged = dict(runs[-1][phase])
            for key, value in runs[0][phase].items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    merged[key] = statistics.median(r[phase][key] for r in runs)
            merged["pass"] = all(r[phase]["pass"] for r in runs)
            out[phase] = merged
    return out


def history_cost(runs: dict[str, dict[str, Any]], pooled: dict[str, float]) -> dict[str, Any]:
    """SQLite history against memory, same settings, same invocation; prints
    it. Throughput: medians of the rounds; p99: of all rounds' samples pooled
    (`pooled`; the median of the rounds' p99s is printed too)."""
    off, on = runs["memory"], runs["sqlite"]
    print("\n===== job history: SQLite vs memory =====")
    out: dict[str, Any] = {}
    checks = []
    if "throughput" in off:
        a, b = off["throughput"]["rate"], on["throughput"]["rate"]
        drop = (a - b) / a if a else float("nan")
        ca, cb = (off["throughput"]["server_cpu_us_per_cycle"],
                  on["throughput"]["server_cpu_us_per_cycle"])  # fmt: skip
        print(f"  throughput: {a:,.0f} -> {b:,.0f} cycles/s ({-drop:+.1%})")
        print(f"  server CPU per job cycle: {ca:.0f} -> {cb:.0f} us ({(cb - ca) / ca:+.1%})")
        wb = on["throughput"].get("writer_cpu_us_per_cycle", float("nan"))
        if not math.isnan(wb):  # the writer process ran
            print(
                f"  server + history writer process CPU per job cycle: {ca:.0f} -> "
                f"{cb + wb:.0f} us ({(cb + wb - ca) / ca:+.1%}; on another core)"
            )
        out["throughput_change"] = -drop
        out["cpu_per_cycle_change"] = (cb - ca) / ca
        checks.append(drop <= HISTORY_COST_LIMIT)
    if "latency" in off:
        ma, mb = off["latency"]["p99"], on["latency"]["p99"]
        a, b = pooled["memory"], pooled["sqlite"]
        grow = (b - a) / a if a else float("nan")
        print(f"  latency p99, every round's samples: {a:.2f} -> {b:.2f} ms ({grow:+.1%})")
        print(f"  latency p99, median of the rounds': {ma:.2f} -> {mb:.2f} ms")
        print(f"  latency p50: {off['latency']['p50']:.2f} -> {on['latency']['p50']:.2f} ms")
        out["p99_change"] = grow
        checks.append(grow <= HISTORY_COST_LIMIT)
    out["pass"] = all(checks)
    print(
        "  "
        + verdict(
            out["pass"],
            f"SQLite history within {HISTORY_COST_LIMIT:.0%} of memory (throughput, p99)",
        )
    )
    return out


async def run_once(args: argparse.Namespace, history: str) -> dict[str, Any]:
    server = HistoryServer(
        history,
        args.writer,
        baseline=args.baseline,
        max_jobs_per_worker=args.max_jobs_per_worker,
    )
    print(f"machine: {machine_info()}")
    print(f"server: {server.name} on 127.0.0.1:{server.port}")
    server.start()
    workers = WorkersProcess(
        worker_command(
            server.ws_url,
            args.workers,
            hold_s=args.latency_hold,
            max_jobs=args.declared_max_jobs,
        )
    )
    await workers.start()
    ready = await workers.wait_ready(60.0)
    deadline = time.monotonic() + 20.0
    listed = 0
    while time.monotonic() < deadline:
        listed = await asyncio.to_thread(server.count_workers)
        if listed >= args.workers:
            break
        await asyncio.sleep(0.1)
    print(f"workers: {args.workers} registered in {ready['seconds']} s; server lists {listed}")
    if listed < args.workers:
        raise RuntimeError(f"server lists only {listed} of {args.workers} workers")
    pids = {"server": server.pid, "workers": workers.pid, "driver": os.getpid()}
    bench = Bench(args, server, workers, pids, admin_token())
    out: dict[str, Any] = {"machine": machine_info(), "server": server.name, "store": history}
    phases = {p.strip() for p in args.phases.split(",")}
    if "latency" in phases:
        out["latency"] = await latency_phase(bench)
    if "throughput" in phases:
        out["throughput"] = await throughput_phase(bench)
    summary = await workers.stop()
    print(
        f"\nworkers process: offers {summary.get('offers')}, assignments "
        f"{summary.get('assignments')}, successes {summary.get('successes')}, "
        f"disconnects {summary.get('disconnects')}, errors {summary.get('errors')}"
    )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", action="store_true", help="benchmark the plain-aiohttp yardstick")
    p.add_argument("--phases", default="latency,throughput", help="which phases to run")
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--rate", type=float, default=500.0, help="open-loop dispatches per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--connections", type=int, default=16, help="open-loop keep-alive pool")
    p.add_argument("--concurrency", type=int, default=128, help="closed-loop cycles in flight")
    p.add_argument("--max-cycles", type=int, default=200_000, help="closed-loop cap")
    p.add_argument(
        "--latency-hold", type=float, default=0.5, help="job length in the latency phase (s)"
    )
    p.add_argument("--max-jobs-per-worker", type=int, default=4, help="pool config")
    p.add_argument("--declared-max-jobs", type=int, default=0, help="?max_jobs= (0: none)")
    add_quiet_options(p, quiet_wait=120.0, unit="phase")
    p.add_argument(
        "--history",
        choices=("memory", "sqlite", "compare"),
        default="memory",
        help="the server's job history store; compare: run memory, then sqlite, and compare",
    )
    p.add_argument("--rounds", type=int, default=1, help="compare: memory/sqlite pairs, medians")
    p.add_argument(
        "--writer",
        choices=("process", "thread"),
        default="process",
        help="SQLite's writes in the history writer process (the default) or a server thread",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the server during each measured phase; raw stacks and summary in DIR",
    )
    p.add_argument(
        "--profile-blocking",
        action="store_true",
        help="let py-spy pause the server per sample: whole stacks, but slows it down",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = run_driver(lambda: run(args), args.json)
    if out is None:
        return 130
    runs = list(out["history"].values()) if "history" in out else [out]
    ok = all(r[k]["pass"] for r in runs for k in ("latency", "throughput") if k in r)
    if "history_cost" in out:
        ok = ok and out["history_cost"]["pass"]
    print(f"\n{verdict(ok, 'e2e dispatch targets')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
