"""SIP in cluster mode: a call's set-up time at the pool's owner vs at another member.

Theory of operation: starts a redis-server (tests/cluster/redisserver.py) and
two `trunkline serve` members on it, each with a SIP edge on its own UDP
port and one trunk to a downstream played by this process (it answers every
INVITE and BYE 200 at once). One protocol-level worker of a large cap
(tests/protoworker.py) registers at the owner and accepts every offer. Calls
go one at a time, alternating between the owner's SIP port and the other
member's, so both see the same machine load; set-up time = the INVITE sent
-> its 200 received by the caller (100 Trying, admission, the forwarded
INVITE and the downstream's 200 relayed). Each call is then hung up (BYE)
before the next. At the other member the admission costs a Redis round trip
(the call's claim) and a streamed HTTP request to the owner; at the owner,
the claim only.

    .venv/bin/python benchmarks/sip_cluster.py              # 200 calls per side
    .venv/bin/python benchmarks/sip_cluster.py --calls 50   # quick

It prints p50/p90/p99 per side, the ratio of the medians, and the load
average before and after (from /proc/loadavg).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _common import redis_server_class  # noqa: E402
from protoworker import ProtoWorker  # noqa: E402
from sip.sipkit import UdpEndpoint, answer, invite, request_like  # noqa: E402
from support import ServerProcess, wait_until  # noqa: E402

from trunkline.sip.message import SipRequest, SipResponse  # noqa: E402

POOL = "bench"


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(redis_url: str, name: str, sip_port: int, downstream_port: int) -> str:
    return (
        '[store]\nbackend = "memory"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nmember = "{name}"\nnamespace = "b"\n'
        "lease_ttl_s = 2.0\ntimeout_s = 0.5\n"
        f"[pools.{POOL}]\nmax_jobs_per_worker = 1000\n"
        f'[sip]\nhost = "127.0.0.1"\nport = {sip_port}\ntcp = false\n'
        f'[sip.trunks.main]\nnumbers = ["+1555*"]\npool = "{POOL}"\nmax_wait_s = 5\n'
        f'downstream = "127.0.0.1:{downstream_port}"\n'
    )


async def _downstream(uas: UdpEndpoint, ports: set[int]) -> None:
    """Answer every request 200 (INVITE and BYE), back to the member it came from."""
    while True:
        msg, _ = await uas.inbox.get()
        if isinstance(msg, SipRequest) and msg.method in ("INVITE", "BYE"):
            via = msg.headers.get("Via") or ""
            port = int(via.split()[1].split(";")[0].rsplit(":", 1)[1])
            if port in ports:
                uas.send(answer(msg, 200, "OK"), port)


async def _call(caller: UdpEndpoint, port: int, seq: int) -> float:
    call_id = f"bench-{seq}@127.0.0.1"

    def ok(cseq: str) -> Any:
        def match(m: SipRequest | SipResponse) -> bool:
            return (
                isinstance(m, SipResponse)
                and m.status == 200
                and m.headers.get("Call-ID") == call_id
                and (m.headers.get("CSeq") or "").endswith(cseq)
            )

        return match

    data = invite(call_id=call_id, host="127.0.0.1", port=caller.port, branch=f"z9hG4bKb{seq}")
    t0 = time.perf_counter()
    caller.send(data, port)
    await caller.recv_where(ok("INVITE"), 10.0)
    took = time.perf_counter() - t0
    bye = request_like(
        "BYE", call_id=call_id, to_tag="gw1", cseq=2, host="127.0.0.1", port=caller.port,
        branch=f"z9hG4bKb{seq}bye",
    )  # fmt: skip
    caller.send(bye, port)
    await caller.recv_where(ok("BYE"), 10.0)
    return took


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


async def run(calls: int) -> None:
    redis = redis_server_class()()
    redis.start()
    tmp = Path(tempfile.mkdtemp(prefix="sip-cluster-bench-"))
    caller, uas = await UdpEndpoint.open(), await UdpEndpoint.open()
    members: list[tuple[ServerProcess, int]] = []
    worker: ProtoWorker | None = None
    answering: asyncio.Task[None] | None = None
    try:
        for i in range(2):
            d = tmp / f"m{i}"
            d.mkdir()
            sip_port = _udp_port()
            srv = ServerProcess(d, _toml(redis.url, f"m{i}", sip_port, uas.port))
            srv.start(timeout=60.0)
            members.append((srv, sip_port))
        answering = asyncio.get_running_loop().create_task(
            _downstream(uas, {p for _, p in members})
        )

        async def owner() -> tuple[ServerProcess, int] | None:
            for srv, port in members:
                view = await srv.get("/v1/cluster")
                if any(p["pool"] == POOL and p["ours"] for p in view["pools"]):
                    return srv, port
            return None

        (owner_srv, owner_port) = await wait_until(owner, 30.0, what="a pool owner")
        other_port = next(p for s, p in members if s is not owner_srv)
        worker = ProtoWorker.autonomous(owner_srv.url, POOL, max_jobs=1000)
        await worker.connect()
        for seq in range(5):  # warm-up: connections, the forwarding session
            await _call(caller, other_port if seq % 2 else owner_port, -1 - seq)
        load_before = _load()
        at_owner: list[float] = []
        at_other: list[float] = []
        for seq in range(calls * 2):
            if seq % 2:
                at_other.append(await _call(caller, other_port, seq))
            else:
                at_owner.append(await _call(caller, owner_port, seq))
        load_after = _load()
        print(f"calls per side: {calls}; load average {load_before} -> {load_after}")
        print("side        p50 ms   p90 ms   p99 ms")
        for name, xs in (("owner", at_owner), ("non-owner", at_other)):
            p50, p90, p99 = (_pct(xs, q) * 1000 for q in (0.5, 0.9, 0.99))
            print(f"{name:<10} {p50:7.2f}  {p90:7.2f}  {p99:7.2f}")
        ratio = statistics.median(at_other) / statistics.median(at_owner)
        print(f"median ratio non-owner / owner: {ratio:.2f}")
    finally:
        if answering is not None:
            answering.cancel()
        if worker is not None:
            await worker.close()
        for srv, _ in members:
            srv.stop()
        caller.close()
        uas.close()
        redis.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per side (default 200)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
