"""The SIP edge inside `trunkline serve`, on the real scheduler, driven by sipp.

A real server process with a `[sip]` trunk, one real livekit-agents worker
whose pool caps it at 4 concurrent jobs, sipp bursting 13 INVITEs as the
caller and a second sipp answering as the downstream media gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sip.test_sipp import SIPP, free_udp_port, sipp_burst, stat_column
from support import KEY, SECRET, ServerProcess, child_env, stop_process, wait_until

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.compat,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]

AGENT = Path(__file__).parents[1] / "compat" / "lk_agent.py"
MAX_WAIT = 0.5


async def test_burst_of_13_through_trunkline_serve(tmp_path: Path) -> None:
    """13 INVITEs against one worker capped at 4: 4 answered 200 through the downstream,
    9 refused 503 with Retry-After within max_wait + 100 ms, no retransmission, one job
    per call, and every slot is free again afterwards."""
    sip_port, uas_port = free_udp_port(), free_udp_port()
    server = ServerProcess(
        tmp_path,
        f"""
[pools.support]
max_jobs_per_worker = 4

[sip]
host = "127.0.0.1"
port = {sip_port}
tcp = false

[sip.trunks.main]
numbers = ["+1555*"]
pool = "support"
max_wait_s = {MAX_WAIT}
downstream = "127.0.0.1:{uas_port}"
retry_after_s = 3
""",
    )
    server.start()
    events = tmp_path / "events.jsonl"
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(  # noqa: ASYNC220 - started once, before the loop is busy
            [sys.executable, str(AGENT), "start"],
            env=child_env(
                LIVEKIT_URL=server.ws_url,
                LIVEKIT_API_KEY=KEY,
                LIVEKIT_API_SECRET=SECRET,
                TL_AGENT_NAME="support",
                TL_EVENTS=str(events),
                TL_NO_LOAD_GUARD="1",
                TL_IDLE="4",
                TL_HOLD_S="60",  # a call holds its agent until the caller hangs up
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        async def registered() -> bool:
            data = await server.get("/v1/workers")
            return len(data["workers"]) == 1

        await wait_until(registered, 60, what="the worker registers")
        (uac_rc, uac_out), (uas_rc, uas_out) = await sipp_burst(
            sip_port, uas_port, tmp_path, calls=13, answers=4
        )
        assert uac_rc == 0, uac_out[-3000:]
        assert uas_rc == 0, uas_out[-3000:]
        assert stat_column(tmp_path, "uac_burst", "Retransmissions(C)") == 0
        assert stat_column(tmp_path, "uac_burst", "FailedCall(C)") == 0
        assert stat_column(tmp_path, "uac_burst", "SuccessfulCall(C)") == 13

        async def all_ended() -> list[dict[str, Any]] | None:
            data = await server.get("/v1/jobs?agent_name=support&limit=100")
            jobs: list[dict[str, Any]] = data["jobs"]
            return jobs if len(jobs) == 13 and all(j["ended"] for j in jobs) else None

        jobs = await wait_until(all_ended, 30, what="all 13 call jobs end")
        by_state: dict[str, list[dict[str, Any]]] = {}
        for j in jobs:
            by_state.setdefault(j["state"], []).append(j)
        refused = by_state.get("no_capacity", [])
        assert len(refused) == 9, {k: len(v) for k, v in by_state.items()}
        assert all(j["queue_wait_s"] <= MAX_WAIT + 0.1 for j in refused)
        # The 4 placed calls ended when the caller hung up: the job was terminated.
        placed = [j for j in jobs if j["state"] != "no_capacity"]
        assert len(placed) == 4
        assert all(j["state"] == "cancelled" for j in placed), [j["reason"] for j in placed]
        full = await server.get(f"/v1/jobs/{placed[0]['job_id']}")
        assert "sip_call_ended" in [ev["event"] for ev in full["trace"]]
        metadata = json.loads(full["metadata"])
        assert isinstance(metadata, dict)
        pools = await server.get("/v1/pools")
        (pool,) = [p for p in pools["pools"] if p["agent_name"] == "support"]

        async def slots_free() -> bool:
            pools = await server.get("/v1/pools")
            (pool,) = [p for p in pools["pools"] if p["agent_name"] == "support"]
            return bool(pool["slots_used"] == 0 and pool["active_jobs"] == 0)

        await wait_until(slots_free, 20, what="every slot is free again")
        assert pool["queued"] == 0
        # /metrics says the same: 13 INVITEs, 13 x 100 Trying, 9 refusals with 503.
        sip = await _sip_metrics(server.url)
        assert sip[("trunkline_sip_events_total", "invites")] == 13
        assert sip[("trunkline_sip_responses_total", "100")] == 13
        assert sip[("trunkline_sip_responses_total", "503")] >= 9  # + any resend before ACK
        assert sip[("trunkline_sip_events_total", "refused")] == 9
    finally:
        stop_process(worker, 15)
        server.stop()


async def _sip_metrics(url: str) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("trunkline_sip_"):
                label = sample.labels.get("event") or sample.labels.get("code") or ""
                out[(sample.name, label)] = sample.value
    return out
