"""Three real trunkline servers on one real redis-server: an Idempotency-Key
claimed at the owner, the owner killed -9, the retry at a survivor gets the
same job, placed once; and a 201 is sent only once the job is recorded."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp
from cluster.redisserver import RedisServer
from cluster.servers import POOL, owner_of, signal_server
from protoworker import ProtoWorker
from support import ServerProcess, wait_until

from trunkline.cluster import create_coordinator


async def keyed(srv: ServerProcess, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /v1/dispatches with an Idempotency-Key: (status, JSON), or (0, {}) if unreachable."""
    headers = {**srv.headers(), "Idempotency-Key": key}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(srv.url + "/v1/dispatches", json=body, headers=headers) as r,
        ):
            got: dict[str, Any] = await r.json()
            got["_replayed"] = r.headers.get("Idempotent-Replayed")
            return r.status, got
    except aiohttp.ClientError:
        return 0, {}


async def test_retry_after_the_owner_died_gets_the_same_job(
    servers: list[ServerProcess], redis: RedisServer
) -> None:
    """Key claimed at the owner, owner kill -9 right after its 201: the retry at a survivor
    gets the same job id (carried over, not a second job), placed once, on one worker."""
    owner, epoch = await owner_of(servers)
    body = {"agent_name": POOL, "room": "call-7", "metadata": "m", "max_wait_s": 60}
    status, first = await keyed(owner, "order-7", body)
    assert status == 201, first
    job_id = first["job_id"]
    assert first["state"] == "queued"
    store = create_coordinator(redis.url, namespace="t", timeout_s=2.0)
    try:
        # The 201 waited for the fenced record: it is there at once.
        assert job_id in await store.records(POOL)
        status, same = await keyed(owner, "order-7", body)  # a retry at the owner itself
        assert (status, same["job_id"], same["_replayed"]) == (201, job_id, "true")
        signal_server(owner, signal.SIGKILL)
        survivors = [s for s in servers if s is not owner]
        await owner_of(survivors, above=epoch)

        async def retried() -> dict[str, Any] | None:
            # 503 while the pool is between owners or being carried over: retry.
            status, got = await keyed(survivors[0], "order-7", body)
            return got if status == 201 else None

        again = await wait_until(retried, 30.0, interval=0.2, what="the retry answered 201")
        assert again["job_id"] == job_id
        assert again["_replayed"] == "true"
        assert again["state"] == "queued"
        other = dict(body, room="call-8")
        status, err = await keyed(survivors[1], "order-7", other)  # forwarded if not the owner
        assert status == 422, err
        assert err["code"] == "idempotency_key_reused"
        assert "room" in err["message"]
        w = ProtoWorker.autonomous(survivors[1].url, POOL, max_jobs=4)
        await w.connect()
        try:
            await wait_until(lambda: job_id in w.active, 15.0, what="the job placed")
            status, running = await keyed(survivors[1], "order-7", body)
            assert (status, running["job_id"]) == (201, job_id)
            await w.succeed(job_id)
            await w.barrier()
            assert w.offers == [job_id]  # one job for the key, offered once
        finally:
            await w.close()
    finally:
        await store.close()
