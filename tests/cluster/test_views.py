"""Three real trunkline servers on one real redis-server: reads at any member show
the whole cluster (GET /v1/pools, /v1/workers, /v1/jobs/{id}, the dashboard's
feed), a killed owner's pools show as unreachable then moved, never a 500, a
room-scoped token sees only its room through another member, and what an
operator gets from /metrics when every member is scraped."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from cluster.servers import POOL, dispatch, owner_of, signal_server
from livekit import api
from prometheus_client.parser import text_string_to_metric_families
from protoworker import ProtoWorker
from support import KEY, SECRET, ServerProcess, wait_until

FORWARDED = {"X-Trunkline-Forwarded": "1"}


def scoped(room: str) -> dict[str, str]:
    tok = api.AccessToken(KEY, SECRET).with_grants(api.VideoGrants(room_admin=True, room=room))
    return {"Authorization": f"Bearer {tok.to_jwt()}"}


async def get(
    srv: ServerProcess, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(srv.url + path, headers={**srv.headers(), **(headers or {})}) as r,
    ):
        return r.status, await r.json(content_type=None)


def pool_entry(body: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [p for p in body["pools"] if p["agent_name"] == POOL]
    return entry


async def snapshots(srv: ServerProcess) -> AsyncIterator[dict[str, Any]]:
    """The dashboard feed's `snapshot` events at `srv`, as they come."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(srv.url + "/dashboard/stream", headers=srv.headers()) as r,
    ):
        assert r.status == 200
        event = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "snapshot":
                yield json.loads(line[6:])


async def scrape(srv: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `srv`'s /metrics by (name, sorted labels)."""
    async with aiohttp.ClientSession() as s, s.get(srv.url + "/metrics") as r:
        text = await r.text()
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(text)
        for x in family.samples
    }


def summed(scrapes: list[dict[Any, float]], name: str, **labels: str) -> float:
    """`sum(name{labels})` over every member's scrape."""
    want = set(labels.items())
    return sum(v for sc in scrapes for (n, lab), v in sc.items() if n == name and want <= set(lab))


async def test_reads_at_a_non_owner_show_the_whole_cluster(servers: list[ServerProcess]) -> None:
    """A pool owned by A with workers at A and B: C's /v1/pools, /v1/workers, /v1/jobs/{id}
    (live and ended, and the dashboard's job view) and dashboard feed show them; a
    room-scoped token sees only its room through C; every member scraped, each pool
    gauge is exported once (by the owner)."""
    a, _ = await owner_of(servers)
    b, c = [s for s in servers if s is not a]
    workers = [ProtoWorker.autonomous(srv.url, POOL, max_jobs=4) for srv in (a, b)]
    for w in workers:
        await w.connect()
    try:
        status, job = await dispatch(c)
        assert status == 201, job
        status, mine = await c.post("/v1/dispatches", {"agent_name": POOL, "room": "r1"})
        assert status == 201, mine
        status, theirs = await c.post("/v1/dispatches", {"agent_name": POOL, "room": "r2"})
        assert status == 201, theirs
        await wait_until(lambda: sum(len(w.active) for w in workers) == 3, 10.0, what="3 run")

        # C alone knows nothing of the pool's workers: the merge is what shows them.
        status, own = await get(c, "/v1/pools", FORWARDED)
        assert status == 200, own
        assert pool_entry(own)["workers"] == 0, own
        assert pool_entry(own)["owner"] == a.config.parent.name
        status, body = await get(c, "/v1/pools")
        assert status == 200, body
        entry = pool_entry(body)
        assert entry["owner"] == a.config.parent.name
        assert not entry["owner_unreachable"]
        assert (entry["workers"], entry["slots_used"], entry["active_jobs"]) == (2, 3, 3)
        assert entry["slots_free"] == 5
        assert body["unreachable_members"] == []
        status, listed = await get(c, "/v1/workers")
        assert status == 200
        assert sorted(w["worker_id"] for w in listed["workers"]) == sorted(
            w.worker_id for w in workers
        )
        assert {w["member"] for w in listed["workers"]} == {a.config.parent.name}

        # A job owned by A, found at C: live, then ended.
        status, found = await get(c, f"/v1/jobs/{job['job_id']}")
        assert status == 200, found
        assert found["state"] == "running", found
        holder = next(w for w in workers if job["job_id"] in w.active)
        await holder.succeed(job["job_id"])

        async def ended() -> bool:
            st, got = await get(c, f"/v1/jobs/{job['job_id']}")
            return st == 200 and got["state"] == "succeeded"

        await wait_until(ended, 10.0, what="the ended job found at C")
        status, shown = await get(c, f"/dashboard/jobs/{job['job_id']}")  # the dashboard's view
        assert status == 200, shown
        assert shown["state"] == "succeeded"
        assert "metadata" not in shown
        status, missing = await get(c, "/v1/jobs/AJ_nosuchjob")
        assert status == 404, missing
        assert missing["code"] == "not_found", missing

        # Room scope holds through the merge: r1's token sees r1's job only.
        status, got = await get(c, f"/v1/jobs/{mine['job_id']}", scoped("r1"))
        assert status == 200, got
        assert got["room"] == "r1", got
        status, got = await get(c, f"/v1/jobs/{theirs['job_id']}", scoped("r1"))
        assert status == 404, got
        status, got = await get(c, "/v1/pools", scoped("r1"))
        assert status == 403, got

        # The dashboard at C draws the pool with A's and B's workers.
        async with asyncio.timeout(15.0):
            async for snap in snapshots(c):
                pools = [p for p in snap["pools"] if p["agent_name"] == POOL]
                if pools and pools[0]["workers"] == 2 and len(snap["workers"]) == 2:
                    break
        assert pools[0]["owner"] == a.config.parent.name
        assert {j["job_id"] for j in snap["jobs"]} >= {mine["job_id"], job["job_id"]}
        assert snap["totals"]["requested"] == 3

        # /metrics: scrape every member and sum by pool.
        scrapes = [await scrape(s) for s in servers]
        exporting = [
            s
            for s, sc in zip(servers, scrapes, strict=True)
            if any(n == "trunkline_queue_depth" for n, _ in sc)
        ]
        assert exporting == [a]
        assert summed(scrapes, "trunkline_worker_slots", pool=POOL, state="used") == 2
        assert summed(scrapes, "trunkline_workers", pool=POOL) == 2
        assert summed(scrapes, "trunkline_jobs_requested_total", pool=POOL) == 3
        for sc in scrapes:
            owners = {dict(lab)["member"] for n, lab in sc if n == "trunkline_cluster_pool_owner"}
            assert owners == {a.config.parent.name}
    finally:
        for w in workers:
            await w.close()


async def test_a_killed_owner_shows_unreachable_then_moved_never_a_500(
    servers: list[ServerProcess],
) -> None:
    """After kill -9 of the pool's owner, C's /v1/pools answers 200 throughout: the pool
    marked owner_unreachable while the dead member holds its lease, then owned by a
    survivor; a job only the dead member knew is 503 (it may be there) or 404, never 500."""
    a, epoch = await owner_of(servers)
    b, c = [s for s in servers if s is not a]
    w = ProtoWorker.autonomous(a.url, POOL, max_jobs=4)
    await w.connect()
    status, job = await dispatch(a)
    assert status == 201, job
    await wait_until(lambda: len(w.active) == 1, 10.0, what="the job runs")
    await w.succeed(job["job_id"])
    await w.close()

    async def ended_at_a() -> bool:
        st, got = await get(c, f"/v1/jobs/{job['job_id']}")
        return st == 200 and got["state"] == "succeeded"

    await wait_until(ended_at_a, 10.0, what="the ended job found through C")
    signal_server(a, signal.SIGKILL)
    dead = a.config.parent.name
    seen: list[tuple[str, bool]] = []

    async def moved() -> bool:
        st, body = await get(c, "/v1/pools")
        assert st == 200, body
        entry = pool_entry(body)
        seen.append((entry["owner"], entry["owner_unreachable"]))
        if entry["owner"] == dead:
            assert entry["owner_unreachable"], entry
            assert dead in {m["member"] for m in body["unreachable_members"]}
            return False
        return entry["owner"] in {b.config.parent.name, c.config.parent.name}

    await wait_until(moved, 15.0, what="the pool owned by a survivor")
    assert (dead, True) in seen, seen  # the lease outlives the kill by >= 1 s
    assert not seen[-1][1]
    new, _ = await owner_of([b, c], above=epoch)
    st, body = await get(c, f"/v1/jobs/{job['job_id']}")
    assert st in (404, 503), body  # its history died with it (memory store)
    assert body["code"] in ("not_found", "cluster_unavailable"), body
    assert new in (b, c)
