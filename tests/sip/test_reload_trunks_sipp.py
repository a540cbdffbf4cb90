"""`[sip]` trunks reloaded live, with real SIP traffic from sipp against a real
`trunkline serve` process and protocol workers (issue 14).

Trunk `alpha` (+1555*, callers from 127.0.0.2) has a call up; a reload with one
bad trunk value changes nothing; a good reload removes `alpha`, adds `beta`
(+1666*, callers from 127.0.0.3, its own downstream) and moves `sip.port`: the
call on `alpha` goes on to its end (both hops still reach the edge), a new call
to `alpha`'s number is refused 404 like any unknown number, `beta` places
calls, and the port change is listed as needing a restart (the old port keeps
serving).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from protoworker import ProtoWorker
from sip.test_sipp import SCENARIOS, SIPP, free_udp_port, run_sipp, stat_column
from support import KEY, SECRET, ServerProcess, wait_until

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]

ALPHA = """
[sip.trunks.alpha]
numbers = ["+1555*"]
pool = "support"
max_wait_s = 2.0
allowed_addresses = ["127.0.0.2"]
downstream = "127.0.0.1:{uas_a}"
"""
BETA = """
[sip.trunks.beta]
numbers = ["+1666*"]
pool = "sales"
max_wait_s = 2.0
allowed_addresses = ["127.0.0.3"]
downstream = "127.0.0.1:{uas_b}"
refusal = {refusal}
"""


def write(server: ServerProcess, sip_port: int, trunks: str) -> None:
    """The server's config file: the same [server]/[keys] as at start, two pools,
    `[sip]` on `sip_port` and the given trunk tables."""
    server.config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {server.port}\n[keys]\n{KEY} = "{SECRET}"\n'
        '[store]\nbackend = "memory"\n'
        "[pools.support]\nmax_jobs_per_worker = 4\n[pools.sales]\nmax_jobs_per_worker = 4\n"
        f'[sip]\nhost = "127.0.0.1"\nport = {sip_port}\ntcp = false\n' + trunks
    )


def info_for(call_id: str, uas_port: int) -> None:
    """Send the downstream sipp (uas_hold.xml) the INFO that ends its held call."""
    msg = (
        f"INFO sip:uas@127.0.0.1:{uas_port} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKtest-signal\r\n"
        "From: <sip:test@127.0.0.1>;tag=signal\r\n"
        "To: <sip:uas@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), ("127.0.0.1", uas_port))


async def one_call(
    sip_port: int, number: str, scenario: Path, cwd: Path, local_ip: str
) -> tuple[int, str]:
    """One sipp call from `local_ip` to `number` with `scenario` (stats in `cwd`)."""
    return await run_sipp(
        f"127.0.0.1:{sip_port}",
        "-sf", str(scenario), "-s", number, "-m", "1",
        "-trace_stat", "-fd", "1", "-trace_err",
        cwd=cwd, local_ip=local_ip,
    )  # fmt: skip


async def test_reload_swaps_trunks_and_keeps_calls_in_progress(tmp_path: Path) -> None:
    """A call on trunk alpha survives the reload that removes alpha and ends normally
    (caller BYE after a downstream INFO, both relayed); a bad trunk value changes nothing
    and names sip.trunks.beta.refusal; afterwards alpha's number gets 404, beta's caller
    is placed on pool sales through beta's downstream, and sip.port needs a restart."""
    sip_port, new_port = free_udp_port(), free_udp_port()
    uas_a, uas_b = free_udp_port(), free_udp_port()
    server = ServerProcess(tmp_path)
    write(server, sip_port, ALPHA.format(uas_a=uas_a))
    server.start()
    workers = [
        ProtoWorker(server.url, pool, max_jobs=4, auto="accept", auto_run=True)
        for pool in ("support", "sales")
    ]
    held_dir, uas_dir = tmp_path / "held", tmp_path / "uas_a"
    for d in (held_dir, uas_dir):
        d.mkdir()
    try:
        for w in workers:
            await w.connect()
        uas = asyncio.ensure_future(
            run_sipp("-sf", str(SCENARIOS / "uas_hold.xml"), "-p", str(uas_a), "-m", "1",
                     cwd=uas_dir)
        )  # fmt: skip
        held = asyncio.ensure_future(
            one_call(sip_port, "+15550100", SCENARIOS / "uac_hold.xml", held_dir, "127.0.0.2")
        )

        async def running_call() -> dict[str, Any] | None:
            jobs = (await server.get("/v1/jobs?agent_name=support"))["jobs"]
            live = [j for j in jobs if j["state"] == "running"]
            return live[0] if live else None

        job = await wait_until(running_call, 30, what="the call on alpha runs")
        job = await server.get(f"/v1/jobs/{job['job_id']}")
        assert job["sip"]["trunk"] == "alpha"

        # One bad trunk value among good changes: 400 naming it, nothing applied.
        write(server, new_port, BETA.format(uas_b=uas_b, refusal=999))
        status, body = await server.post("/v1/config/reload", {})
        assert status == 400, body
        assert "sip.trunks.beta.refusal" in body["message"], body
        forbidden = (SCENARIOS / "uac_forbidden.xml").read_text()
        beta_dir = tmp_path / "beta_before"
        beta_dir.mkdir()
        rc, out = await one_call(
            sip_port, "+16660100", SCENARIOS / "uac_forbidden.xml", beta_dir, "127.0.0.3"
        )
        assert rc == 0, out[-3000:]  # 127.0.0.3 is still nobody's caller: 403
        assert not held.done()
        assert not uas.done()

        # The good reload: alpha out, beta in, the SIP port moved (not live).
        write(server, new_port, BETA.format(uas_b=uas_b, refusal=503))
        status, body = await server.post("/v1/config/reload", {})
        assert status == 200, body
        assert (
            "sip.trunks: 1 added ['beta'], 1 removed ['alpha'], 0 changed []" in (body["changed"])
        ), body
        assert body["restart_needed"] == ["sip.port"], body
        assert (await server.get(f"/v1/jobs/{job['job_id']}"))["state"] == "running"
        assert not held.done()

        # alpha's number from beta's (admitted) caller: refused as an unknown number.
        not_found = tmp_path / "uac_not_found.xml"
        not_found.write_text(forbidden.replace('response="403"', 'response="404"'))
        gone_dir = tmp_path / "alpha_after"
        gone_dir.mkdir()
        rc, out = await one_call(sip_port, "+15550100", not_found, gone_dir, "127.0.0.3")
        assert rc == 0, out[-3000:]
        assert stat_column(gone_dir, "uac_not_found", "SuccessfulCall(C)") == 1

        # beta takes calls, through its own downstream, on pool sales.
        beta_ok, uas_b_dir = tmp_path / "beta_after", tmp_path / "uas_b"
        beta_ok.mkdir()
        uas_b_dir.mkdir()
        uas2 = asyncio.ensure_future(
            run_sipp("-sf", str(SCENARIOS / "uas_answer.xml"), "-p", str(uas_b), "-m", "1",
                     cwd=uas_b_dir)
        )  # fmt: skip
        rc, out = await one_call(
            sip_port, "+16660100", SCENARIOS / "uac_burst.xml", beta_ok, "127.0.0.3"
        )
        assert rc == 0, out[-3000:]
        assert stat_column(beta_ok, "uac_burst", "SuccessfulCall(C)") == 1
        rc, out = await asyncio.wait_for(uas2, 35)
        assert rc == 0, out[-3000:]
        sales = (await server.get("/v1/jobs?agent_name=sales"))["jobs"]
        assert [j["sip"]["trunk"] for j in sales] == ["beta"]

        # Now end the call on the removed trunk: it ends as any call does.
        assert (await server.get(f"/v1/jobs/{job['job_id']}"))["state"] == "running"
        info_for(job["sip"]["call_id"], uas_a)
        rc, out = await asyncio.wait_for(held, 35)
        assert rc == 0, out[-3000:]
        assert stat_column(held_dir, "uac_hold", "SuccessfulCall(C)") == 1
        rc, out = await asyncio.wait_for(uas, 35)
        assert rc == 0, out[-3000:]

        async def ended() -> dict[str, Any] | None:
            j: dict[str, Any] = await server.get(f"/v1/jobs/{job['job_id']}")
            return j if j["ended"] else None

        final = await wait_until(ended, 20, what="the held call's job ends")
        assert final["state"] == "cancelled", final
        trace = {ev["event"]: ev for ev in final["trace"]}
        assert "caller_bye" in str(trace["sip_call_ended"]), final["trace"]
    finally:
        for w in workers:
            await w.close()
        server.stop()
