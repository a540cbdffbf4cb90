"""sipp against the trust boundary: an unlisted caller gets 403, a digest caller gets
through after 407, a wrong password gets 403; listed calls keep working meanwhile.

SIPp 3.6.1 computes MD5 digests only and answers the first challenge it reads, so the
digest trunk here offers ``auth_algorithms = ["MD5"]`` (SHA-256 is covered by the
Python client in test_trust.py and test_digest.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sip.sipkit import PoolBackend
from sip.test_sipp import SCENARIOS, SIPP, free_udp_port, run_sipp, sipp_burst, stat_column

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import parse_sip_config

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]

PASSWORD = "pw-of-the-carrier"


async def start(uas_port: int, **trunk: Any) -> tuple[SipServer, PoolBackend]:
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "tcp": False,
            "trunks": {
                "main": {
                    "numbers": ["+1555*"],
                    "pool": "support",
                    "max_wait_s": 0.5,
                    "downstream": f"127.0.0.1:{uas_port}",
                    **trunk,
                }
            },
        }
    )
    backend = PoolBackend({"support": 4})
    server = SipServer(config, backend)
    backend.server = server
    await server.start()
    return server, backend


async def test_sipp_from_an_unlisted_address_gets_403_and_no_job(tmp_path: Path) -> None:
    """sipp calling from 127.0.0.2 against allowed_addresses = ["127.0.0.1"]: each of its
    5 INVITEs gets 403 (no 100 first) and no job; sipp from 127.0.0.1 then places 3."""
    uas_port = free_udp_port()
    server, backend = await start(uas_port, allowed_addresses=["127.0.0.1/32"])
    try:
        rc, out = await run_sipp(
            f"127.0.0.1:{server.port}",
            "-sf", str(SCENARIOS / "uac_forbidden.xml"),
            "-s", "+15550100", "-m", "5", "-r", "50",
            "-trace_stat", "-fd", "1",
            cwd=tmp_path, local_ip="127.0.0.2",
        )  # fmt: skip
        assert rc == 0, out[-3000:]
        assert stat_column(tmp_path, "uac_forbidden", "SuccessfulCall(C)") == 5
        assert backend.requested == []
        assert server.edge.stats.forbidden == 5
        (uac_rc, uac_out), (uas_rc, uas_out) = await sipp_burst(
            server.port, uas_port, tmp_path, calls=3, answers=3
        )
        assert uac_rc == 0, uac_out[-3000:]
        assert uas_rc == 0, uas_out[-3000:]
        assert len(backend.requested) == 3
    finally:
        await server.close()


async def digest_calls(
    tmp_path: Path, password: str, calls: int, answers: int
) -> tuple[SipServer, PoolBackend, int, str, asyncio.Future[tuple[int, str]] | None]:
    """A digest trunk; sipp as the downstream (if ``answers``) and as the caller."""
    uas_port = free_udp_port()
    server, backend = await start(
        uas_port, auth_username="carrier", auth_password=PASSWORD, auth_algorithms=["MD5"]
    )
    uas = None
    if answers:
        uas = asyncio.ensure_future(
            run_sipp(
                "-sf", str(SCENARIOS / "uas_answer.xml"), "-p", str(uas_port),
                "-m", str(answers), cwd=tmp_path,
            )
        )  # fmt: skip
    rc, out = await run_sipp(
        f"127.0.0.1:{server.port}",
        "-sf", str(SCENARIOS / "uac_auth.xml"),
        "-s", "+15550100", "-m", str(calls), "-r", "20",
        "-au", "carrier", "-ap", password,
        "-trace_stat", "-fd", "1", "-trace_err",
        cwd=tmp_path,
    )  # fmt: skip
    return server, backend, rc, out, uas


async def test_sipp_with_the_right_password_gets_through_after_a_407(tmp_path: Path) -> None:
    """sipp answers each 407 (MD5, qop=auth) with Proxy-Authorization: 3 calls placed,
    answered by the downstream sipp and hung up; 3 challenges, 3 authenticated."""
    server, backend, rc, out, uas = await digest_calls(tmp_path, PASSWORD, 3, answers=3)
    assert uas is not None
    try:
        assert rc == 0, out[-3000:]
        uas_rc, uas_out = await asyncio.wait_for(uas, 35)
        assert uas_rc == 0, uas_out[-3000:]
        assert stat_column(tmp_path, "uac_auth", "SuccessfulCall(C)") == 3
        assert len(backend.requested) == 3
        assert server.edge.stats.challenged == 3
        assert server.edge.stats.authenticated == 3
        assert server.edge.pending_calls() == 0
    finally:
        await server.close()


async def test_sipp_with_a_wrong_password_gets_403_and_no_job(tmp_path: Path) -> None:
    """sipp with the wrong password: challenged, then 403 for each call; no job at all."""
    server, backend, rc, out, _ = await digest_calls(tmp_path, "not-the-password", 3, answers=0)
    try:
        assert rc == 0, out[-3000:]
        assert backend.requested == []
        assert server.edge.stats.challenged == 3
        assert server.edge.stats.forbidden == 3
    finally:
        await server.close()
