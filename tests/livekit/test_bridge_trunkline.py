"""trunkline bridged to a second trunkline server as its upstream: a check
that the bridge speaks the worker protocol as a server's `/agent` (here
trunkline's own, with its strict frame checks) expects. Dispatches are sent
with livekit-api to the upstream trunkline; they run on the protocol-level
test worker behind the downstream one.

    livekit-api -> upstream trunkline (/agent) -> bridge -> downstream trunkline -> worker
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from livekit import api
from livekit.lk_thread import UP_KEY, UP_SECRET
from protoworker import ProtoWorker
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.config import parse_config
from trunkline.server.app import build_app

MEDIA = "wss://media.example"  # the upstream's [livekit] url: in its assignments


class Pair:
    def __init__(self, up: TestServer, down: TestServer) -> None:
        self.up = str(up.make_url("")).rstrip("/")
        self.down = str(down.make_url("")).rstrip("/")

    async def get(self, base: str, path: str, key: str, secret: str) -> Any:
        headers = {"Authorization": f"Bearer {admin_token(key, secret)}"}
        async with aiohttp.ClientSession() as s, s.get(base + path, headers=headers) as r:
            r.raise_for_status()
            return await r.json()

    async def up_job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await self.get(self.up, f"/v1/jobs/{job_id}", UP_KEY, UP_SECRET)
        return job

    async def down_job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await self.get(self.down, f"/v1/jobs/{job_id}", KEY, SECRET)
        return job

    async def states(self, job_id: str) -> tuple[str, str]:
        return (await self.up_job(job_id))["state"], (await self.down_job(job_id))["state"]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    up_cfg = {
        "keys": {UP_KEY: UP_SECRET},
        "livekit": {"url": MEDIA, "api_key": UP_KEY, "api_secret": UP_SECRET},
        "pools": {"bot": {"max_jobs_per_worker": 4}},
    }
    up = TestServer(build_app(parse_config(up_cfg)), host="127.0.0.1")
    await up.start_server()
    down_cfg = {
        "keys": {KEY: SECRET},
        "livekit": {
            "url": str(up.make_url("")).rstrip("/"), "api_key": UP_KEY, "api_secret": UP_SECRET,
            "bridge": True, "bridge_answer_window_s": 1.0,
        },
        "pools": {"bot": {"max_jobs_per_worker": 1, "queue_max_wait_s": 0}},
    }  # fmt: skip
    down = TestServer(build_app(parse_config(down_cfg)), host="127.0.0.1")
    await down.start_server()
    p = Pair(up, down)

    async def bridge_registered() -> bool:
        data = await p.get(p.up, "/v1/workers", UP_KEY, UP_SECRET)
        return any(w["agent_name"] == "bot" for w in data["workers"])

    await wait_until(bridge_registered, 10, what="the bridge registers with the upstream")
    try:
        yield p
    finally:
        await down.close()
        await up.close()


async def test_a_dispatch_to_the_upstream_trunkline_runs_behind_the_bridge(pair: Pair) -> None:
    """CreateDispatch to the upstream trunkline runs on the downstream's worker
    with the upstream's URL and token; running and success go up, so both
    servers agree on the job's state at each step."""
    w = ProtoWorker(pair.down, "bot")
    await w.connect()
    async with api.LiveKitAPI(pair.up, UP_KEY, UP_SECRET) as lk:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="bot", room="r-1", metadata="m")
        )
    offer = await w.next_offer()
    assert offer.room.name == "r-1"
    assert offer.metadata == "m"
    assert offer.dispatch_id == d.id
    await w.accept(offer.id)
    assigned = (await w.next("assignment")).assignment
    assert assigned.url == MEDIA
    claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(assigned.token)
    assert claims.video.room == "r-1"
    assert claims.identity == f"agent-{offer.id}"  # the worker's accept, relayed up
    assert await pair.states(offer.id) == ("assigned", "assigned")
    await w.running(offer.id)
    await wait_until(lambda: _states_are(pair, offer.id, ("running", "running")))
    await w.succeed(offer.id)
    await wait_until(lambda: _states_are(pair, offer.id, ("succeeded", "succeeded")))
    await w.close()


async def test_refusals_and_termination_cross_both_servers(pair: Pair) -> None:
    """A hard reject behind the bridge ends the upstream job `rejected`;
    while its worker is full the bridge reports WS_FULL and the upstream queues
    the next job, offered through the bridge once the slot frees; DeleteDispatch on the
    upstream terminates the job on the worker behind the bridge."""
    w = ProtoWorker(pair.down, "bot")
    await w.connect()
    async with api.LiveKitAPI(pair.up, UP_KEY, UP_SECRET) as lk:
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="bot", room="r-rej")
        )
        offer = await w.next_offer()
        await w.reject(offer.id)
        await wait_until(lambda: _states_are(pair, offer.id, ("rejected", "rejected")))

        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="bot", room="r-del")
        )
        offer = await w.next_offer()
        await w.accept(offer.id)
        await w.next("assignment")
        await w.running(offer.id)
        await wait_until(lambda: _states_are(pair, offer.id, ("running", "running")))

        # The worker's only slot is taken and the downstream has no queue: the
        # bridge reports WS_FULL, so the upstream queues the next job and
        # offers it nothing.
        await wait_until(lambda: _bridge_state(pair, "full"), 10, what="the bridge reports full")
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="bot", room="r-wait")
        )
        waiting = await _job_in_room(pair, "r-wait")
        assert (await pair.up_job(waiting))["state"] == "queued"

        await lk.agent_dispatch.delete_dispatch(d.id, "r-del")
        assert await w.next_termination() == offer.id
        await w.succeed(offer.id)
        await wait_until(lambda: _ended_both(pair, offer.id))
        # The freed slot takes the waiting job, through the bridge.
        assert (await w.next_offer()).room.name == "r-wait"
    await w.close()


async def _states_are(pair: Pair, job_id: str, want: tuple[str, str]) -> bool:
    return await pair.states(job_id) == want


async def _ended_both(pair: Pair, job_id: str) -> bool:
    return bool((await pair.up_job(job_id))["ended"] and (await pair.down_job(job_id))["ended"])


async def _bridge_state(pair: Pair, state: str) -> bool:
    """The upstream's view of the bridge's connection (a worker to it)."""
    data = await pair.get(pair.up, "/v1/workers", UP_KEY, UP_SECRET)
    return [w["state"] for w in data["workers"]] == [state]


async def _job_in_room(pair: Pair, room: str) -> str:
    async def find() -> str | None:
        data = await pair.get(pair.up, f"/v1/jobs?room={room}", UP_KEY, UP_SECRET)
        jobs = data.get("jobs", [])
        return str(jobs[0]["job_id"]) if jobs else None

    found: str = await wait_until(find, 10, what=f"the upstream's job in {room}")
    return found
