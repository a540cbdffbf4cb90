"""SIP calls through LiveKit SIP, bound by the bridge: trunkline bridged to the
LiveKit double for `participant` jobs, the dispatch rule naming the agent, every
participant_joined webhook lost and the poll too slow to matter; the upstream's
AvailabilityRequest for the call's SIP participant binds the held job (and is
answered terminate=true, so no second agent starts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from livekit.lk_sip_standin import Rule
from livekit.protocol import agent, agent_dispatch
from livekit.test_sip_livekit import Rig, _bound, running_rig
from sip.test_sipp import SIPP
from support import wait_until

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.compat,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rules = [
        Rule(
            numbers=("+1555",),
            room_prefix="call",
            agents=(agent_dispatch.RoomAgentDispatch(agent_name="support"),),
        )
    ]
    extra = 'bridge = true\nbridge_job_types = { support = ["participant"] }\n'
    with running_rig(tmp_path_factory.mktemp("lksipb"), rules, livekit=extra, poll_s=30) as r:
        double = r.dt.double
        r.dt.run(lambda: double.webhooks.drop.add("participant_joined"))  # type: ignore[union-attr]
        yield r


async def test_the_bridge_offer_for_the_sip_participant_binds_the_call(
    rig: Rig, tmp_path: Path
) -> None:
    """The LiveKit server's JT_PARTICIPANT offer carrying trunkline.job binds the held job
    to the call's room: one agent answers the call, the upstream job ends `terminated`."""
    double = rig.dt.double

    def registered() -> bool:
        regs = rig.dt.run(lambda: {(w.agent_name, w.job_type) for w in double.workers.values()})
        return ("support", agent.JT_PARTICIPANT) in regs

    await wait_until(registered, 30, what="the bridge registers upstream")
    outcomes = await rig.call(tmp_path, "+15550100")
    assert outcomes == {"200": 1}
    (job,) = await rig.jobs(1)
    assert "seen by bridge" in _bound(job)
    call = rig.dt.run(lambda: rig.standin.calls[job["sip"]["call_id"]])
    assert job["room"] == call.room
    results = rig.dt.run(lambda: [r for r in double.results if r.job.room.name == call.room])
    assert [(r.job.type, r.outcome) for r in results] == [(agent.JT_PARTICIPANT, "terminated")]
    assert results[0].job.participant.attributes["trunkline.job"] == job["job_id"]
    assert rig.dt.run(lambda: len(rig.standin.joins.get(call.room, []))) == 1
    data = await rig.server.get(f"/v1/jobs?room={quote(call.room)}&limit=10")
    assert len(data["jobs"]) == 1  # the upstream offer became no job of its own
    await rig.slots_free()
