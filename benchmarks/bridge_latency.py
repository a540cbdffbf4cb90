"""Bridge latency: upstream job request -> worker assignment, through the bridge
and direct, in the same run.

The upstream is the LiveKit double (tests/livekit/lk_double.py: the LiveKit
server's `AgentHandler.JobRequest` -> `Worker.AssignJob` path, affinity wait
set to 0), served from this process. trunkline runs with `[livekit] bridge =
true` pointed at it, so it registers there as a worker of pool `bench`: by
default in this process too (`build_app` on the same event loop: the figure
is then trunkline's own work per hop), with `--child` as a child process
(`trunkline serve`: on a loaded machine every hop then also waits for the
child to be scheduled, which is the machine's latency, not trunkline's).
Two minimal protocol workers run in this process: one connected to
trunkline (behind the bridge), one connected straight to the double (agent
name `direct`), as a LiveKit worker is today. Both accept every offer at
once and report success on assignment.

Each sample is one upstream job request, one at a time, alternating bridged
and direct so the machine's drift lands on both: latency = the moment the
double starts the request -> the moment the worker has the `JobAssignment`
(both `time.monotonic()` in this process). Through the bridge each of the
three legs (offer down, answer up, assignment down) takes an extra hop
through trunkline, plus trunkline's placement. The figure is the added p50 (bridged -
direct); target <= 1 ms on loopback.

    .venv/bin/python benchmarks/bridge_latency.py               # 2,000 of each
    .venv/bin/python benchmarks/bridge_latency.py --jobs 200    # quick
    .venv/bin/python benchmarks/bridge_latency.py --child       # trunkline serve
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import aiohttp
from _common import (
    DEV_KEY,
    DEV_SECRET,
    POOL,
    ROOT,
    CpuMeter,
    ServerUnderTest,
    agent_token,
    machine_info,
    percentile,
    run_driver,
    verdict,
)
from livekit.protocol import agent, models

sys.path.insert(0, str(ROOT / "tests"))
from livekit.lk_double import LiveKitDouble

UP_KEY, UP_SECRET = "upstream-key", "upstream-secret-0123456789abcdef0123"
DIRECT = "direct"
TARGET_ADDED_P50_MS = 1.0


class BridgedServer(ServerUnderTest):
    """trunkline with the bridge on, registered upstream for pool `bench`."""

    def __init__(self, upstream_ws: str) -> None:
        super().__init__(max_jobs_per_worker=4)
        self.upstream_ws = upstream_ws

    def config_text(self) -> str:
        return super().config_text() + (
            "\n[livekit]\n"
            f'url = "{self.upstream_ws}"\n'
            f'api_key = "{UP_KEY}"\n'
            f'api_secret = "{UP_SECRET}"\n'
            "bridge = true\n"
            f'bridge_agent_names = ["{POOL}"]\n'
        )


class InProcessServer:
    """The same trunkline config served by `build_app` on this event loop."""

    def __init__(self, upstream_ws: str) -> None:
        self.cfg = BridgedServer(upstream_ws)
        self.runner: Any = None

    @property
    def ws_url(self) -> str:
        return self.cfg.ws_url

    async def start(self) -> None:
        import logging
        import tomllib

        from aiohttp import web

        from trunkline.config import parse_config
        from trunkline.server.app import build_app

        logging.getLogger("trunkline").setLevel(logging.WARNING)
        app = build_app(parse_config(tomllib.loads(self.cfg.config_text())))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.cfg.port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Worker:
    """A protocol worker: accepts every offer, reports success on assignment,
    and notes when each assignment arrived."""

    def __init__(self, url: str, agent_name: str, token: str) -> None:
        self.url, self.agent_name, self.token = url, agent_name, token
        self.assigned: dict[str, asyncio.Future[float]] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    def expect(self, job_id: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.assigned[job_id] = fut
        return fut

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._ws = await http.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}"}
        )
        reg = agent.RegisterWorkerRequest(type=agent.JT_ROOM, agent_name=self.agent_name)
        await self._ws.send_bytes(agent.WorkerMessage(register=reg).SerializeToString())
        self._task = asyncio.get_running_loop().create_task(self._read())
        await asyncio.wait_for(self.registered.wait(), 10)

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            sm = agent.ServerMessage.FromString(msg.data)
            which = sm.WhichOneof("message")
            if which == "register":
                self.registered.set()
            elif which == "availability":
                job_id = sm.availability.job.id
                resp = agent.AvailabilityResponse(
                    job_id=job_id, available=True, participant_identity=f"agent-{job_id}"
                )
                await ws.send_bytes(agent.WorkerMessage(availability=resp).SerializeToString())
            elif which == "assignment":
                t = time.monotonic()
                job_id = sm.assignment.job.id
                fut = self.assigned.pop(job_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(t)
                done = agent.UpdateJobStatus(job_id=job_id, status=agent.JobStatus.JS_SUCCESS)
                await ws.send_bytes(agent.WorkerMessage(update_job=done).SerializeToString())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _one(
    double: LiveKitDouble, worker: Worker, agent_name: str, n: int
) -> tuple[float, float]:
    """One upstream job request: its request -> assignment time, and the CPU
    time this process spent meanwhile (both in ms)."""
    job = agent.Job(
        id=f"AJ_{agent_name}_{n}",
        type=agent.JT_ROOM,
        room=models.Room(name=f"room-{n}", sid=f"RM_{n}"),
        agent_name=agent_name,
    )
    arrived = worker.expect(job.id)
    c0 = time.process_time()
    t0 = time.monotonic()
    res = await double.job_request(job)
    if res.outcome != "running":
        raise RuntimeError(f"job {job.id}: {res.outcome} {res.error}")
    t1 = await asyncio.wait_for(arrived, 5)
    return (t1 - t0) * 1000.0, (time.process_time() - c0) * 1000.0


def _summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "n": len(s),
        "min_ms": round(s[0], 3),
        "p10_ms": round(percentile(s, 10), 3),
        "p50_ms": round(percentile(s, 50), 3),
        "p99_ms": round(percentile(s, 99), 3),
        "max_ms": round(s[-1], 3),
        "mean_ms": round(sum(s) / len(s), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    double = LiveKitDouble(UP_KEY, UP_SECRET, affinity_wait_s=0.0)
    await double.start()
    child = BridgedServer(double.ws_url) if args.child else None
    local = None if child is not None else InProcessServer(double.ws_url)
    if child is not None:
        child.start()
    else:
        assert local is not None
        await local.start()
    server: BridgedServer | InProcessServer = child or local  # type: ignore[assignment]
    async with aiohttp.ClientSession() as http:
        bridged = Worker(server.ws_url, POOL, agent_token(DEV_KEY, DEV_SECRET))
        direct = Worker(double.ws_url + "/agent", DIRECT, agent_token(UP_KEY, UP_SECRET))
        await bridged.start(http)
        await direct.start(http)
        deadline = time.monotonic() + 20
        while not any(
            w.agent_name == POOL and w.status == agent.WorkerStatus.WS_AVAILABLE and w.load < 0.7
            for w in double.workers.values()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge did not report itself available upstream")
            await asyncio.sleep(0.05)  # ok-sleep: polling for the bridge's report
        for i in range(args.warmup):
            await _one(double, bridged, POOL, -1 - i)
            await _one(double, direct, DIRECT, -1 - i)
        through: list[tuple[float, float]] = []
        straight: list[tuple[float, float]] = []
        cpu = CpuMeter({"trunkline": child.pid} if child is not None else {})
        cpu.start()
        t_start = time.monotonic()
        for i in range(args.jobs):
            if i % 2:  # alternate which goes first
                straight.append(await _one(double, direct, DIRECT, i))
                through.append(await _one(double, bridged, POOL, i))
            else:
                through.append(await _one(double, bridged, POOL, i))
                straight.append(await _one(double, direct, DIRECT, i))
        elapsed = time.monotonic() - t_start
        cpu_use = cpu.stop()
        await bridged.close()
        await direct.close()
    if local is not None:
        await local.close()
    await double.close()
    b, d = _summary([w for w, _ in through]), _summary([w for w, _ in straight])
    b_cpu, d_cpu = _summary([c for _, c in through]), _summary([c for _, c in straight])
    added_p50 = round(b["p50_ms"] - d["p50_ms"], 3)
    added_p99 = round(b["p99_ms"] - d["p99_ms"], 3)
    return {
        "machine": machine_info(),
        "jobs_each": args.jobs,
        "trunkline": "child process" if child is not None else "in process",
        "elapsed_s": round(elapsed, 2),
        "through_bridge": b,
        "direct": d,
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "added_p10_ms": round(b["p10_ms"] - d["p10_ms"], 3),
        "cpu_through_bridge": b_cpu,
        "cpu_direct": d_cpu,
        "added_cpu_p50_ms": round(b_cpu["p50_ms"] - d_cpu["p50_ms"], 3),
        "cpu": cpu_use,
        "cpu_line": cpu.line(),
        "ok": added_p50 <= TARGET_ADDED_P50_MS,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000, help="upstream requests of each kind")
    p.add_argument("--warmup", type=int, default=100, help="unmeasured requests of each kind")
    p.add_argument("--child", action="store_true", help="trunkline as a child process")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    out = run_driver(lambda: run(args), args.json)
    if out is None:
        return 130
    print(out["machine"])
    print(
        f"{out['jobs_each']} upstream requests of each kind, one at a time, alternating; "
        f"trunkline {out['trunkline']}"
    )
    for name, key in (("through the bridge", "through_bridge"), ("direct to a worker", "direct")):
        s = out[key]
        print(
            f"  {name:20} p10 {s['p10_ms']:.3f} ms  p50 {s['p50_ms']:.3f} ms  "
            f"p99 {s['p99_ms']:.3f} ms  "
            f"mean {s['mean_ms']:.3f} ms  max {s['max_ms']:.3f} ms"
        )
    added = (
        f"p10 {out['added_p10_ms']:+.3f} ms  p50 {out['added_p50_ms']:+.3f} ms  "
        f"p99 {out['added_p99_ms']:+.3f} ms"
    )
    print(f"  added by the bridge  {added}")
    if out["trunkline"] == "in process":
        b, d = out["cpu_through_bridge"], out["cpu_direct"]
        print(
            f"  CPU of this process per request: through the bridge p50 {b['p50_ms']:.3f} ms, "
            f"direct p50 {d['p50_ms']:.3f} ms, added {out['added_cpu_p50_ms']:+.3f} ms"
        )
    print(f"  {out['cpu_line']}")
    print(verdict(out["ok"], f"bridge adds <= {TARGET_ADDED_P50_MS:g} ms at p50"))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
