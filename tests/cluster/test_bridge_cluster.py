"""The LiveKit bridge in cluster mode: three real members on a real
redis-server bridged to an upstream (a fourth trunkline server plays the
LiveKit server, as in tests/livekit/test_bridge_trunkline.py). Only the pool's
owner registers upstream, so every upstream offer reaches the member whose
scheduler places it; the owner killed, the next one registers."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cluster.redisserver import RedisServer
from cluster.servers import POOL, cluster_toml, owner_of, signal_server
from protoworker import ProtoWorker
from support import KEY, SECRET, ServerProcess, wait_until

from trunkline.config import parse_config


@pytest.fixture
async def bridged(
    tmp_path: Path, redis: RedisServer
) -> AsyncIterator[tuple[ServerProcess, list[ServerProcess]]]:
    """The upstream and three members bridged to it."""
    (tmp_path / "up").mkdir()
    up = ServerProcess(
        tmp_path / "up",
        '[store]\nbackend = "memory"\n'
        f'[livekit]\nurl = "wss://media.example"\napi_key = "{KEY}"\napi_secret = "{SECRET}"\n'
        f"[pools.{POOL}]\nmax_jobs_per_worker = 4\n",
    )
    up.start(timeout=60.0)
    members: list[ServerProcess] = []
    for i in range(3):
        d = tmp_path / f"s{i}"
        d.mkdir()
        while True:  # ports are picked before anyone binds: never one twice
            extra = (
                f'[livekit]\nurl = "{up.url}"\napi_key = "{KEY}"\napi_secret = "{SECRET}"\n'
                "bridge = true\n"
            )
            srv = ServerProcess(d, cluster_toml(redis.url, f"s{i}", extra))
            if srv.port not in {m.port for m in members} | {up.port}:
                break
        members.append(srv)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda srv: srv.start(timeout=60.0), members))
    try:
        yield up, members
    finally:
        for srv in members:
            srv.stop()
        up.stop()


async def bridge_workers(up: ServerProcess) -> list[dict[str, Any]]:
    """The bridges registered at the upstream for the pool."""
    data = await up.get("/v1/workers")
    return [w for w in data["workers"] if w["agent_name"] == POOL]


async def one_bridge(up: ServerProcess) -> None:
    async def exactly_one() -> bool:
        return len(await bridge_workers(up)) == 1

    await wait_until(exactly_one, 20, what="exactly one member registered upstream")


async def run_one(up: ServerProcess, w: ProtoWorker) -> str:
    """A dispatch at the upstream, run by `w` behind the cluster: its job id."""
    status, body = await up.post("/v1/dispatches", {"agent_name": POOL, "max_wait_s": 10})
    assert status == 201, body
    job_id = str(body["job_id"])
    await wait_until(lambda: job_id in w.active, 15, what="the bridged job runs on the worker")

    async def running_upstream() -> bool:
        job: dict[str, Any] = await up.get(f"/v1/jobs/{job_id}")
        return bool(job["state"] == "running")

    await wait_until(running_upstream, 10, what="the upstream sees it running")
    return job_id


async def test_only_the_owner_bridges_and_the_next_owner_takes_over_after_kill_9(
    bridged: tuple[ServerProcess, list[ServerProcess]],
) -> None:
    """One member (the pool's owner) registers upstream; an upstream dispatch runs on a
    worker connected to another member; the owner killed -9: exactly one survivor
    registers upstream, the running job migrates to it and its end reaches the
    upstream, and the next dispatch runs there."""
    up, members = bridged
    owner, epoch = await owner_of(members)
    await one_bridge(up)
    others = [m for m in members if m is not owner]
    worker = ProtoWorker.autonomous(others[0].url, POOL, max_jobs=2)
    await worker.connect()  # piped to the owner
    try:
        first = await run_one(up, worker)
        assert worker.offers == [first]
        signal_server(owner, signal.SIGKILL)
        assert owner.proc is not None
        owner.proc.wait(10)
        await worker.wait_closed()  # its pipe went with the owner
    finally:
        await worker.close()
    new_owner, _ = await owner_of(others, above=epoch, within=20)
    await one_bridge(up)
    again = ProtoWorker.autonomous(others[1].url, POOL, max_jobs=2)
    await again.connect()
    try:
        await again.migrate(first)  # as a worker that reconnected does

        async def adopted() -> bool:
            job: dict[str, Any] = await new_owner.get(f"/v1/jobs/{first}")
            return bool(job["state"] == "running")

        await wait_until(adopted, 15, what="the running job adopted by the new owner")
        await again.succeed(first)

        async def succeeded_upstream() -> bool:
            job: dict[str, Any] = await up.get(f"/v1/jobs/{first}")
            return bool(job["state"] == "succeeded")

        await wait_until(succeeded_upstream, 15, what="its end reported upstream")
        second = await run_one(up, again)
        assert second != first
        assert again.offers == [second]
        assert len(await bridge_workers(up)) == 1
    finally:
        await again.close()


def test_cluster_with_the_bridge_is_accepted() -> None:
    """[cluster] with [livekit] bridge = true parses (only a pool's owner bridges it)."""
    cfg = parse_config(
        {
            "keys": {KEY: SECRET},
            "cluster": {"redis_url": "redis://r"},
            "livekit": {"url": "ws://lk", "api_key": KEY, "api_secret": SECRET, "bridge": True},
            "pools": {POOL: {}},
        }
    )
    assert cfg.cluster is not None
    assert cfg.livekit is not None
    assert cfg.livekit.bridge is not None
