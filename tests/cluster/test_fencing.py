"""Three real trunkline servers on one real redis-server: an owner paused past
its lease sends nothing on its stale authority."""

from __future__ import annotations

import signal

import aiohttp
from cluster.servers import POOL, TTL_S, dispatch, owner_of, signal_server
from protoworker import ProtoWorker
from support import ServerProcess, wait_until


async def test_paused_owner_sends_nothing_on_stale_authority(
    servers: list[ServerProcess],
) -> None:
    """An owner SIGSTOPped past its lease, then resumed, sends no offer: its frames are fenced."""
    owner, epoch = await owner_of(servers)
    w = ProtoWorker(owner.url, POOL, max_jobs=1)
    await w.connect()
    try:
        status, _ = await dispatch(owner)
        assert status == 201
        job = await w.take_job()
        status, queued = await dispatch(owner)  # waits: the worker is full
        assert status == 201, queued
        assert queued["state"] == "queued", queued
        signal_server(owner, signal.SIGSTOP)
        rest = [s for s in servers if s is not owner]
        _, new_epoch = await owner_of(rest, within=TTL_S * 5, above=epoch)
        assert new_epoch > epoch
        # Sent while it is paused, read first when it resumes: the freed slot
        # makes the stale owner offer the queued job at once.
        await w.succeed(job)
        signal_server(owner, signal.SIGCONT)

        async def fenced() -> bool:
            async with aiohttp.ClientSession() as s, s.get(owner.url + "/metrics") as r:
                text = await r.text()
            name = "trunkline_cluster_frames_fenced"
            line = next(x for x in text.splitlines() if x.startswith(name))
            return float(line.split()[-1]) >= 1

        await wait_until(fenced, 10.0, what="the stale owner's offer fenced")
        # Having lost the pool it lets its worker go, to reconnect to the owner.
        await w.wait_closed()
        assert w.offers == [job], w.offers  # nothing after the pause
        assert w.pending("availability") == 0
    finally:
        await w.close()
