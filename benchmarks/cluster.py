"""Cluster mode: one server vs three servers on Redis, in the same run.

Theory of operation: starts a redis-server (Debian's binary, a free loopback
port, tests/cluster/redisserver.py) and, per mode, `trunkline serve`
processes on free loopback ports: "single" is one server without
`[cluster]`, "three" is three members on that Redis. Protocol-level workers
(benchmarks/protocol_workers.py, one child process per server, the workers
split evenly over them) end every job the moment it is assigned, so slots
free at once. Phases, per mode:

(a) latency, open loop, a sweep: for each rate of `--rates`, that many
    dispatches/s for `--seconds`, pre-built request bytes sent round-robin
    to the servers over keep-alive connections (`_common.HttpConn`, as
    e2e_dispatch.py) at their absolute target times, never waiting for
    earlier ones; the driver's garbage collector is off during the window
    (`gc.freeze`, `gc.disable`). A mode *keeps up* with a rate when every
    request got 201 and was assigned and the p99 stayed under 100 ms
    (`keeps_up`). Latency = the request bytes written (monotonic clock,
    system-wide on Linux) -> its assignment read by the worker process; the
    job's metadata is the sequence number. Reported with it: the send lag
    (actual send - target time) and the CPU of each process over the
    window (driver, workers, servers, Redis, the rest of the machine), so a
    slow generator shows instead of passing for a slow server. In "three",
    two requests in three reach a non-owner and are forwarded, two workers
    in three are piped: both hops are in the figure.
(b) throughput, closed loop: `--concurrency` loops each send a request and
    wait for its assignment; dispatches assigned per second.
(c) failover ("three" only), `--kills` rounds: a worker of a second pool
    runs one job with a second one queued behind it; the owner is killed
    (SIGKILL); the worker reconnects to a survivor at once (as a load
    balancer would send it), migrates its running job and ends it; failover
    time = the kill -> the queued job offered to it by the new owner (lease
    expiry + take-over + `[cluster] settle_s`, the wait for workers to
    migrate). The killed member is started again before the next round.

Before 2026-12-02 06:00 the workers (tests/protoworker.py) and an aiohttp
client shared this process: its p99 at 500/s (14 ms for one server) was the
driver's own event loop, not the servers (see docs/benchmarks.md).

    .venv/bin/python benchmarks/cluster.py                  # full run, ~3 min
    .venv/bin/python benchmarks/cluster.py --seconds 2 --kills 3 --rates 100   # quick
    .venv/bin/python benchmarks/cluster.py --modes three --profile /tmp/prof  # cProfile

It ends with the figures as docs/benchmarks.md's table rows and the load
average before and after (the machine's, from /proc/loadavg).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _common import (  # noqa: E402
    ConnPool,
    CpuMeter,
    HttpConn,
    WorkersProcess,
    build_request,
    redis_server_class,
    run_driver,
    wait_machine_quiet,
    worker_command,
)
from protoworker import ProtoWorker  # noqa: E402
from support import KEY, SECRET, ServerProcess, admin_token  # noqa: E402

RedisServer = redis_server_class()
PROFILE_DIR: Path | None = None  # --profile: each server runs under cProfile


class ProfiledServer(ServerProcess):
    """`ServerProcess`, optionally under cProfile (written at its SIGTERM exit)."""

    profile: Path | None = None

    def start(self, timeout: float = 20.0) -> None:
        if self.profile is None:
            super().start(timeout)
            return
        import subprocess

        real = sys.executable
        cmd = [real, "-m", "cProfile", "-o", str(self.profile)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "-m", "trunkline", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)  # ok-sleep: polling for the port to open
        raise TimeoutError(f"server did not listen within {timeout} s")


POOL = "bench"
FO_POOL = "failover"


def toml(redis_url: str | None, ttl: float) -> str:
    text = (
        '[store]\nbackend = "memory"\n'
        f"[pools.{POOL}]\nmax_jobs_per_worker = 8\nqueue_max_wait_s = 30\n"
        f"[pools.{FO_POOL}]\nmax_jobs_per_worker = 1\nqueue_max_wait_s = 60\n"
    )
    if redis_url:
        text += f'[cluster]\nredis_url = "{redis_url}"\nlease_ttl_s = {ttl}\ntimeout_s = 0.5\n'
    return text


class Mode:
    """The servers of one mode and the workers connected to them."""

    def __init__(
        self, name: str, tmp: Path, redis_url: str | None, n: int, ttl: float, redis_pid: int = 0
    ) -> None:
        self.name = name
        self.redis_pid = redis_pid
        self.cpu_ms: dict[str, float] = {}  # CPU ms per dispatch in the closed loop, per process
        self.tmp = tmp
        self.redis_url = redis_url
        self.ttl = ttl
        self.count = 0
        self.servers = [self.new_server() for _ in range(n)]
        self.workers: list[WorkersProcess] = []
        self.assigned: dict[int, float] = {}
        self.waiters: dict[int, asyncio.Future[float]] = {}

    def new_server(self) -> ServerProcess:
        d = self.tmp / f"{self.name}-{self.count}"
        self.count += 1
        d.mkdir()
        srv = ProfiledServer(d, toml(self.redis_url, self.ttl), log_level="warning")
        if PROFILE_DIR is not None:
            srv.profile = PROFILE_DIR / f"{self.name}-{self.count - 1}.prof"
        srv.start(timeout=90.0)  # a loaded machine starts Python slowly
        return srv

    def pids(self) -> dict[str, int]:
        """The processes whose CPU a dispatch costs: each server (the owner of
        the benchmark's pool named so), Redis, and this driver."""
        out = {"driver": os.getpid()}
        for i, w in enumerate(self.workers):
            out[f"workers{i}"] = w.pid
        for i, srv in enumerate(self.servers):
            if srv.proc is not None:
                out[f"server{i}"] = srv.proc.pid
        if self.redis_pid:
            out["redis"] = self.redis_pid
        return out

    async def owner(self, pool: str = POOL, above: int = 0) -> tuple[int, int]:
        """(index of the server owning `pool`, its epoch); waits for one."""
        if self.redis_url is None:
            return 0, 0
        while True:
            for i, srv in enumerate(self.servers):
                with_view = await srv.get("/v1/cluster")
                for p in with_view["pools"]:
                    if p["pool"] == pool and p["ours"] and p["epoch"] > above:
                        return i, int(p["epoch"])
            await asyncio.sleep(0.02)

    async def connect_workers(self, n: int) -> None:
        """`n` workers, split evenly over the servers: one protocol_workers.py
        process per server, every assignment reported to `on_assigned`."""
        await self.owner()
        k = len(self.servers)
        for i, srv in enumerate(self.servers):
            count = n // k + (1 if i < n % k else 0)
            argv = worker_command(srv.ws_url + "/agent", count)
            w = WorkersProcess([*argv, "--key", KEY, "--secret", SECRET])
            await w.start()
            self.workers.append(w)
            await w.wait_ready(60.0)
            w.on_assign = self.on_assigned

    def on_assigned(self, seq: int, t: float) -> None:
        self.assigned[seq] = t
        fut = self.waiters.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_result(t)

    async def close(self) -> None:
        for w in self.workers:
            await w.stop()
        for srv in self.servers:
            srv.stop()


REFUSALS: dict[str, int] = {}


async def post(session: aiohttp.ClientSession, srv: ServerProcess, seq: int) -> int:
    body = {"agent_name": POOL, "metadata": str(seq), "max_wait_s": 30}
    async with session.post(srv.url + "/v1/dispatches", json=body, headers=srv.headers()) as r:
        got = await r.read()
        if r.status != 201:
            code = str(json.loads(got).get("code", r.status)) if got else str(r.status)
            REFUSALS[code] = REFUSALS.get(code, 0) + 1
        return r.status


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


QUIET_BELOW_PCT = 25.0  # of one core: what the rest of the machine may use
QUIET_WAIT_S = 10.0  # at most, before each sweep step


def dispatch_body(seq: int) -> bytes:
    return json.dumps(
        {"agent_name": POOL, "metadata": str(seq), "max_wait_s": 30}, separators=(",", ":")
    ).encode()


async def latency(
    mode: Mode, rate: float, seconds: float, base: int = 0, connections: int = 16
) -> dict[str, Any]:
    """One open-loop step of the sweep (see the module's docstring, (a))."""
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    k = len(mode.servers)
    token = admin_token(KEY, SECRET)
    pools = []
    for srv in mode.servers:
        pool = ConnPool(srv.port)
        await pool.fill(max(1, connections // k))
        pools.append(pool)
    requests = [
        build_request(
            mode.servers[(base + i) % k].port, "/v1/dispatches", dispatch_body(base + i), token
        )
        for i in range(n)
    ]
    send_t = [0.0] * n
    status = [0] * n
    refusals: dict[str, int] = {}

    def on_response(i: int, pool: ConnPool, conn: HttpConn, code: int, body: bytes) -> None:
        status[i] = code
        pool.give(conn)
        if code != 201:
            try:
                key = str(json.loads(body).get("code", code))
            except ValueError:
                key = str(code)
            refusals[key] = refusals.get(key, 0) + 1

    # Other programs on a shared machine show as a p99 of theirs: wait (briefly,
    # to keep the run short) for a quiet second; "rest_of_machine_pct" says how it went.
    await wait_machine_quiet(list(mode.pids().values()), QUIET_BELOW_PCT, QUIET_WAIT_S)
    cpu = CpuMeter(mode.pids())
    interval = 1.0 / rate
    gc.collect()
    gc.freeze()
    gc.disable()
    monotonic = time.monotonic
    try:
        t0 = loop.time() + 0.05
        cpu.start()
        i = 0
        while i < n:
            now = loop.time()
            while i < n and t0 + i * interval <= now:
                pool = pools[(base + i) % k]
                conn = pool.idle.popleft() if pool.idle else await pool.take()
                send_t[i] = monotonic()
                conn.send(
                    requests[i], lambda c, b, i=i, p=pool, co=conn: on_response(i, p, co, c, b)
                )
                i += 1
            if i < n:
                await asyncio.sleep(t0 + i * interval - loop.time())
        cpu.stop()
        deadline = monotonic() + 10
        late = [base + j for j in range(n) if base + j not in mode.assigned]
        while late and monotonic() < deadline:
            await asyncio.sleep(0.05)
            late = [s for s in late if s not in mode.assigned]
    finally:
        gc.enable()
        gc.unfreeze()
    grown = sum(p.grown for p in pools)
    for pool in pools:
        pool.close()
    lag = [(send_t[j] - (t0 + j * interval)) * 1000 for j in range(n)]
    lat = [
        (mode.assigned[base + j] - send_t[j]) * 1000 for j in range(n) if base + j in mode.assigned
    ]
    return {
        "sent": n,
        "assigned": len(lat),
        "refused": sum(1 for c in status if c != 201),
        "refusals": refusals,
        "p50_ms": round(pct(lat, 0.50), 3),
        "p99_ms": round(pct(lat, 0.99), 3),
        "max_ms": round(max(lat), 3) if lat else float("nan"),
        "send_lag_p99_ms": round(pct(lag, 0.99), 3),
        "send_lag_max_ms": round(max(lag), 3) if lag else float("nan"),
        "connections_opened": grown,
        "cpu_pct": {name: round(v) for name, v in cpu.percent.items()},
        "rest_of_machine_pct": round(cpu.rest),
    }


async def throughput(mode: Mode, concurrency: int, seconds: float, base: int) -> float:
    done = 0
    lost: list[int] = []
    stop = time.monotonic() + seconds
    seqs = iter(range(base, base + 10_000_000))
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        nonlocal done
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < stop:
                seq = next(seqs)
                fut: asyncio.Future[float] = loop.create_future()
                mode.waiters[seq] = fut
                srv = mode.servers[(seq + i) % len(mode.servers)]
                if await post(session, srv, seq) == 201:
                    try:
                        await asyncio.wait_for(fut, 10)
                        done += 1
                    except TimeoutError:
                        lost.append(seq)  # not assigned within 10 s: reported

    pids = mode.pids()
    cpu0 = {k: _cpu_s(pid) for k, pid in pids.items()}
    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    if lost:
        print(f"{mode.name}: {len(lost)} dispatches not assigned within 10 s", flush=True)
    # CPU per dispatch, per process: what a shared machine's load disturbs least.
    mode.cpu_ms = {
        k: round((_cpu_s(pid) - cpu0[k]) * 1000 / max(1, done), 3) for k, pid in pids.items()
    }
    return round(done / elapsed, 1)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def failover(mode: Mode, kills: int) -> list[float]:
    times = []
    for _ in range(kills):
        owner_i, _ = await mode.owner(FO_POOL)
        survivors = [s for i, s in enumerate(mode.servers) if i != owner_i]
        w = ProtoWorker(survivors[0].url, FO_POOL, max_jobs=1)
        await w.connect()
        async with aiohttp.ClientSession() as session:
            for _j in range(2):
                body = {"agent_name": FO_POOL, "max_wait_s": 60}
                srv = mode.servers[owner_i]
                async with session.post(
                    srv.url + "/v1/dispatches", json=body, headers=srv.headers()
                ) as r:
                    assert r.status == 201, await r.text()
        running = await w.take_job()
        await w.barrier()
        proc = mode.servers[owner_i].proc
        assert proc is not None
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await w.wait_closed(within=30)
        again = ProtoWorker(survivors[0].url, FO_POOL, max_jobs=1)
        while True:  # the survivor may not know the new owner for a moment
            try:
                await again.connect(within=5)
                break
            except Exception:
                await again.close()
                await asyncio.sleep(0.02)
                again = ProtoWorker(survivors[0].url, FO_POOL, max_jobs=1)
        await again.migrate(running)
        await again.succeed(running)
        job = await again.next_offer(within=30)
        times.append(time.monotonic() - t_kill)
        await again.accept(job.id)
        await again.next_assignment()
        await again.succeed(job.id)
        await again.close()
        await w.close()
        mode.servers[owner_i].stop()
        mode.servers[owner_i] = mode.new_server()
        await mode.owner(FO_POOL, above=0)
    return times


def keeps_up(res: dict[str, Any]) -> bool:
    """The criterion of the sweep: every request answered 201 and assigned,
    and the p99 under KEEP_UP_P99_MS (a queue that grows for the whole phase
    shows as a p99 of seconds)."""
    return bool(
        res["refused"] == 0 and res["assigned"] == res["sent"] and res["p99_ms"] <= KEEP_UP_P99_MS
    )


KEEP_UP_P99_MS = 100.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": _load()}
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        for name, url, n in (("single", None, 1), ("three", redis.url, 3)):
            if name not in args.modes.split(","):
                continue
            pid = redis.proc.pid if url is not None and redis.proc is not None else 0
            mode = Mode(name, Path(tmp), url, n, args.ttl, redis_pid=pid)
            try:
                await mode.connect_workers(args.workers)
                res: dict[str, Any] = {"sweep": {}}
                # Warm-up, not reported: first connections (forwarding, Redis) and imports.
                await latency(mode, rates[0], 1.0, base=90_000_000)
                for k, rate in enumerate(rates):
                    got = await latency(mode, rate, args.seconds, base=k * 1_000_000)
                    got["keeps_up"] = keeps_up(got)
                    if url is not None:  # > 1: the pool changed hands during the run
                        got["epoch"] = (await mode.owner())[1]
                    res["sweep"][f"{rate:g}"] = got
                    print(name, f"latency at {rate:g}/s", json.dumps(got), flush=True)
                res["dispatches_per_s"] = await throughput(
                    mode, args.concurrency, args.seconds, 10_000_000
                )
                owner_i, _ = await mode.owner()
                cpu = dict(mode.cpu_ms)
                if url is not None:
                    cpu[f"server{owner_i} (owner)"] = cpu.pop(f"server{owner_i}")
                res["cpu_ms_per_dispatch"] = cpu
                res["server_cpu_ms_per_dispatch"] = round(
                    sum(v for k, v in cpu.items() if k.startswith("server")), 3
                )
                print(name, "dispatches/s", res["dispatches_per_s"], json.dumps(cpu), flush=True)
                if url is not None and args.kills:
                    times = await failover(mode, args.kills)
                    res["failover_s"] = {
                        "n": len(times),
                        "p50": round(statistics.median(times), 3),
                        "p99": round(pct(times, 0.99), 3),
                        "max": round(max(times), 3),
                    }
                out[name] = res
            finally:
                await mode.close()
    out["load_after"] = _load()
    return out


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def table(out: dict[str, Any]) -> str:
    """The figures as docs/benchmarks.md's table rows."""
    modes = [m for m in ("single", "three") if m in out]
    lines = ["| | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
    rates = list(out[modes[0]]["sweep"]) if modes else []
    for rate in rates:
        cells = []
        for m in modes:
            r = out[m]["sweep"].get(rate)
            mark = "" if r and r["keeps_up"] else " (behind)"
            cells.append(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms{mark}" if r else "-")
        lines.append(f"| p50 / p99 at {rate}/s | " + " | ".join(cells) + " |")
    for rate in rates[-1:]:
        cells = []
        for m in modes:
            r = out[m]["sweep"][rate]
            c = r["cpu_pct"]
            servers = sum(v for name, v in c.items() if name.startswith("server"))
            workers = sum(v for name, v in c.items() if name.startswith("workers"))
            cells.append(
                f"lag p99 {r['send_lag_p99_ms']:.2f} ms; CPU driver {c['driver']}%, "
                f"workers {workers}%, servers {servers}%, redis {c.get('redis', 0)}%, "
                f"rest {r['rest_of_machine_pct']}%"
            )
        lines.append(f"| at {rate}/s: send lag, CPU (% of a core) | " + " | ".join(cells) + " |")
    lines.append(
        "| server CPU ms per dispatch (closed loop, all servers) | "
        + " | ".join(f"{out[m]['server_cpu_ms_per_dispatch']:g}" for m in modes)
        + " |"
    )
    lines.append(
        "| dispatches/s (closed loop) | "
        + " | ".join(f"{out[m]['dispatches_per_s']:g}" for m in modes)
        + " |"
    )
    if "three" in out and "failover_s" in out["three"]:
        f = out["three"]["failover_s"]
        cells = ["-" if m != "three" else "" for m in modes]
        cells[modes.index("three")] = f"p50 {f['p50']} s, p99 {f['p99']} s, max {f['max']} s"
        lines.append(f"| failover ({f['n']} kills) | " + " | ".join(cells) + " |")
    both = [
        rate
        for rate in rates
        if all(out[m]["sweep"][rate]["keeps_up"] for m in modes if rate in out[m]["sweep"])
    ]
    lines.append(f"\nhighest rate both keep up with: {both[-1] if both else 'none'}/s")
    lines.append(f"load average before / after: {out['load_before']} / {out['load_after']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--rates", default="100,250,500", help="the open-loop sweep: dispatches/s, comma-separated"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    p.add_argument("--workers", type=int, default=30, help="workers (cap 8 each)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--kills", type=int, default=20, help="failover rounds (0: none)")
    p.add_argument("--ttl", type=float, default=1.0, help="[cluster] lease_ttl_s")
    p.add_argument("--modes", default="single,three", help="which modes to run")
    p.add_argument("--profile", type=Path, help="run each server under cProfile into this dir")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    global PROFILE_DIR
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR = args.profile.resolve()
    result = run_driver(lambda: run(args), None)  # every child killed on any exit
    if result is None:
        return 130
    print(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
