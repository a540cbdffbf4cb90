"""SIP calls through LiveKit SIP: sipp caller -> trunkline's edge (`downstream_kind =
"livekit"`) -> the LiveKit SIP stand-in (lk_sip_standin.py), which rings, makes
the call's room and SIP participant in the LiveKit double (X-Trunkline-Job mapped to
the `trunkline.job` attribute by the trunk's headers_to_attributes) and answers once
an agent is in the room; a real livekit-agents 1.8.9 worker behind trunkline, capped
at 4. The double's webhooks go to trunkline.

One double, stand-in, server and worker for the module; each test leaves every slot
free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.lk_sip_standin import LkSipStandin, Rule, Trunk
from livekit.lk_thread import UP_KEY, UP_SECRET, DoubleThread
from livekit.lk_webhooks import WebhookSender
from sip.test_sipp import SIPP, free_udp_port, run_sipp
from support import KEY, SECRET, ServerProcess, child_env, peak_level, stop_process, wait_until

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.compat,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]

AGENT = Path(__file__).with_name("lk_sip_agent.py")
SCENARIO = Path(__file__).parent / "scenarios" / "uac_lk.xml"
BIND_TIMEOUT_S = 2.0


class Rig:
    def __init__(
        self, dt: DoubleThread, standin: LkSipStandin, server: ServerProcess, edge_port: int
    ) -> None:
        self.dt = dt
        self.standin = standin
        self.server = server
        self.edge_port = edge_port
        self.events = server.config.parent / "events.jsonl"

    def agent_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    async def call(self, tmp: Path, number: str, calls: int = 1) -> dict[str, int]:
        """Run sipp as the caller (`calls` INVITEs at 100/s to `number`); the
        count of each final the caller got, from its log."""
        rc, out = await run_sipp(
            f"127.0.0.1:{self.edge_port}",
            "-sf", str(SCENARIO), "-s", number, "-m", str(calls), "-r", "100",
            "-trace_logs", "-trace_err",
            cwd=tmp,
        )  # fmt: skip
        assert rc == 0, out[-3000:]
        return _outcomes(tmp)

    async def jobs(self, count: int) -> list[dict[str, Any]]:
        """The `count` newest jobs once all have ended, with their traces."""

        async def ended() -> list[dict[str, Any]] | None:
            data = await self.server.get(f"/v1/jobs?agent_name=support&limit={count}")
            jobs: list[dict[str, Any]] = data["jobs"]
            if len(jobs) < count or not all(j["ended"] for j in jobs):
                return None
            return [await self.server.get(f"/v1/jobs/{j['job_id']}") for j in jobs]

        found: list[dict[str, Any]] = await wait_until(ended, 60, what=f"{count} jobs end")
        return found

    async def slots_free(self) -> None:
        async def free() -> bool:
            pools = await self.server.get("/v1/pools")
            (pool,) = [p for p in pools["pools"] if p["agent_name"] == "support"]
            return bool(pool["slots_used"] == 0 and pool["active_jobs"] == 0)

        await wait_until(free, 30, what="every slot is free again")


@contextlib.contextmanager
def running_rig(
    tmp: Path, rules: list[Rule], *, livekit: str = "", poll_s: float = 0.5
) -> Iterator[Rig]:
    """The double, the stand-in (`rules`), trunkline (extra `[livekit]` keys
    `livekit`) and one worker, torn down after."""
    dt = DoubleThread()
    trunk = Trunk(
        allowed_addresses=("127.0.0.1",),
        headers_to_attributes={"X-Trunkline-Job": "trunkline.job"},
    )
    standin = dt.run(lambda: LkSipStandin(dt.double, trunk, rules))
    lk_port, join_url = asyncio.run_coroutine_threadsafe(standin.start(), dt.loop).result(10)
    edge_port = free_udp_port()
    server = ServerProcess(
        tmp,
        f"""
[livekit]
url = "{dt.ws_url}"
api_key = "{UP_KEY}"
api_secret = "{UP_SECRET}"
{livekit}
[pools.support]
max_jobs_per_worker = 4

[sip]
host = "127.0.0.1"
port = {edge_port}
tcp = false
livekit_poll_s = {poll_s}

[sip.trunks.main]
numbers = ["+1555*", "+1666*"]
pool = "support"
max_wait_s = 0
downstream = "127.0.0.1:{lk_port}"
downstream_kind = "livekit"
room_bind_timeout_s = {BIND_TIMEOUT_S}
retry_after_s = 3
allowed_addresses = ["127.0.0.1"]
""",
    )
    hook = server.url + "/v1/livekit/webhook"
    dt.run(lambda: setattr(dt.double, "webhooks", WebhookSender(hook, UP_KEY, UP_SECRET)))
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped: the per-test data directory (conftest) is not set yet.
        mp.setenv("XDG_STATE_HOME", str(tmp / "state"))
        server.start()
    r = Rig(dt, standin, server, edge_port)
    worker: subprocess.Popen[bytes] | None = None
    try:
        with (tmp / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, str(AGENT), "start"],
                env=child_env(
                    LIVEKIT_URL=server.ws_url,
                    LIVEKIT_API_KEY=KEY,
                    LIVEKIT_API_SECRET=SECRET,
                    TL_AGENT_NAME="support",
                    TL_EVENTS=str(r.events),
                    TL_JOIN_URL=join_url,
                    TL_IDLE="4",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(AGENT.parent),
            )

        async def registered() -> bool:
            data = await server.get("/v1/workers")
            return len(data["workers"]) == 1

        asyncio.run(wait_until(registered, 60, what="the worker registers"))
        yield r
    finally:
        if worker is not None:
            stop_process(worker, 15)
        server.stop()
        asyncio.run_coroutine_threadsafe(standin.close(), dt.loop).result(10)
        dt.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rules = [Rule(numbers=("+1555",), kind="individual", room_prefix="call")]  # +1666: none
    with running_rig(tmp_path_factory.mktemp("lksip"), rules) as r:
        yield r


def _outcomes(tmp: Path) -> dict[str, int]:
    """The finals sipp logged (`outcome <status> call <id>` lines), counted."""
    outcomes: dict[str, int] = {}
    for log in tmp.glob("uac_lk_*_logs.log"):
        for status in re.findall(r"outcome (\d+) call", log.read_text()):
            outcomes[status] = outcomes.get(status, 0) + 1
    return outcomes


def _events(job: dict[str, Any]) -> list[str]:
    return [ev["event"] for ev in job["trace"]]


def _bound(job: dict[str, Any]) -> str:
    (detail,) = [ev["detail"] for ev in job["trace"] if ev["event"] == "bound"]
    return str(detail)


async def test_burst_of_13_gets_4_agents_in_their_own_rooms_and_9_refusals(
    rig: Rig, tmp_path: Path
) -> None:
    """13 simultaneous calls, cap 4: 4 answered with one agent each in the room LiveKit SIP
    made for that call (bound by the participant_joined webhook, token minted for that
    room), 9 refused 503 + Retry-After at once (no queueing, the slot held from admission)."""
    outcomes = await rig.call(tmp_path, "+15550100", calls=13)
    assert outcomes == {"200": 4, "503": 9}
    jobs = await rig.jobs(13)
    refused = [j for j in jobs if j["state"] == "no_capacity"]
    served = [j for j in jobs if j["state"] != "no_capacity"]
    assert len(refused) == 9
    assert len(served) == 4
    for j in refused:
        assert j["sip"]["final_status"] == 503
        assert j["queue_wait_s"] == 0
        assert "held" not in _events(j)
    calls = rig.dt.run(lambda: {c.call_id: c for c in rig.standin.calls.values()})
    starts = {e["job_id"]: e for e in rig.agent_events() if e["event"] == "start"}
    rooms = set()
    for j in served:
        call = calls[j["sip"]["call_id"]]
        # The job was bound to the very room LiveKit SIP made for its call, and the
        # SIP participant carried the job id through headers_to_attributes.
        assert j["room"] == call.room
        assert call.attributes["trunkline.job"] == j["job_id"]
        assert call.events[:3] == ["invite", "joined", "answered"]
        assert "seen by webhook" in _bound(j)
        assert call.identity in _bound(j)
        ev = _events(j)
        assert ev.index("held") < ev.index("bound") < ev.index("offered") < ev.index("accepted")
        assert j["sip"]["final_status"] == 200
        assert "sip_call_ended" in ev
        # The agent ran in that room with a token for it from [livekit]'s key.
        start = starts[j["job_id"]]
        assert start["room"] == call.room
        assert start["url"] == rig.dt.ws_url
        claims = api.TokenVerifier(UP_KEY, UP_SECRET).verify(start["token"])
        assert claims.video.room == call.room
        assert claims.kind == "agent"
        # Exactly one agent per call.
        assert rig.dt.run(lambda room=call.room: list(rig.standin.joins.get(room, []))) == [
            claims.identity
        ]
        rooms.add(call.room)
    assert len(rooms) == 4
    changes = [(e["t"], 1) for e in rig.agent_events() if e["event"] == "joined"]
    changes += [(e["t"], -1) for e in rig.agent_events() if e["event"] == "end"]
    assert peak_level(changes) <= 4
    await rig.slots_free()


async def test_a_lost_participant_joined_webhook_is_recovered_by_the_poll(
    rig: Rig, tmp_path: Path
) -> None:
    """With every participant_joined webhook lost, the room-service poll (ListRooms,
    ListParticipants) finds the call's SIP participant and binds the job: answered."""
    double = rig.dt.double
    rig.dt.run(lambda: double.webhooks.drop.add("participant_joined"))  # type: ignore[union-attr]
    try:
        outcomes = await rig.call(tmp_path, "+15550101")
    finally:
        rig.dt.run(lambda: double.webhooks.drop.clear())  # type: ignore[union-attr]
    assert outcomes == {"200": 1}
    (job,) = await rig.jobs(1)
    assert "seen by poll" in _bound(job)
    call = rig.dt.run(lambda: rig.standin.calls[job["sip"]["call_id"]])
    assert job["room"] == call.room
    await rig.slots_free()


async def test_an_unbound_hold_ends_in_480_and_frees_its_slot(rig: Rig, tmp_path: Path) -> None:
    """A call LiveKit SIP finds no dispatch rule for rings once and makes no room: at the trunk's
    room_bind_timeout_s the edge CANCELs the downstream leg, the caller gets 480, the
    slot is free again and no agent ever ran."""
    before = len([e for e in rig.agent_events() if e["event"] == "start"])
    outcomes = await rig.call(tmp_path, "+16660100")
    assert outcomes == {"480": 1}
    (job,) = await rig.jobs(1)
    assert job["state"] == "cancelled"
    assert job["sip"]["final_status"] == 480
    assert "room_bind_timeout" in _events(job)
    assert "offered" not in _events(job)
    held_at = next(ev["at"] for ev in job["trace"] if ev["event"] == "held")
    assert job["ended_at"] - held_at == pytest.approx(BIND_TIMEOUT_S, abs=0.5)
    call = rig.dt.run(lambda: rig.standin.calls[job["sip"]["call_id"]])
    assert call.events[:2] == ["invite", "no_rule"]

    def cancelled() -> bool:
        return "cancel" in rig.dt.run(lambda: list(call.events))

    await wait_until(cancelled, 10, what="the stand-in receives the CANCEL")
    assert len([e for e in rig.agent_events() if e["event"] == "start"]) == before
    await rig.slots_free()
