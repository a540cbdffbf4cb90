"""The room binder in one process: the SIP edge of `build_app` with a trunk to
LiveKit SIP (a UDP endpoint plays LiveKit SIP, another the caller), a protocol
test worker, the LiveKit double on the same loop, signed webhooks posted by hand.
Pins the edges the sipp tests do not: who may bind, binding once, the caller
hanging up while the slot is held, the poll finding a room whose webhook is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.lk_double import LiveKitDouble
from livekit.lk_thread import UP_KEY, UP_SECRET
from livekit.lk_webhooks import sign
from livekit.protocol import agent, models, webhook
from protoworker import ProtoWorker
from sip.sipkit import UdpEndpoint, invite, request_like
from sip.test_sipp import free_udp_port
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.config import parse_config
from trunkline.core import Job, JobState
from trunkline.server.app import build_app
from trunkline.server.keys import DISPATCHER
from trunkline.sip.message import SipRequest, SipResponse

SIP = models.ParticipantInfo.Kind.SIP
STANDARD = models.ParticipantInfo.Kind.STANDARD


class Rig:
    def __init__(
        self, ts: TestServer, edge_port: int, caller: UdpEndpoint, lk: UdpEndpoint
    ) -> None:
        self.url = str(ts.make_url("")).rstrip("/")
        self.edge_port = edge_port
        self.caller = caller
        self.lk = lk  # plays LiveKit SIP
        self.headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        self.dispatcher = ts.app[DISPATCHER]

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=self.headers) as r:
            return await r.json()

    async def webhook(self, room: str, identity: str, kind: int, attrs: dict[str, str]) -> None:
        """Post a signed participant_joined and wait for its answer."""
        ev = webhook.WebhookEvent(event="participant_joined", room=models.Room(name=room))
        p = models.ParticipantInfo(identity=identity, kind=kind)  # type: ignore[arg-type]
        p.attributes.update(attrs)
        ev.participant.CopyFrom(p)
        body = MessageToJson(ev)
        headers = {"Authorization": sign(body, UP_KEY, UP_SECRET)}
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.url + "/v1/livekit/webhook", data=body, headers=headers) as r,
        ):
            assert r.status == 200

    async def forwarded_invite(self, call_id: str) -> SipRequest:
        """The caller INVITEs; what LiveKit SIP receives from the edge."""
        self.caller.send(
            invite(call_id=call_id, host="127.0.0.1", port=self.caller.port), self.edge_port
        )
        msg = await self.lk.recv_where(lambda m: isinstance(m, SipRequest) and m.method == "INVITE")
        assert isinstance(msg, SipRequest)
        return msg

    def answer(self, req: SipRequest, status: int, reason: str) -> None:
        """LiveKit SIP answers `req` (to the edge)."""
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {v}" for v in req.headers.get_all("Via")]
        lines += [
            f"From: {req.headers.get('From')}",
            f"To: {req.headers.get('To')};tag=lk1",
            f"Call-ID: {req.headers.get('Call-ID')}",
            f"CSeq: {req.headers.get('CSeq')}",
            "Content-Length: 0",
        ]
        self.lk.send(("\r\n".join(lines) + "\r\n\r\n").encode(), self.edge_port)

    async def caller_final(self) -> SipResponse:
        msg = await self.caller.recv_where(
            lambda m: (
                isinstance(m, SipResponse)
                and m.status >= 200
                and "INVITE" in (m.headers.get("CSeq") or "")
            ),
            within=10,
        )
        assert isinstance(msg, SipResponse)
        return msg

    async def pool(self) -> dict[str, Any]:
        pools = await self.get("/v1/pools")
        (pool,) = [p for p in pools["pools"] if p["agent_name"] == "support"]
        return dict(pool)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    double = LiveKitDouble(UP_KEY, UP_SECRET)
    await double.start()
    caller, lk = await UdpEndpoint.open(), await UdpEndpoint.open()
    edge_port = free_udp_port()
    cfg = {
        "keys": {KEY: SECRET},
        "livekit": {"url": double.ws_url, "api_key": UP_KEY, "api_secret": UP_SECRET},
        "pools": {"support": {"max_jobs_per_worker": 1}},
        "sip": {
            "host": "127.0.0.1", "port": edge_port, "tcp": False, "livekit_poll_s": 0.2,
            "trunks": {"main": {
                "numbers": ["+1555*"], "pool": "support", "max_wait_s": 0,
                "downstream": f"127.0.0.1:{lk.port}", "downstream_kind": "livekit",
                "room_bind_timeout_s": 5, "allowed_addresses": ["127.0.0.1"],
            }},
        },
    }  # fmt: skip
    ts = TestServer(build_app(parse_config(cfg)), host="127.0.0.1")
    await ts.start_server()
    r = Rig(ts, edge_port, caller, lk)
    r.double = double  # type: ignore[attr-defined]
    try:
        yield r
    finally:
        await ts.close()
        caller.close()
        lk.close()
        await double.close()


async def test_only_a_sip_participant_binds_the_held_job_and_only_once(rig: Rig) -> None:
    """A standard participant claiming the job id binds nothing; the SIP participant
    binds it to its room; a repeated webhook sends no second offer."""
    w = ProtoWorker(rig.url, "support")
    await w.connect()
    fwd = await rig.forwarded_invite("bind-1@127.0.0.1")
    job_id = fwd.headers.get("X-Trunkline-Job")
    assert job_id
    assert (await rig.pool())["slots_used"] == 1  # held from admission
    await rig.webhook("call_x", "intruder", STANDARD, {"trunkline.job": job_id})
    await w.barrier()
    assert w.offers == []
    attrs = {"trunkline.job": job_id, "sip.callIDFull": "bind-1@127.0.0.1"}
    await rig.webhook("call_1", "sip_alice", SIP, attrs)
    await rig.webhook("call_1", "sip_alice", SIP, attrs)
    offer = await w.next_offer()
    assert (offer.id, offer.room.name) == (job_id, "call_1")
    await w.accept(job_id)
    assignment = await w.next("assignment")
    claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(assignment.assignment.token)
    assert claims.video.room == "call_1"
    await w.barrier()
    assert w.offers == [job_id]
    job = await rig.get(f"/v1/jobs/{job_id}")
    bound = [ev["detail"] for ev in job["trace"] if ev["event"] == "bound"]
    assert bound == ["room call_1 (SIP participant sip_alice, seen by webhook)"]
    assert job["sip"]["call_id"] == "bind-1@127.0.0.1"
    await w.close()


async def test_the_caller_hanging_up_while_held_frees_the_slot(rig: Rig) -> None:
    """CANCEL before the room appears: relayed to LiveKit SIP, its 487 reaches the
    caller, the held job ends cancelled and the slot is free; no offer is ever sent."""
    w = ProtoWorker(rig.url, "support")
    await w.connect()
    fwd = await rig.forwarded_invite("cancel-1@127.0.0.1")
    rig.answer(fwd, 180, "Ringing")
    await rig.caller.recv_where(lambda m: isinstance(m, SipResponse) and m.status == 180)
    rig.caller.send(
        request_like(
            "CANCEL", call_id="cancel-1@127.0.0.1", port=rig.caller.port, host="127.0.0.1"
        ),
        rig.edge_port,
    )
    cancel = await rig.lk.recv_where(lambda m: isinstance(m, SipRequest) and m.method == "CANCEL")
    assert isinstance(cancel, SipRequest)
    rig.answer(cancel, 200, "OK")
    rig.answer(fwd, 487, "Request Terminated")
    assert (await rig.caller_final()).status == 487

    async def freed() -> bool:
        return (await rig.pool())["slots_used"] == 0

    await wait_until(freed, 10, what="the held slot is freed")
    job = await rig.get(f"/v1/jobs/{fwd.headers.get('X-Trunkline-Job')}")
    assert job["state"] == "cancelled"
    await w.barrier()
    assert w.offers == []
    await w.close()


async def test_the_poll_finds_a_room_whose_webhook_never_came(rig: Rig) -> None:
    """No webhook at all: the room-service poll of the double finds the SIP participant
    (by its sip.callIDFull alone) and the job is offered in its room."""
    w = ProtoWorker(rig.url, "support")
    await w.connect()
    fwd = await rig.forwarded_invite("poll-1@127.0.0.1")
    double: LiveKitDouble = rig.double  # type: ignore[attr-defined]
    double.join("call_poll", "sip_bob", kind=SIP, attributes={"sip.callIDFull": "poll-1@127.0.0.1"})
    offer = await w.next_offer(within=10)
    assert (offer.id, offer.room.name) == (fwd.headers.get("X-Trunkline-Job"), "call_poll")
    job = await rig.get(f"/v1/jobs/{offer.id}")
    assert any("seen by poll" in (ev["detail"] or "") for ev in job["trace"])
    await w.close()


class _Link:
    """A BridgeLink that records nothing (the offers below never reach a worker)."""

    def job_accepted(self, job: Job) -> None: ...

    def job_running(self, job: Job) -> None: ...

    def job_ended(self, job: Job) -> None: ...


def _upstream(room: str, job_type: int, kind: int, attrs: dict[str, str]) -> agent.Job:
    pb = agent.Job(id=f"AJ_up_{job_type}_{kind}", type=job_type, agent_name="support")  # type: ignore[arg-type]
    pb.room.name = room
    if job_type == agent.JobType.JT_PARTICIPANT:
        pb.participant.identity = "sip_carol" if kind == SIP else "supervisor"
        pb.participant.kind = kind  # type: ignore[assignment]
        pb.participant.attributes.update(attrs)
    return pb


async def test_upstream_offers_for_the_call_are_claimed(rig: Rig) -> None:
    """The upstream's participant offer for the call's SIP participant binds the held job
    and is declined (terminate); a room job for that room is declined as a second agent;
    another participant's job in the room is left to the usual rules."""
    w = ProtoWorker(rig.url, "support")
    await w.connect()
    fwd = await rig.forwarded_invite("claim-1@127.0.0.1")
    job_id = fwd.headers.get("X-Trunkline-Job") or ""
    d = rig.dispatcher
    attrs = {"trunkline.job": job_id}
    sip_offer = _upstream("call_c", agent.JobType.JT_PARTICIPANT, SIP, attrs)
    declined = d.request_bridged(sip_offer, _Link(), 0.0)
    assert declined.state is JobState.REJECTED
    assert f"held job {job_id} was bound to room call_c" in declined.reason
    offer = await w.next_offer()
    assert (offer.id, offer.room.name) == (job_id, "call_c")
    again = d.request_bridged(sip_offer, _Link(), 0.0)
    assert "is bound to room call_c already" in again.reason
    room_job = d.request_bridged(_upstream("call_c", agent.JobType.JT_ROOM, 0, {}), _Link(), 0.0)
    assert room_job.state is JobState.REJECTED
    assert "has its agent" in room_job.reason
    other = _upstream("call_c", agent.JobType.JT_PARTICIPANT, STANDARD, {})
    assert d.request_bridged(other, _Link(), 0.0).state is JobState.NO_CAPACITY  # cap 1, held
    await w.barrier()
    assert w.offers == [job_id]
    await w.close()
