"""Three real trunkline servers on one real redis-server carrying calls: the
13-call burst with workers spread over the members."""

from __future__ import annotations

from cluster.servers import POOL, dispatch, owner_of
from protoworker import ProtoWorker
from support import ServerProcess, wait_until


async def test_burst_of_13_through_three_members_holds_the_cap(
    servers: list[ServerProcess],
) -> None:
    """13 calls sent round-robin to three members, one cap-4 worker on each: cap held, none lost."""
    owner, _ = await owner_of(servers)
    workers = [ProtoWorker.autonomous(srv.url, POOL, max_jobs=4) for srv in servers]
    for w in workers:
        await w.connect()  # the non-owners pipe theirs to the owner
    try:
        ids = []
        for i in range(13):
            status, body = await dispatch(servers[i % 3])  # non-owners forward to the owner
            assert status == 201, body
            ids.append(body["job_id"])
        assert len(set(ids)) == 13
        await wait_until(lambda: sum(len(w.active) for w in workers) == 12, 10.0, what="12 running")
        for w in workers:
            await w.barrier()
            assert len(w.active) == 4  # the cap, whatever member the worker is connected to
        queued = await owner.get(f"/v1/jobs/{ids[-1]}")
        assert queued["state"] == "queued", queued
        first = next(iter(workers[1].active))
        await workers[1].succeed(first)
        await wait_until(lambda: ids[-1] in workers[1].active, 10.0, what="13th placed")
        for w in workers:
            for job in list(w.active):
                await w.succeed(job)
        offered = [j for w in workers for j in w.offers]
        assert sorted(offered) == sorted(ids)  # each job offered once, to one worker

        async def all_ended() -> bool:
            states = [(await owner.get(f"/v1/jobs/{j}"))["state"] for j in ids]
            return states == ["succeeded"] * 13

        await wait_until(all_ended, 10.0, what="13 succeeded")
        for w in workers:
            assert w.terminated == []
    finally:
        for w in workers:
            await w.close()
