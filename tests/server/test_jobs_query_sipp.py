"""The SIP call's identity on job records, with real sipp traffic: a server
with SQLite history and a `[sip]` trunk, a protocol worker capped at 2, sipp
bursting 5 INVITEs from a caller number and a second sipp answering as the
downstream. Every ended record carries the Call-ID, the From and To numbers,
the trunk and the final response sent upstream, and `trunk=` / `caller=`
find them in the store."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

import pytest
from server.conftest import MakeServer
from sip.test_sipp import SCENARIOS, SIPP, free_udp_port, run_sipp, stat_column
from support import wait_until

from trunkline.stores.sqlite import SqliteHistory

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]

CALLER = "+4930111"
CALLED = "+15550100"


async def test_records_carry_the_sip_call(make_server: MakeServer, tmp_path: Path) -> None:
    """2 calls answered (final 200, then BYE), 3 refused 503 no_capacity: all
    5 records in the store name their call, and the caller / trunk filters
    (and the CSV export's SIP columns) find exactly them."""
    sip_port, uas_port = free_udp_port(), free_udp_port()
    srv = await make_server(
        {
            "server": {"data_dir": str(tmp_path / "data")},
            "pools": {"support": {"max_jobs_per_worker": 2, "queue_max_wait_s": 0.3}},
            "sip": {
                "host": "127.0.0.1",
                "port": sip_port,
                "tcp": False,
                "trunks": {
                    "main": {
                        "numbers": ["+1555*"],
                        "pool": "support",
                        "max_wait_s": 0.3,
                        "downstream": f"127.0.0.1:{uas_port}",
                        "retry_after_s": 2,
                    }
                },
            },
        }
    )
    await srv.connect("support", max_jobs=2, auto="accept", auto_run=True, auto_end=True)
    # The burst caller, calling from CALLER instead of sipp's own name.
    scenario = (SCENARIOS / "uac_burst.xml").read_text()
    (tmp_path / "uac_caller.xml").write_text(
        scenario.replace("From: sipp <sip:sipp@", f"From: sipp <sip:{CALLER}@")
    )
    uas = run_sipp(
        "-sf", str(SCENARIOS / "uas_answer.xml"), "-p", str(uas_port), "-m", "2",
        cwd=tmp_path,
    )  # fmt: skip
    uas_task = asyncio.ensure_future(uas)
    uac_rc, uac_out = await run_sipp(
        f"127.0.0.1:{sip_port}",
        "-sf", str(tmp_path / "uac_caller.xml"),
        "-s", CALLED, "-m", "5", "-r", "100",
        "-trace_stat", "-fd", "1", "-trace_err",
        cwd=tmp_path,
    )  # fmt: skip
    uas_rc, uas_out = await asyncio.wait_for(uas_task, 35)
    assert uac_rc == 0, uac_out[-3000:]
    assert uas_rc == 0, uas_out[-3000:]
    assert stat_column(tmp_path, "uac_caller", "SuccessfulCall(C)") == 5

    d = srv.dispatcher
    await wait_until(
        lambda: d.live_job_count() == 0 and d.history_status().written == 5,
        20,
        what="all 5 call jobs ended and stored",
    )

    async def jobs(query: str) -> list[dict[str, Any]]:
        status, body = await srv.call("GET", "/v1/jobs" + query)
        assert status == 200, body
        found: list[dict[str, Any]] = body["jobs"]
        return found

    by_caller = await jobs(f"?caller=%2B{CALLER[1:]}")
    assert len(by_caller) == 5
    assert sorted(j["state"] for j in by_caller) == ["cancelled"] * 2 + ["no_capacity"] * 3
    for j in by_caller:
        sip = j["sip"]
        assert sip["from"] == CALLER
        assert sip["to"] == CALLED
        assert sip["trunk"] == "main"
        assert sip["call_id"]
        assert sip["final_status"] == (200 if j["state"] == "cancelled" else 503), j
    assert len({j["sip"]["call_id"] for j in by_caller}) == 5
    assert {j["job_id"] for j in await jobs("?trunk=main")} == {j["job_id"] for j in by_caller}
    assert await jobs("?trunk=other") == []
    assert await jobs("?caller=%2B4930999") == []
    refused = await jobs(f"?trunk=main&outcome=no_capacity&caller=%2B{CALLER[1:]}")
    assert len(refused) == 3
    # From the store itself, not the writer's memory: the same identity.
    store = SqliteHistory(tmp_path / "data" / "history.sqlite3")
    await store.open()
    one = await store.get(by_caller[0]["job_id"])
    await store.close()
    assert one is not None
    assert one.sip is not None
    assert (one.sip.from_number, one.sip.trunk) == (CALLER, "main")

    async with srv.session.get(
        srv.url + f"/v1/jobs?format=csv&caller=%2B{CALLER[1:]}", headers=srv.auth
    ) as r:
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert sorted(r["sip_final_status"] for r in rows) == ["200", "200", "503", "503", "503"]
    assert {r["sip_from"] for r in rows} == {CALLER}, "a number is not defused as a formula"
