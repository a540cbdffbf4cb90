"""Three real trunkline servers on one real redis-server: pool ownership,
refusals at non-owners, take-over after kill -9, a paused owner sending
nothing on stale authority (Redis trouble: test_redis_trouble.py)."""

from __future__ import annotations

import signal
import time

import aiohttp
from cluster.servers import POOL, TTL_S, dispatch, owner_of, signal_server, view
from support import ServerProcess, wait_until


async def test_one_owner_the_others_forward_to_it(servers: list[ServerProcess]) -> None:
    """One member owns the pool; the others forward its requests there, once (never twice)."""
    owner, epoch = await owner_of(servers)
    assert epoch >= 1

    async def all_members() -> bool:
        v = await view(owner)
        return {m["member"] for m in v["members"]} == {"s0", "s1", "s2"}

    await wait_until(all_members, 5.0, what="three members listed")
    for srv in servers:
        status, body = await dispatch(srv)
        assert status == 201, body
        held = await owner.get(f"/v1/jobs/{body['job_id']}")  # the owner has every job
        assert held["state"] == "queued"
        if srv is not owner:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    srv.url + "/v1/dispatches",
                    json={"agent_name": POOL},
                    headers={**srv.headers(), "X-Trunkline-Forwarded": "1"},
                ) as r,
            ):
                refused = await r.json()
                assert r.status == 503, refused
            assert refused["code"] == "not_pool_owner"
            assert refused["owner_url"] == owner.url


async def test_kill_9_of_the_owner_hands_the_pool_to_a_survivor(
    servers: list[ServerProcess],
) -> None:
    """After kill -9 of the owner a survivor owns the pool at a greater epoch within ~a lease."""
    owner, epoch = await owner_of(servers)
    signal_server(owner, signal.SIGKILL)
    t0 = time.monotonic()
    rest = [s for s in servers if s is not owner]
    new, new_epoch = await owner_of(rest, above=epoch)
    took = time.monotonic() - t0
    assert new_epoch > epoch
    assert took < TTL_S + 2.0, took
    status, body = await dispatch(new)
    assert status == 201, body
