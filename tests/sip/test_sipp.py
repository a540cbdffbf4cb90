"""sipp drives SipServer: a caller bursts INVITEs, a second sipp answers as the downstream."""

from __future__ import annotations

import asyncio
import csv
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

import pytest
from sip.sipkit import PoolBackend

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import parse_sip_config

SCENARIOS = Path(__file__).parent / "scenarios"
SIPP = shutil.which("sipp")

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)"),
]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TimedBackend(PoolBackend):
    """PoolBackend that records when each call was asked for and refused."""

    def __init__(self, capacity: dict[str, int]) -> None:
        super().__init__(capacity)
        self.asked_at: dict[str, float] = {}
        self.refused_after: list[float] = []

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        self.asked_at[call_ref] = asyncio.get_running_loop().time()
        super().request(call_ref, pool, max_wait_s, metadata)

    def _expire(self, call_ref: str) -> None:
        super()._expire(call_ref)
        self.refused_after.append(asyncio.get_running_loop().time() - self.asked_at[call_ref])


async def run_sipp(*args: str, cwd: Path, local_ip: str = "127.0.0.1") -> tuple[int, str]:
    """Run sipp to completion (30 s at most) from ``local_ip``; (exit code, output)."""
    assert SIPP is not None
    proc = await asyncio.create_subprocess_exec(
        SIPP,
        *args,
        "-nostdin",
        "-i",
        local_ip,
        "-timeout",
        "30s",
        "-timeout_error",
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def sipp_burst(
    target_port: int, uas_port: int, cwd: Path, *, calls: int, answers: int
) -> tuple[tuple[int, str], tuple[int, str]]:
    """sipp as the downstream (uas_answer.xml, answering `answers` calls on
    `uas_port`) and as the caller (uac_burst.xml, `calls` INVITEs at 100/s to
    `target_port`, stats in `cwd`); the (exit code, output) of the caller, then
    of the downstream."""
    uas = asyncio.ensure_future(
        run_sipp(
            "-sf", str(SCENARIOS / "uas_answer.xml"),
            "-p", str(uas_port), "-m", str(answers),
            cwd=cwd,
        )
    )  # fmt: skip
    uac = await run_sipp(
        f"127.0.0.1:{target_port}",
        "-sf", str(SCENARIOS / "uac_burst.xml"),
        "-s", "+15550100", "-m", str(calls), "-r", "100",
        "-trace_stat", "-fd", "1", "-trace_err",
        cwd=cwd,
    )  # fmt: skip
    return uac, await asyncio.wait_for(uas, 35)


def stat_column(directory: Path, prefix: str, column: str) -> int:
    """The last value of ``column`` in a sipp -trace_stat CSV."""
    (path,) = directory.glob(f"{prefix}*.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    return int(rows[-1][column])


async def test_burst_of_13_with_capacity_4(tmp_path: Path) -> None:
    """13 INVITEs at capacity 4: 4 answered downstream, 9 refused 503 in time, no retransmits."""
    uas_port, max_wait = free_udp_port(), 0.5
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "tcp": False,
            "trunks": {
                "support": {
                    "numbers": ["+1555*"],
                    "pool": "support",
                    "max_wait_s": max_wait,
                    "downstream": f"127.0.0.1:{uas_port}",
                    "retry_after_s": 2,
                }
            },
        }
    )
    backend = TimedBackend({"support": 4})
    server = SipServer(config, backend)
    backend.server = server
    await server.start()
    try:
        (uac_rc, uac_out), (uas_rc, uas_out) = await sipp_burst(
            server.port, uas_port, tmp_path, calls=13, answers=4
        )
    finally:
        await server.close()
    assert uac_rc == 0, uac_out[-3000:]
    assert uas_rc == 0, uas_out[-3000:]
    assert len(backend.requested) == 13  # no retransmission became a job
    assert len(backend.held) == 0
    assert len(backend.released) == 4
    assert all(outcome == "caller_bye" for _, outcome in backend.released)
    assert len(backend.refused) == 9
    assert max(backend.refused_after) <= max_wait + 0.1
    assert stat_column(tmp_path, "uac_burst", "Retransmissions(C)") == 0
    assert stat_column(tmp_path, "uac_burst", "FailedCall(C)") == 0
    assert server.edge.stats.internal_errors == 0
