"""`POST /v1/livekit/webhook`: LiveKit's signed webhooks in, as the double's
sender signs them; a bad signature is refused 401; an agent leaving (after
the grace) or its room finishing ends the job with that reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf.json_format import MessageToJson
from livekit.lk_thread import UP_KEY, UP_SECRET
from livekit.lk_webhooks import WebhookSender, sign
from livekit.protocol import models, webhook
from protoworker import ProtoWorker
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.config import parse_config
from trunkline.server.app import build_app

AGENT = models.ParticipantInfo.Kind.AGENT


class Rig:
    def __init__(self, ts: TestServer) -> None:
        self.url = str(ts.make_url("")).rstrip("/")
        self.hook = self.url + "/v1/livekit/webhook"
        self.headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}

    async def dispatch(self, room: str) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                self.url + "/v1/dispatches",
                json={"agent_name": "bot", "room": room},
                headers=self.headers,
            ) as r,
        ):
            body: dict[str, Any] = await r.json()
            return str(body["job_id"])

    async def job(self, job_id: str) -> dict[str, Any] | None:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers) as r,
        ):
            data: dict[str, Any] = await r.json()
            return data if data.get("ended") else None


@pytest.fixture
async def rig() -> AsyncIterator[Callable[[], Awaitable[Rig]]]:
    servers: list[TestServer] = []

    async def make() -> Rig:
        cfg = {
            "keys": {KEY: SECRET},
            "livekit": {
                "url": "ws://127.0.0.1:1", "api_key": UP_KEY, "api_secret": UP_SECRET,
                "webhook_grace_s": 0.2,
            },
            "pools": {"bot": {"max_jobs_per_worker": 1, "terminate_timeout_s": 0.5}},
        }  # fmt: skip
        ts = TestServer(build_app(parse_config(cfg)), host="127.0.0.1")
        await ts.start_server()
        servers.append(ts)
        return Rig(ts)

    yield make
    for ts in servers:
        await ts.close()


def _event(name: str, room: str, identity: str = "", kind: int = AGENT) -> webhook.WebhookEvent:
    ev = webhook.WebhookEvent(event=name, room=models.Room(name=room, sid="RM_1"))
    if identity:
        ev.participant.CopyFrom(models.ParticipantInfo(identity=identity, kind=kind))
    return ev


async def test_bad_signature_is_refused_401(rig: Callable[[], Awaitable[Rig]]) -> None:
    """A webhook signed with another secret, or whose body was changed, gets 401."""
    r = await rig()
    body = MessageToJson(_event("room_finished", "x"))
    async with aiohttp.ClientSession() as s:
        bad = sign(body, UP_KEY, "another-secret-0123456789abcdef0123456")
        async with s.post(r.hook, data=body, headers={"Authorization": bad}) as resp:
            assert resp.status == 401
        good = sign(body, UP_KEY, UP_SECRET)
        tampered = body.replace('"x"', '"y"')
        async with s.post(r.hook, data=tampered, headers={"Authorization": good}) as resp:
            assert resp.status == 401
        async with s.post(r.hook, data=body, headers={"Authorization": good}) as resp:
            assert resp.status == 200


async def test_agent_left_ends_a_silent_workers_job(rig: Callable[[], Awaitable[Rig]]) -> None:
    """A worker that never reports status (like Node @livekit/agents): its job ends
    after participant_left of its agent and the grace, and its slot is freed."""
    r = await rig()
    w = ProtoWorker(r.url, "bot", auto="accept")  # never reports job status
    await w.connect()
    job_id = await r.dispatch("room-left")
    await w.next_assignment()
    sender = WebhookSender(r.hook, UP_KEY, UP_SECRET)
    try:
        sender.notify(_event("participant_left", "room-left", f"agent-{job_id}"))
        job = await wait_until(lambda: r.job(job_id), 10, what="the job ends")
        assert job["state"] == "cancelled"
        assert f"agent participant agent-{job_id} left room room-left" in job["reason"]
        assert await w.next_termination() == job_id
        assert sender.sent == [("participant_left", 200)]
        # The slot is free again: a new job is offered to the same worker.
        await r.dispatch("room-next")
        await w.next_assignment()
    finally:
        await sender.close()
        await w.close()


async def test_agent_left_ends_a_job_adopted_after_a_restart(
    rig: Callable[[], Awaitable[Rig]],
) -> None:
    """A job adopted after a restart has no room here (a migrate names only
    ids): participant_left of its default identity `agent-<job id>`, in
    whatever room, still ends it after the grace (the reason names that
    identity, not the one that left just before)."""
    r = await rig()
    w = ProtoWorker(r.url, "bot")  # never reports job status
    await w.connect()
    await w.migrate("AJ_before_restart")
    await w.barrier()
    job = await wait_until(lambda: _live(r, "AJ_before_restart"), 10, what="adopted")
    assert job["room"] == ""
    assert job["state"] == "running"
    sender = WebhookSender(r.hook, UP_KEY, UP_SECRET)
    try:
        sender.notify(_event("participant_left", "room-x", "agent-AJ_other"))
        sender.notify(_event("participant_left", "room-x", "agent-AJ_before_restart"))
        ended = await wait_until(lambda: r.job("AJ_before_restart"), 10, what="the job ends")
        assert ended["state"] == "cancelled"
        assert "agent participant agent-AJ_before_restart left room room-x" in ended["reason"]
        assert await w.next_termination() == "AJ_before_restart"
        assert sender.sent == [("participant_left", 200)] * 2
    finally:
        await sender.close()
        await w.close()


async def _live(r: Rig, job_id: str) -> dict[str, Any] | None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{r.url}/v1/jobs/{job_id}", headers=r.headers) as resp,
    ):
        if resp.status != 200:
            return None
        data: dict[str, Any] = await resp.json()
        return data


async def test_room_finished_ends_its_jobs(rig: Callable[[], Awaitable[Rig]]) -> None:
    """room_finished ends the room's live jobs at once, naming the room."""
    r = await rig()
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True, auto_end=True)
    await w.connect()
    job_id = await r.dispatch("room-done")
    await w.next_assignment()
    sender = WebhookSender(r.hook, UP_KEY, UP_SECRET)
    try:
        sender.notify(_event("room_finished", "room-done"))
        job = await wait_until(lambda: r.job(job_id), 10, what="the job ends")
        assert job["state"] == "cancelled"
        assert "room room-done finished" in job["reason"]
    finally:
        await sender.close()
        await w.close()
