"""The Kubernetes provider's costs, against the fake API server in a child process.

    .venv/bin/python benchmarks/k8s_provider.py [--pods 1000] [--bursts 50]

Phases (the fake runs in its own process, so its work is not counted here):

1. demand -> pod create request: a trunkline server (in this process) with a
   Kubernetes pool of 1 slot per replica; each dispatch needs a new replica.
   Measured from the job's `created_at` to the create request's arrival at
   the fake (both wall clock, same machine). Target <= 50 ms.
2. steady state: requests the provider sends per minute while its pods just
   run (no demand change), and the provider's memory per pod.
3. 1,000 pods in one pool watched through one stream: the server's memory
   (RSS and Python heap) after listing them and after one status update of
   every pod streamed through the watch. Target <= 20 MB.

Nothing here is a real cluster: the numbers are the provider's own costs
(JSON parsing, bookkeeping, one watch), not a real API server's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the child


async def serve_fake(port_file: Path, pods: int, template: Path) -> None:
    """The fake API server (no kubelet: pods stay as created) plus a control
    port: POST /churn updates every pod's status once, GET /requests lists
    what it was asked."""
    from aiohttp import web
    from providers.k8s.apiserver import FakeApiServer, write_kubeconfig

    from trunkline.providers import Launch
    from trunkline.providers.kubernetes_pods import build_pod, load_template

    async with FakeApiServer(bookmark_interval_s=60) as api:
        api.record_requests = True
        tpl = load_template(template)
        for i in range(pods):
            la = Launch(f"big-{i}", "big", ("agent",), {"LIVEKIT_URL": "ws://x/replica/t"}, f"t{i}")
            pod = build_pod(tpl, la, instance="trunkline", namespace="default", min_grace_s=600)
            pod["spec"]["nodeName"] = "fake-node-1"
            pod["status"] = {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "containerStatuses": [
                    {"name": "agent", "ready": True, "state": {"running": {"startedAt": "x"}}}
                ],
            }
            api.store.create("pods", "default", pod)

        async def churn(_: web.Request) -> web.Response:
            for obj in api.pods():
                new = copy.deepcopy(obj)
                new["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
                api.store.update("pods", "default", new)
            return web.json_response({"version": api.store.version})

        async def requests(_: web.Request) -> web.Response:
            return web.json_response(
                [{"method": r.method, "path": r.path, "at": r.at} for r in api.requests]
            )

        control = web.Application()
        control.router.add_post("/churn", churn)
        control.router.add_get("/requests", requests)
        runner = web.AppRunner(control)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        cport = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kc = write_kubeconfig(port_file.parent / "kubeconfig", api)
        _write_info(port_file, {"kubeconfig": str(kc), "control": cport})
        try:
            await asyncio.Future()
        finally:
            await runner.cleanup()


def _write_info(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


class Child:
    def __init__(self, tmp: Path, pods: int, template: Path) -> None:
        self.info = tmp / "fake.json"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "fake", str(self.info), str(pods), str(template)],
            env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")},
        )
        deadline = time.monotonic() + 60
        while not self.info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fake API server did not start")
            time.sleep(0.05)  # ok-sleep: waiting for the child's file
        data = json.loads(self.info.read_text())
        self.kubeconfig = data["kubeconfig"]
        self.control = f"http://127.0.0.1:{data['control']}"

    async def call(self, method: str, path: str) -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.request(method, self.control + path) as r:
            return await r.json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def write_template(tmp: Path) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  labels: {app: agent}\nspec:\n"
        "  containers:\n  - name: agent\n    image: registry.example/agent:1.0\n"
        "    resources: {requests: {cpu: 500m, memory: 512Mi}, limits: {memory: 1Gi}}\n"
        "    env: [{name: LOG_LEVEL, value: info}]\n"
    )
    return path


# --------------------------------------------------------------- the phases


async def phase_latency(child: Child, template: Path, bursts: int) -> dict[str, Any]:
    from aiohttp.test_utils import TestServer
    from support import KEY, SECRET, free_port

    from trunkline.auth import admin_token
    from trunkline.config import parse_config
    from trunkline.server.app import build_app

    port = free_port()
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "keys": {KEY: SECRET},
            "store": {"backend": "memory"},
            "kubernetes": {"kubeconfig": child.kubeconfig},
            "pools": {
                "lat": {
                    "provider": "kubernetes",
                    "pod_template": str(template),
                    "command": ["agent"],
                    "max_jobs_per_worker": 1,
                    "min_replicas": 0,
                    "max_replicas": bursts + 1,
                    "queue_max_wait_s": 60,
                    "start_timeout_s": 120,
                }
            },
        }
    )
    import aiohttp

    server = TestServer(build_app(config), host="127.0.0.1", port=port)
    await server.start_server()
    headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
    created: list[float] = []
    try:
        async with aiohttp.ClientSession(headers=headers) as s:
            for _ in range(bursts):
                body = {"agent_name": "lat", "metadata": {}}
                async with s.post(f"http://127.0.0.1:{port}/v1/dispatches", json=body) as r:
                    job = await r.json()
                async with s.get(f"http://127.0.0.1:{port}/v1/jobs/{job['job_id']}") as r:
                    created.append((await r.json())["created_at"])
                await asyncio.sleep(0.05)  # one demand step at a time
            await asyncio.sleep(1.0)  # let the last create arrive
            posts = [r["at"] for r in await child.call("GET", "/requests") if r["method"] == "POST"]
            before = len(await child.call("GET", "/requests"))
            t0 = time.monotonic()
            await asyncio.sleep(20)  # steady state: pods run, demand does not change
            window = time.monotonic() - t0
            after = len(await child.call("GET", "/requests"))
    finally:
        await server.close()
    lat = sorted((p - c) * 1000 for p, c in zip(sorted(posts), sorted(created), strict=False))
    return {
        "creates": len(posts),
        "demand_to_create_ms": {
            "p50": round(statistics.median(lat), 2),
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
            "max": round(lat[-1], 2),
        },
        "steady_requests_per_min": round((after - before) * 60 / window, 2),
        "steady_pods": len(posts),
    }


async def phase_watch_memory(child: Child, pods: int, heap: bool) -> dict[str, Any]:
    import kubernetes_asyncio.client  # noqa: F401  (its import cost is not per pod)

    from trunkline.providers.kubernetes import KubernetesProvider, PodPool

    gc.collect()
    rss0 = rss_mb()
    if heap:  # tracemalloc's own bookkeeping inflates RSS: one or the other
        tracemalloc.start()
    heap0 = tracemalloc.get_traced_memory()[0]
    p = KubernetesProvider(
        pools={"big": PodPool(str(write_template(Path(tempfile.mkdtemp()))))},
        kubeconfig=child.kubeconfig,
    )
    t = time.perf_counter()
    listed = await p.list_existing("big")
    list_s = time.perf_counter() - t
    gc.collect()
    rss1, heap1 = rss_mb(), tracemalloc.get_traced_memory()[0]
    version = (await child.call("POST", "/churn"))["version"]
    t = time.perf_counter()
    while p._rv != version:  # noqa: ASYNC110 - the provider has no "caught up" event
        await asyncio.sleep(0.05)
    churn_s = time.perf_counter() - t
    gc.collect()
    rss2, heap2 = rss_mb(), tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1]
    if heap:
        tracemalloc.stop()
    p.detach()
    await p.aclose(1)
    out: dict[str, Any] = {
        "pods": pods,
        "listed": len(listed),
        "list_s": round(list_s, 2),
        "events_s": round(churn_s, 2),
        "stats": dict(p.stats),
    }
    if heap:
        out["heap_kib_per_pod"] = round((heap2 - heap0) / 1024 / pods, 2)
        out["heap_peak_mb"] = round((peak - heap0) / 2**20, 1)
        out["heap_after_list_mb"] = round((heap1 - heap0) / 2**20, 2)
    else:
        out["rss_after_list_mb"] = round(rss1 - rss0, 1)
        out["rss_after_events_mb"] = round(rss2 - rss0, 1)
    return out


async def main(pods: int, bursts: int, heap: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
    template = write_template(tmp)
    (tmp / "lat").mkdir()
    child = Child(tmp / "lat", 0, template)
    try:
        latency = await phase_latency(child, template, bursts)
    finally:
        child.stop()
    (tmp / "big").mkdir()
    big = Child(tmp / "big", pods, template)
    try:
        memory = await phase_watch_memory(big, pods, heap)
    finally:
        big.stop()
    print(json.dumps({"latency": latency, "watch": memory}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fake":
        asyncio.run(serve_fake(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--bursts", type=int, default=50)
    ap.add_argument("--heap", action="store_true", help="Python heap (tracemalloc), not RSS")
    a = ap.parse_args()
    asyncio.run(main(a.pods, a.bursts, a.heap))
