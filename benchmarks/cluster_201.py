"""What a cluster-mode 201 pays for waiting on the job's fenced record.

Theory of operation: starts a redis-server (tests/cluster/redisserver.py) and
two single-member clusters on it in this process (two namespaces, each member
owning its own pool): "wait" is the server as shipped (the 201 goes out once
`ClusterFence.recorded` resolved), "nowait" the same app with the
`answer_after_record` middleware taken out (the record written in the
background, as before). No worker is connected, so each job is queued and
recorded, nothing else. Blocks of `--n` sequential `POST /v1/dispatches`
alternate between the two (`--rounds` blocks each), so drift on a shared
machine hits both alike; it prints p50/p99 per mode, their difference, one
bare `write_fenced` round trip for reference, and the load average.

    .venv/bin/python benchmarks/cluster_201.py             # ~20 s
    .venv/bin/python benchmarks/cluster_201.py --n 200 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[1]

from _common import redis_server_class  # noqa: E402

from trunkline.auth import admin_token  # noqa: E402
from trunkline.cluster import create_coordinator  # noqa: E402
from trunkline.config import parse_config  # noqa: E402
from trunkline.server.app import build_app  # noqa: E402
from trunkline.server.idempotent import answer_after_record  # noqa: E402

RedisServer = redis_server_class()
KEY, SECRET = "bench", "benchmark-secret-0123456789abcdef0123"


async def member(redis_url: str, ns: str, *, wait: bool) -> TestServer:
    config = parse_config(
        {
            "keys": {KEY: SECRET},
            "store": {"backend": "memory"},
            "cluster": {"redis_url": redis_url, "namespace": ns, "member": ns},
            "pools": {"p": {"queue_max_wait_s": 600, "max_queued": 1_000_000}},
            "server": {"max_queued": 1_000_000},
        }
    )
    app = build_app(config)
    if not wait:
        app.middlewares.remove(answer_after_record)
    ts = TestServer(app, host="127.0.0.1")
    await ts.start_server()
    return ts


async def owned(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        async with session.post(url, json={"agent_name": "p"}, headers=headers) as r:
            if r.status == 201:
                return
        await asyncio.sleep(0.05)  # waiting for the lease (setup, not measured)
    raise TimeoutError("pool not owned within 20 s")


async def block(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int
) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url, json={"agent_name": "p"}, headers=headers) as r:
            await r.read()
            assert r.status == 201, r.status
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(n: int, rounds: int) -> None:
    load0 = os.getloadavg()
    with RedisServer() as redis:
        servers = {
            "wait": await member(redis.url, "wait", wait=True),
            "nowait": await member(redis.url, "nowait", wait=False),
        }
        headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        got: dict[str, list[float]] = {k: [] for k in servers}
        async with aiohttp.ClientSession() as session:
            urls = {k: str(ts.make_url("/v1/dispatches")) for k, ts in servers.items()}
            for url in urls.values():
                await owned(session, url, headers)
            for _ in range(rounds):
                for mode in ("wait", "nowait"):
                    got[mode] += await block(session, urls[mode], headers, n)
        coord = create_coordinator(redis.url, namespace="bare", timeout_s=1.0)
        epoch = await coord.acquire("q", "m", 60_000)
        assert epoch is not None
        rtt = []
        for i in range(n):
            t0 = time.perf_counter()
            await coord.write_fenced("q", "m", epoch, {f"j{i}": "{}"})
            rtt.append((time.perf_counter() - t0) * 1000)
        await coord.close()
        for ts in servers.values():
            await ts.close()
    load1 = os.getloadavg()
    for mode, xs in got.items():
        print(
            f"{mode:7s} n={len(xs)} p50 {statistics.median(xs):.3f} ms  p99 {pct(xs, 0.99):.3f} ms"
        )
    d50 = statistics.median(got["wait"]) - statistics.median(got["nowait"])
    d99 = pct(got["wait"], 0.99) - pct(got["nowait"], 0.99)
    print(f"added by waiting for the record: p50 {d50:+.3f} ms, p99 {d99:+.3f} ms")
    print(f"bare write_fenced round trip: p50 {statistics.median(rtt):.3f} ms")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="requests per block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per mode")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
