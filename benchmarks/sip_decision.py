"""SIP admission edge benchmark: INVITE → final decision at 200 INVITEs/s (issue 4).

Starts `trunkline serve` as a child process on free loopback ports with a
`[sip]` UDP trunk (`max_wait_s = 0`, refusal 503 + Retry-After) whose
`downstream` is a UDP responder in this process, and `protocol_workers.py`
(LiveKit-protocol workers that accept every offer at once and hold the job
until the server terminates it) as a second child. This process is the caller:
an asyncio UDP load generator that sends well-formed INVITEs (unique Call-ID,
branch and From tag; Via naming its own port) at exactly `--rate` per second
on an absolute schedule, never waiting for earlier calls, and never
retransmitting (an INVITE retransmission would only appear if the 100 Trying
were 500 ms late, far beyond the bar).

(A) capacity free: `--workers` x `--slots` agent slots, far more than the
    calls alive at any moment. Decision = INVITE sent → the forwarded INVITE
    arrives at the downstream (the call was placed on an agent and acted on).
    The downstream answers 200 OK; the caller ACKs it and sends BYE after
    `--call-s` seconds; the downstream answers the BYE; the edge frees the
    slot on the BYE (the agent's job is terminated). So capacity stays free.
(B) capacity exhausted: first every slot is filled with answered calls that
    are held (ACKed, no BYE), checked through `/v1/pools` and an OPTIONS
    (which must get 503); then the measured INVITEs are all refused.
    Decision = INVITE sent → 503 received by the caller. Each refusal is ACKed
    (same branch) so the server's Timer G stops. Afterwards the held calls are
    hung up and every slot must be free again.

Both ends of each measurement are `time.monotonic()` in this process. Printed
per case: p50/p90/p99/max, counts (sent, 100 Trying, decided, other outcomes,
retransmissions received), the send lag behind schedule, the edge's own
counters from `/metrics`, CPU of each process, and PASS/FAIL against
p99 ≤ 20 ms. Bounded in count and time; every child is killed on any exit.

    .venv/bin/python benchmarks/sip_decision.py
    .venv/bin/python benchmarks/sip_decision.py --profile /tmp/sip-prof   # py-spy the server
    .venv/bin/python benchmarks/sip_decision.py --sipp                    # + sipp cross-check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from _common import (
    POOL,
    Children,
    CpuMeter,
    PySpy,
    ServerUnderTest,
    WorkersProcess,
    add_quiet_options,
    child_kwargs,
    machine_info,
    profile_summary,
    quiet_machine,
    run_driver,
    verdict,
    worker_command,
)
from e2e_dispatch import fmt_ms, generator_note, per_second, summarize_ms

DECISION_P99_MS = 20.0
T1 = 0.5  # RFC 3261 round-trip estimate: first retransmission interval
CALLED = "+15550100"
HOST = "127.0.0.1"

# ------------------------------------------------------------------ SIP messages


def udp_rcvbuf_errors() -> int:
    """UDP datagrams the kernel dropped for a full receive buffer, machine-wide."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def udp_socket() -> socket.socket:
    """A UDP socket on 127.0.0.1 with a large receive buffer (no drops while busy)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


_COMPACT = {
    "i": "call-id",
    "v": "via",
    "f": "from",
    "t": "to",
    "m": "contact",
    "l": "content-length",
}


@dataclass(slots=True)
class Msg:
    """A parsed SIP message: the start line and headers (lower-case names, in order)."""

    start: str
    headers: list[tuple[str, str]]

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/2.0 ")

    @property
    def status(self) -> int:
        return int(self.start.split(" ", 2)[1])

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    def get(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return ""

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def parse(data: bytes) -> Msg | None:
    """Start line and headers of a SIP datagram; None if it is not one."""
    end = data.find(b"\r\n\r\n")
    head = (data if end < 0 else data[:end]).decode("utf-8", "replace")
    lines = head.split("\r\n")
    if not lines or not lines[0]:
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    return Msg(lines[0], headers)


_TAG = re.compile(r";\s*tag=([^;>\s]+)", re.IGNORECASE)


def tag_of(value: str) -> str:
    m = _TAG.search(value)
    return m.group(1) if m else ""


def cseq_method(msg: Msg) -> str:
    parts = msg.get("cseq").split()
    return parts[1].upper() if len(parts) == 2 else ""


SDP = (
    "v=0\r\n"
    f"o=bench 1 1 IN IP4 {HOST}\r\n"
    "s=-\r\n"
    f"c=IN IP4 {HOST}\r\n"
    "t=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
).encode()


class CallLeg:
    """What the caller needs to remember about one outgoing call."""

    __slots__ = ("branch", "bye_done", "call_id", "from_tag", "to_tag", "uri")

    def __init__(self, call_id: str, branch: str, from_tag: str, uri: str) -> None:
        self.call_id = call_id
        self.branch = branch
        self.from_tag = from_tag
        self.uri = uri
        self.to_tag = ""
        self.bye_done = False


class Caller(asyncio.DatagramProtocol):
    """The customer's PBX: sends INVITEs, ACKs every final, hangs up answered calls.

    Like a UAC on UDP it retransmits an INVITE that got no response at all after
    T1 = 0.5 s, doubling (Timer A), and a BYE until its final (Timer E, capped at
    T2 = 4 s); both are counted, and none should happen. `hangup_after_s` (None:
    keep the call) schedules the BYE after the 200 OK has been ACKed.
    """

    def __init__(self, sip_port: int) -> None:
        self.sip_port = sip_port
        self.addr = (HOST, sip_port)
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.legs: dict[str, tuple[int, CallLeg]] = {}
        self.trying_t: dict[str, float] = {}
        # status, time, had Retry-After, Reason header
        self.final: dict[str, tuple[int, float, bool, str]] = {}
        self.hangup_after_s: float | None = 0.0
        self.held: list[CallLeg] = []
        self.bye_ok = 0
        self.byes_sent = 0
        self.hangups = 0  # BYEs scheduled
        self.dup_trying = 0
        self.dup_final = 0
        self.dup_bye_ok = 0
        self.invite_retrans = 0
        self.bye_retrans = 0
        self.other: dict[str, int] = {}
        self.options_status: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = int(transport.get_extra_info("sockname")[1])

    def error_received(self, exc: Exception) -> None:
        self.other[f"error {exc!r}"] = self.other.get(f"error {exc!r}", 0) + 1

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.addr)

    # ---------------------------------------------------------------- requests

    def invite_bytes(self, leg: CallLeg) -> bytes:
        return (
            f"INVITE {leg.uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={leg.branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:pbx@{HOST}:{self.port}>;tag={leg.from_tag}\r\n"
            f"To: <{leg.uri}>\r\n"
            f"Call-ID: {leg.call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <sip:pbx@{HOST}:{self.port}>\r\n"
            "User-Agent: trunkline-bench\r\n"
            "Content-Type: application/sdp\r\n"
            f"Content-Length: {len(SDP)}\r\n\r\n"
        ).encode() + SDP

    def new_leg(self, name: str, index: int) -> tuple[CallLeg, bytes]:
        leg = CallLeg(
            f"{name}-{index}-{os.getpid()}@{HOST}",
            f"z9hG4bK-{name}-{index}",
            f"ft-{name}-{index}",
            f"sip:{CALLED}@{HOST}:{self.sip_port}",
        )
        self.legs[leg.call_id] = (index, leg)
        return leg, self.invite_bytes(leg)

    def _ack_non2xx(self, leg: CallLeg, to: str) -> bytes:
        return (
            f"ACK {leg.uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={leg.branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:pbx@{HOST}:{self.port}>;tag={leg.from_tag}\r\n"
            f"To: {to}\r\n"
            f"Call-ID: {leg.call_id}\r\n"
            "CSeq: 1 ACK\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def _in_dialog(self, leg: CallLeg, method: str, cseq: int, suffix: str) -> bytes:
        # The edge record-routes itself and relays in-dialog requests between the
        # two hops of the call, so they go to it with a Route naming it.
        return (
            f"{method} sip:gw@{HOST} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={leg.branch}-{suffix};rport\r\n"
            f"Route: <sip:{HOST}:{self.sip_port};lr>\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:pbx@{HOST}:{self.port}>;tag={leg.from_tag}\r\n"
            f"To: <{leg.uri}>;tag={leg.to_tag}\r\n"
            f"Call-ID: {leg.call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def invite(self, leg: CallLeg, data: bytes) -> None:
        """Send an INVITE and arm its Timer A."""
        self.send(data)
        asyncio.get_running_loop().call_later(T1, self._timer_a, leg.call_id, data, T1)

    def _timer_a(self, call_id: str, data: bytes, interval: float) -> None:
        if call_id in self.trying_t or call_id in self.final or interval >= 16.0:
            return
        self.invite_retrans += 1
        self.send(data)
        asyncio.get_running_loop().call_later(
            2 * interval, self._timer_a, call_id, data, 2 * interval
        )

    def bye(self, leg: CallLeg) -> None:
        self.byes_sent += 1
        data = self._in_dialog(leg, "BYE", 2, "bye")
        self.send(data)
        asyncio.get_running_loop().call_later(T1, self._timer_e, leg, data, T1, 1)

    def _timer_e(self, leg: CallLeg, data: bytes, interval: float, tries: int) -> None:
        if leg.bye_done or tries >= 11:
            return
        self.bye_retrans += 1
        self.send(data)
        nxt = min(2 * interval, 4.0)
        asyncio.get_running_loop().call_later(nxt, self._timer_e, leg, data, nxt, tries + 1)

    def options(self) -> asyncio.Future[int]:
        """Send an OPTIONS for the trunk's number; the future gets the status."""
        self.options_status = asyncio.get_running_loop().create_future()
        n = time.monotonic_ns()
        self.send(
            (
                f"OPTIONS sip:{CALLED}@{HOST}:{self.sip_port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK-opt-{n};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:pbx@{HOST}:{self.port}>;tag=opt{n}\r\n"
                f"To: <sip:{CALLED}@{HOST}:{self.sip_port}>\r\n"
                f"Call-ID: opt-{n}@{HOST}\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
        return self.options_status

    # --------------------------------------------------------------- responses

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        t = time.monotonic()
        msg = parse(data)
        if msg is None or not msg.is_response:
            key = "request" if msg is not None else "garbage"
            self.other[key] = self.other.get(key, 0) + 1
            return
        method = cseq_method(msg)
        call_id = msg.get("call-id")
        status = msg.status
        if method == "OPTIONS":
            if self.options_status is not None and not self.options_status.done():
                self.options_status.set_result(status)
            return
        entry = self.legs.get(call_id)
        if method == "BYE" and entry is not None:
            if status < 200:
                return
            if entry[1].bye_done:
                self.dup_bye_ok += 1
                return
            entry[1].bye_done = True
            if status == 200:
                self.bye_ok += 1
            else:
                self.other[f"BYE {status}"] = self.other.get(f"BYE {status}", 0) + 1
            return
        if method != "INVITE" or entry is None:
            self.other[f"{method} {status}"] = self.other.get(f"{method} {status}", 0) + 1
            return
        _, leg = entry
        if status < 200:
            if status == 100 and call_id in self.trying_t:
                self.dup_trying += 1
            elif status == 100:
                self.trying_t[call_id] = t
            else:
                self.other[f"INVITE {status}"] = self.other.get(f"INVITE {status}", 0) + 1
            return
        first = call_id not in self.final
        if first:
            self.final[call_id] = (status, t, bool(msg.get("retry-after")), msg.get("reason"))
            leg.to_tag = tag_of(msg.get("to"))
        else:
            self.dup_final += 1
        if status >= 300:
            self.send(self._ack_non2xx(leg, msg.get("to")))
        else:
            self.send(self._in_dialog(leg, "ACK", 1, "ack"))
            if first:
                if self.hangup_after_s is None:
                    self.held.append(leg)
                else:
                    self.hangups += 1
                    asyncio.get_running_loop().call_later(self.hangup_after_s, self.bye, leg)


class Downstream(asyncio.DatagramProtocol):
    """The media gateway: answers forwarded INVITEs 200 OK, BYEs 200 OK, records arrivals."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.invite_t: dict[str, float] = {}
        self.job_header: dict[str, bool] = {}
        self.dup_invites = 0
        self.acks = 0
        self.byes = 0
        self.other: dict[str, int] = {}
        self._n = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = int(transport.get_extra_info("sockname")[1])

    def _answer(self, msg: Msg, addr: tuple[str | Any, int], to_tag: str) -> None:
        assert self.transport is not None
        to = msg.get("to")
        if to_tag and not tag_of(to):
            to = f"{to};tag={to_tag}"
        lines = ["SIP/2.0 200 OK"]
        lines += [f"Via: {v}" for v in msg.all("via")]
        lines += [f"Record-Route: {r}" for r in msg.all("record-route")]
        lines += [
            f"From: {msg.get('from')}",
            f"To: {to}",
            f"Call-ID: {msg.get('call-id')}",
            f"CSeq: {msg.get('cseq')}",
            f"Contact: <sip:gw@{HOST}:{self.port}>",
            "Content-Length: 0",
            "",
            "",
        ]
        self.transport.sendto("\r\n".join(lines).encode(), addr)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        t = time.monotonic()
        msg = parse(data)
        if msg is None or msg.is_response:
            key = "response" if msg is not None else "garbage"
            self.other[key] = self.other.get(key, 0) + 1
            return
        method = msg.method
        if method == "INVITE":
            call_id = msg.get("call-id")
            if call_id in self.invite_t:
                self.dup_invites += 1
            else:
                self.invite_t[call_id] = t
                self.job_header[call_id] = bool(
                    msg.get("x-trunkline-job") and msg.get("x-trunkline-worker")
                )
            self._n += 1
            self._answer(msg, addr, f"gw{self._n}")
        elif method == "ACK":
            self.acks += 1
        elif method == "BYE":
            self.byes += 1
            self._answer(msg, addr, "")
        else:
            self.other[method] = self.other.get(method, 0) + 1


# ------------------------------------------------------------------------ the run


class SipServerUnderTest(ServerUnderTest):
    """`trunkline serve` with a `[sip]` UDP trunk in front of the bench pool."""

    def __init__(self, *, sip_port: int, downstream_port: int, slots: int) -> None:
        super().__init__(max_jobs_per_worker=slots)
        self.sip_port = sip_port
        self.downstream_port = downstream_port

    def config_text(self) -> str:
        return super().config_text() + (
            "\n[sip]\n"
            f'host = "{HOST}"\n'
            f"port = {self.sip_port}\n"
            "udp = true\n"
            "tcp = false\n"
            f"\n[sip.trunks.bench]\n"
            f'numbers = ["{CALLED}"]\n'
            f'pool = "{POOL}"\n'
            "max_wait_s = 0\n"
            f'downstream = "{HOST}:{self.downstream_port}"\n'
            "refusal = 503\n"
            "retry_after_s = 5\n"
            # The caller is this process on 127.0.0.1: listed, so the per-source
            # INVITE rate limit (100/s for unlisted sources) does not apply to it.
            f'allowed_addresses = ["{HOST}"]\n'
        )

    def sip_counters(self) -> dict[str, int]:
        """The edge's counters from `/metrics` (`trunkline_sip_events_total{event=...}`)."""
        out: dict[str, int] = {}
        for line in self.metrics_text().splitlines():
            m = re.match(r'trunkline_sip_events(?:_total)?\{event="(\w+)"\} ([0-9.e+]+)', line)
            if m:
                out[m.group(1)] = int(float(m.group(2)))
        return out

    def pool(self) -> dict[str, Any]:
        body = self.get_json("/v1/pools")
        (pool,) = [p for p in body["pools"] if p["agent_name"] == POOL]
        return dict(pool)


@dataclass
class CaseResult:
    name: str
    sent: int = 0
    decision_ms: list[float] = field(default_factory=list)
    trying_ms: list[float] = field(default_factory=list)
    final_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    undecided: int = 0
    no_trying: int = 0
    retransmissions: dict[str, int] = field(default_factory=dict)
    resent: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    udp_drops: int = 0
    pool_after: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    p99_by_second: str = ""
    cpu: CpuMeter | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, float]:
        return summarize_ms(self.decision_ms)

    @property
    def ok(self) -> bool:
        return (
            self.stats["p99"] <= DECISION_P99_MS
            and self.undecided == 0
            and len(self.decision_ms) == self.sent
        )


async def send_schedule(
    caller: Caller, name: str, rate: float, count: int
) -> tuple[list[str], list[float], list[float]]:
    """Send `count` INVITEs at exact absolute times; returns call ids, send times, lags."""
    loop = asyncio.get_running_loop()
    prepared = [caller.new_leg(name, i) for i in range(count)]
    call_ids = [leg.call_id for leg, _ in prepared]
    send_t = [0.0] * count
    lag = [0.0] * count
    interval = 1.0 / rate
    t0 = loop.time() + 0.05
    monotonic = time.monotonic
    invite = caller.invite
    i = 0
    while i < count:
        now = loop.time()
        while i < count and t0 + i * interval <= now:
            t = monotonic()
            invite(*prepared[i])
            send_t[i] = t
            lag[i] = (t - (t0 + i * interval)) * 1e3
            i += 1
        if i < count:
            await asyncio.sleep(t0 + i * interval - loop.time())
    return call_ids, send_t, lag


def all_decided(caller: Caller, call_ids: list[str]) -> bool:
    return all(c in caller.final for c in call_ids)


async def wait_until(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@dataclass
class Bench:
    args: argparse.Namespace
    server: SipServerUnderTest
    workers: WorkersProcess
    caller: Caller
    downstream: Downstream
    pids: dict[str, int]


async def run_case(b: Bench, name: str, *, placed: bool, measured: bool = True) -> CaseResult:
    """Send the INVITEs of one case and collect what came back."""
    args = b.args
    caller, ds = b.caller, b.downstream
    count = int(args.rate * (args.duration if measured else args.warmup))
    result = CaseResult(name)
    counters0 = await asyncio.to_thread(b.server.sip_counters)
    dup0 = (
        caller.dup_trying,
        caller.dup_final,
        ds.dup_invites,
        caller.invite_retrans,
        caller.bye_retrans,
        caller.dup_bye_ok,
    )
    drops0 = udp_rcvbuf_errors()
    dialog0 = (ds.acks, ds.byes, caller.byes_sent, caller.bye_ok)
    cpu = CpuMeter(b.pids) if measured else None
    spy: PySpy | None = None
    if measured and args.profile:
        spy = PySpy(b.server.pid, args.duration, Path(args.profile) / f"{name}.txt")
        spy.start()
    if cpu is not None:
        cpu.start()
    call_ids, send_t, lag = await send_schedule(caller, name, args.rate, count)
    if cpu is not None:
        cpu.stop()
        result.cpu = cpu
    if spy is not None:
        await spy.wait()
        if spy.out.exists():
            summary = profile_summary(spy.out)
            spy.out.with_suffix(".summary.txt").write_text(summary + "\n")
            result.notes.append(f"server profile ({spy.out}):\n{summary}")
    # Bounded drain: every INVITE decided (and, when placed, answered and hung up).
    await wait_until(lambda: all(c in caller.final for c in call_ids), args.drain)
    if placed and caller.hangup_after_s is not None:
        # Every answered call hung up and its BYE answered: the slots are free again.
        await wait_until(
            lambda: caller.byes_sent >= caller.hangups and caller.bye_ok >= caller.byes_sent,
            args.call_s + args.drain,
        )
    await asyncio.sleep(0.2)  # late duplicates, if any
    result.sent = count
    times: list[float] = []
    for k, call_id in enumerate(call_ids):
        final = caller.final.get(call_id)
        trying = caller.trying_t.get(call_id)
        if trying is None:
            result.no_trying += 1
        else:
            result.trying_ms.append((trying - send_t[k]) * 1e3)
        if final is None:
            result.undecided += 1
            continue
        status, t_final, retry_after, reason = final
        label = f"{status}" + (" + Retry-After" if status == 503 and retry_after else "")
        result.outcomes[label] = result.outcomes.get(label, 0) + 1
        if status >= 300:
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
        result.final_ms.append((t_final - send_t[k]) * 1e3)
        if placed:
            t_dec = ds.invite_t.get(call_id)
            if t_dec is None or status != 200:
                continue
        else:
            if status != 503:
                continue
            t_dec = t_final
        result.decision_ms.append((t_dec - send_t[k]) * 1e3)
        times.append(send_t[k])
    if placed:
        result.notes.append(
            f"downstream got {ds.acks - dialog0[0]} ACKs and {ds.byes - dialog0[1]} BYEs; "
            f"caller sent {caller.byes_sent - dialog0[2]} BYEs, got "
            f"{caller.bye_ok - dialog0[3]} BYE 200 OK"
        )
        missing_hdr = sum(1 for c in call_ids if c in ds.job_header and not ds.job_header[c])
        if missing_hdr:
            result.notes.append(f"{missing_hdr} forwarded INVITEs lacked X-Trunkline-Job/Worker")
    result.lag_ms = lag
    result.p99_by_second = per_second(times, result.decision_ms, send_t[0] if send_t else 0.0)
    result.retransmissions = {
        "100 Trying repeated at caller": caller.dup_trying - dup0[0],
        "final repeated at caller": caller.dup_final - dup0[1],
        "INVITE repeated at downstream": ds.dup_invites - dup0[2],
        "BYE 200 OK repeated at caller": caller.dup_bye_ok - dup0[5],
    }
    result.resent = {
        "INVITE (Timer A)": caller.invite_retrans - dup0[3],
        "BYE (Timer E)": caller.bye_retrans - dup0[4],
    }
    result.udp_drops = udp_rcvbuf_errors() - drops0
    pool = await asyncio.to_thread(b.server.pool)
    result.pool_after = {k: pool[k] for k in ("slots_used", "slots_free", "active_jobs", "queued")}
    counters1 = await asyncio.to_thread(b.server.sip_counters)
    result.counters = {k: v - counters0.get(k, 0) for k, v in counters1.items()}
    return result


async def fill_capacity(b: Bench, name: str) -> str:
    """Hold an answered call on every free slot (checked through `/v1/pools`, up to
    three rounds); returns a one-line account of the state, OPTIONS answer included."""
    caller = b.caller
    caller.hangup_after_s = None
    sent = refused = 0
    pool = await asyncio.to_thread(b.server.pool)
    for round_ in range(3):
        free = int(pool["slots_free"])
        if free <= 0:
            break
        call_ids, _, _ = await send_schedule(caller, f"{name}{round_}", b.args.rate, free)
        sent += free
        decided = partial(all_decided, caller, call_ids)
        await wait_until(decided, b.args.drain)
        refused += sum(1 for c in call_ids if c not in caller.final or caller.final[c][0] != 200)
        await asyncio.sleep(0.2)
        pool = await asyncio.to_thread(b.server.pool)
    options = await asyncio.wait_for(caller.options(), 2.0)
    return (
        f"{len(caller.held)} held calls of {sent} sent ({refused} not answered); pool "
        f"slots_used {pool['slots_used']}, slots_free {pool['slots_free']}; "
        f"OPTIONS -> {options}"
    )


async def release_held(b: Bench) -> str:
    caller = b.caller
    held, caller.held = caller.held, []
    before = caller.bye_ok
    for leg in held:
        caller.bye(leg)
        await asyncio.sleep(1.0 / b.args.rate)
    await wait_until(lambda: caller.bye_ok - before >= len(held), b.args.drain)
    caller.hangup_after_s = b.args.call_s

    def free() -> bool:
        p = b.server.pool()
        return bool(p["slots_used"] == 0 and p["active_jobs"] == 0)

    ok = False
    for _ in range(max(1, int(b.args.drain * 10))):  # polls the REST API, 0.1 s apart
        ok = await asyncio.to_thread(free)
        if ok:
            break
        await asyncio.sleep(0.1)
    pool = await asyncio.to_thread(b.server.pool)
    return (
        f"hung up {len(held)} held calls, {caller.bye_ok - before} BYE 200 OK; pool "
        f"slots_used {pool['slots_used']}, active_jobs {pool['active_jobs']} "
        f"({'all free' if ok else 'NOT all free'})"
    )


def report(r: CaseResult, what: str, args: argparse.Namespace) -> None:
    print(f"\n{r.name}: {what}")
    print(f"  INVITE -> decision: {fmt_ms(r.stats)}")
    print(f"  INVITE -> 100 Trying: {fmt_ms(summarize_ms(r.trying_ms))}")
    print(f"  INVITE -> final at caller: {fmt_ms(summarize_ms(r.final_ms))}")
    print(f"  send lag behind schedule: {fmt_ms(summarize_ms(r.lag_ms))}")
    print(
        f"  sent {r.sent}, decided {len(r.decision_ms)}, finals {r.outcomes}, "
        f"no final {r.undecided}, no 100 Trying {r.no_trying}"
    )
    print(f"  retransmissions received: {r.retransmissions}")
    print(f"  retransmissions the caller had to send: {r.resent}")
    if r.reasons:
        print(f"  Reason headers of refusals: {r.reasons}")
    print(f"  UDP datagrams dropped on this machine (RcvbufErrors, all processes): {r.udp_drops}")
    print(f"  pool after the case: {r.pool_after}")
    print(f"  edge counters (delta): {r.counters}")
    print(f"  p99 by second (ms): {r.p99_by_second}")
    if r.cpu is not None:
        print(f"  {generator_note(r.cpu)}")
        server_us = r.cpu.percent["server"] / 100.0 * args.duration / max(1, r.sent) * 1e6
        print(f"  server CPU per INVITE (all its work for the call): {server_us:.0f} us")
    for note in r.notes:
        print(f"  {note}")
    s = r.stats
    print(
        "  "
        + verdict(
            r.ok,
            f"p99 {s['p99']:.2f} ms <= {DECISION_P99_MS:.0f} ms at {args.rate:.0f} INVITEs/s, "
            f"every INVITE decided as expected ({len(r.decision_ms)}/{r.sent})",
        )
    )


def case_json(r: CaseResult) -> dict[str, Any]:
    return {
        **r.stats,
        "sent": r.sent,
        "decided": len(r.decision_ms),
        "outcomes": r.outcomes,
        "undecided": r.undecided,
        "no_100_trying": r.no_trying,
        "trying_ms": summarize_ms(r.trying_ms),
        "retransmissions": r.retransmissions,
        "resent_by_caller": r.resent,
        "refusal_reasons": r.reasons,
        "udp_rcvbuf_drops": r.udp_drops,
        "pool_after": r.pool_after,
        "counters": r.counters,
        "cpu": r.cpu.percent if r.cpu else {},
        "rest_of_machine_cpu": r.cpu.rest if r.cpu else None,
        "pass": r.ok,
    }


async def measure(b: Bench, case: str, *, placed: bool) -> CaseResult:
    """Run a case; run it again (up to `--retries` more times) when other programs
    used more than `--quiet-below`% of a core meanwhile. Returns the least disturbed."""
    args = b.args
    best: CaseResult | None = None
    for attempt in range(1, args.retries + 2):
        await quiet_machine(args, b.pids)
        r = await run_case(b, f"{case}{attempt}", placed=placed)
        r.name = case
        rest = r.cpu.rest if r.cpu is not None else 0.0
        if best is None or best.cpu is None or rest < best.cpu.rest:
            best = r
        if rest < args.quiet_below:
            break
        last = attempt > args.retries
        print(
            f"  case {case} attempt {attempt}: p99 {r.stats['p99']:.2f} ms while the rest of the "
            f"machine used {rest:.0f}% of a core; "
            + ("no retries left, reporting the least disturbed" if last else "measuring again")
        )
        await asyncio.sleep(0.5)
    assert best is not None
    return best


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ds_transport, downstream = await loop.create_datagram_endpoint(Downstream, sock=udp_socket())
    sip_port = free_udp_port()
    server = SipServerUnderTest(
        sip_port=sip_port, downstream_port=downstream.port, slots=args.slots
    )
    caller_transport, caller = await loop.create_datagram_endpoint(
        lambda: Caller(sip_port), sock=udp_socket()
    )
    caller.hangup_after_s = args.call_s
    print(f"machine: {machine_info()}")
    print(
        f"server: trunkline serve, HTTP 127.0.0.1:{server.port}, SIP UDP 127.0.0.1:{sip_port}; "
        f"downstream UDP :{downstream.port}; caller UDP :{caller.port}"
    )
    await asyncio.to_thread(server.start)
    workers = WorkersProcess(worker_command(server.ws_url, args.workers, hold_s=args.hold))
    await workers.start()
    ready = await workers.wait_ready(60.0)
    pool = await asyncio.to_thread(server.pool)
    print(
        f"workers: {args.workers} registered in {ready['seconds']} s; pool {POOL}: "
        f"{pool['workers']} workers, {pool['slots_free']} free slots"
    )
    pids = {"server": server.pid, "workers": workers.pid, "driver": os.getpid()}
    b = Bench(args, server, workers, caller, downstream, pids)
    out: dict[str, Any] = {"machine": machine_info(), "rate": args.rate}
    try:
        if args.warmup > 0:
            w = await run_case(b, "warmup", placed=True, measured=False)
            print(f"warmup: {w.sent} INVITEs, finals {w.outcomes}, no final {w.undecided}")
        a = await measure(b, "A", placed=True)
        report(
            a,
            f"capacity free ({pool['slots_free']} slots), {args.rate:.0f} INVITEs/s for "
            f"{args.duration:.0f} s; decision = forwarded INVITE at downstream; "
            f"calls ACKed and hung up (BYE) {args.call_s} s after the 200 OK",
            args,
        )
        out["A_capacity_free"] = case_json(a)
        await asyncio.sleep(0.5)
        print(f"\nfilling capacity for case B: {await fill_capacity(b, 'fill')}")
        bres = await measure(b, "B", placed=False)
        report(
            bres,
            f"capacity exhausted, {args.rate:.0f} INVITEs/s for {args.duration:.0f} s; "
            "decision = 503 at caller (each ACKed on the INVITE's branch)",
            args,
        )
        out["B_capacity_exhausted"] = case_json(bres)
        print(f"\nafter case B: {await release_held(b)}")
        if args.sipp:
            out["sipp"] = await sipp_cross_check(b)
    finally:
        summary = await workers.stop()
        caller_transport.close()
        ds_transport.close()
    print(
        f"\nworkers process: offers {summary.get('offers')}, assignments "
        f"{summary.get('assignments')}, terminations {summary.get('terminations')}, "
        f"disconnects {summary.get('disconnects')}, errors {summary.get('errors')}"
    )
    if caller.other or downstream.other:
        print(f"unexpected messages: caller {caller.other}, downstream {downstream.other}")
    return out


# ----------------------------------------------------------------- sipp cross-check

SIPP_UAC = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="trunkline refused caller">
  <send start_rtd="1">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="503" rtd="1"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <ResponseTimeRepartition value="1, 2, 5, 10, 20, 50, 100"/>
</scenario>
"""


async def sipp_cross_check(b: Bench) -> dict[str, Any]:
    """sipp at -r RATE against the exhausted trunk: its response-time histogram for the 503."""
    sipp = shutil.which("sipp")
    if sipp is None:
        print("\nsipp cross-check: sipp not installed, skipped")
        return {}
    await b.caller.options()
    print(f"\nsipp cross-check (case B with sipp as the caller): {await fill_capacity(b, 'sfill')}")
    tmp = b.server.tmp
    (tmp / "uac_refused.xml").write_text(SIPP_UAC)
    n = int(b.args.rate * b.args.duration)
    proc = await asyncio.create_subprocess_exec(
        sipp,
        f"{HOST}:{b.server.sip_port}",
        "-sf",
        "uac_refused.xml",
        "-s",
        CALLED,
        "-i",
        HOST,
        "-p",
        str(free_udp_port()),
        "-r",
        str(int(b.args.rate)),
        "-m",
        str(n),
        "-timeout",
        f"{int(b.args.duration + 20)}s",
        "-trace_stat",
        "-fd",
        "1",
        "-nostdin",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        **{**child_kwargs(), "cwd": str(tmp)},
    )
    Children.add(proc)
    try:
        await asyncio.wait_for(proc.wait(), b.args.duration + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    out: dict[str, Any] = {"rc": proc.returncode}
    stats = sorted(tmp.glob("uac_refused_*_.csv"))
    if stats:
        rows = [r.split(";") for r in stats[-1].read_text().splitlines() if r]
        head, last = rows[0], rows[-1]
        for col in ("SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)"):
            if col in head:
                out[col] = last[head.index(col)]
        # sipp times in whole milliseconds: "<1" means under 1 ms.
        prefix = "ResponseTimeRepartition1_"
        out["INVITE->503 histogram (ms)"] = {
            h[len(prefix) :]: last[i]
            for i, h in enumerate(head)
            if h.startswith(prefix) and last[i] not in ("", "0")
        }
        if "ResponseTime1(C)" in head:
            out["INVITE->503 mean"] = last[head.index("ResponseTime1(C)")]
    print(f"  sipp -r {int(b.args.rate)} -m {n}: {out}")
    print(f"  then: {await release_held(b)}")
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="INVITEs per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured case")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of case A first")
    p.add_argument("--workers", type=int, default=50, help="protocol workers in the pool")
    p.add_argument("--slots", type=int, default=4, help="max_jobs_per_worker of the pool")
    p.add_argument("--call-s", type=float, default=0.5, help="case A: BYE this long after 200")
    p.add_argument(
        "--hold", type=float, default=120.0, help="a worker ends a job by itself after this"
    )
    p.add_argument("--drain", type=float, default=10.0, help="max seconds to wait for answers")
    add_quiet_options(p, quiet_wait=60.0, unit="case")
    p.add_argument("--sipp", action="store_true", help="also run case B with sipp as the caller")
    p.add_argument("--profile", metavar="DIR", help="py-spy the server during each measured case")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Bounded: each case may be measured retries+1 times after a quiet wait.
    per_case = (args.retries + 1) * (args.quiet_wait + 2 * args.duration + 2 * args.drain)
    limit = 120.0 + 2 * per_case + (3 * args.duration + 60 if args.sipp else 0)
    out = run_driver(lambda: asyncio.wait_for(run(args), limit), args.json)
    if out is None:
        return 130
    ok = all(out[k]["pass"] for k in ("A_capacity_free", "B_capacity_exhausted"))
    print(f"\n{verdict(ok, 'SIP INVITE -> decision p99 <= 20 ms, capacity free and exhausted')}")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
