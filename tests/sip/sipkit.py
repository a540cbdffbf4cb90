"""Test helpers for the SIP edge: message builders and a fake admission backend."""

from __future__ import annotations

import asyncio
import hashlib
import random as _random
import re
import socket
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from trunkline.runtime.sip_server import SipServer
from trunkline.sip.config import SipConfig, parse_sip_config
from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipRequest, SipResponse, parse_message
from trunkline.sip.transaction import Outgoing, Peer

CALLER = Peer("udp", "10.0.0.1", 5070)
DOWNSTREAM = Peer("udp", "10.0.0.9", 5080)


def config(sip: Mapping[str, object] | None = None, **trunk: object) -> SipConfig:
    """A config with one trunk 'support' for +1555*, downstream 10.0.0.9:5080
    (``sip``: extra ``[sip]`` keys)."""
    t: dict[str, object] = {
        "numbers": ["+1555*"],
        "pool": "support",
        "max_wait_s": 2.0,
        "downstream": "10.0.0.9:5080",
    }
    t.update(trunk)
    return parse_sip_config(
        {"host": "10.0.0.5", "port": 5060, **(sip or {}), "trunks": {"support": t}},
    )


def seeded(seed: int = 7) -> Callable[[int], bytes]:
    """A deterministic stand-in for ``secrets.token_bytes``."""
    rng = _random.Random(seed)
    return lambda n: rng.randbytes(n)


def digest_header(
    challenge: str,
    *,
    method: str = "INVITE",
    uri: str = "sip:+15550100@10.0.0.5",
    username: str = "carrier",
    password: str = "pw-of-the-carrier",
    nc: int = 1,
    cnonce: str = "0a4f113b",
    qop: bool = True,
) -> str:
    """The Proxy-Authorization a client computes for ``challenge`` (written here
    independently of trunkline.sip.digest, RFC 7616 section 3.4.1)."""
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge.partition(" ")[2]))
    algorithm = params.get("algorithm", "MD5")
    h = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[algorithm]

    def hx(text: str) -> str:
        return h(text.encode()).hexdigest()

    ha1 = hx(f"{username}:{params['realm']}:{password}")
    ha2 = hx(f"{method}:{uri}")
    nonce = params["nonce"]
    base = (
        f'Digest username="{username}", realm="{params["realm"]}", nonce="{nonce}", '
        f'uri="{uri}", algorithm={algorithm}'
    )
    if not qop:
        return base + f', response="{hx(f"{ha1}:{nonce}:{ha2}")}"'
    ncv = f"{nc:08x}"
    response = hx(f"{ha1}:{nonce}:{ncv}:{cnonce}:auth:{ha2}")
    return base + f', qop=auth, nc={ncv}, cnonce="{cnonce}", response="{response}"'


def invite(
    *,
    branch: str = "z9hG4bKinv1",
    call_id: str = "call-1@10.0.0.1",
    user: str = "+15550100",
    cseq: int = 1,
    from_tag: str = "ft1",
    host: str = "10.0.0.1",
    port: int = 5070,
    transport: str = "UDP",
    max_forwards: int = 70,
    extra: str = "",
    body: bytes = b"v=0\r\n",
) -> bytes:
    """An initial INVITE from the caller."""
    return (
        f"INVITE sip:{user}@10.0.0.5 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {host}:{port};branch={branch}\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:alice@10.0.0.1>;tag={from_tag}\r\n"
        f"To: <sip:{user}@10.0.0.5>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} INVITE\r\n"
        f"Contact: <sip:alice@{host}:{port}>\r\n"
        f"Content-Type: application/sdp\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def request_like(
    method: str,
    *,
    branch: str = "z9hG4bKinv1",
    call_id: str = "call-1@10.0.0.1",
    user: str = "+15550100",
    cseq: int = 1,
    to_tag: str | None = None,
    from_tag: str = "ft1",
    route: str | None = None,
    host: str = "10.0.0.1",
    port: int = 5070,
) -> bytes:
    """A CANCEL/ACK/BYE/OPTIONS from the caller (To tag optional)."""
    to = f"<sip:{user}@10.0.0.5>" + (f";tag={to_tag}" if to_tag else "")
    route_line = f"Route: {route}\r\n" if route else ""
    return (
        f"{method} sip:{user}@10.0.0.5 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch={branch}\r\n"
        f"{route_line}"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:alice@10.0.0.1>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def answer(request: SipRequest, status: int, reason: str, *, to_tag: str = "gw1") -> bytes:
    """What the downstream sends back for a forwarded request."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in request.headers.get_all("Via")]
    lines += [f"Record-Route: {v}" for v in request.headers.get_all("Record-Route")]
    to = request.headers.get("To") or ""
    if status > 100 and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [
        f"From: {request.headers.get('From')}",
        f"To: {to}",
        f"Call-ID: {request.headers.get('Call-ID')}",
        f"CSeq: {request.headers.get('CSeq')}",
        "Contact: <sip:gw@10.0.0.9:5080>",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Sent:
    """One message the edge sent, parsed."""

    msg: SipRequest | SipResponse
    peer: Peer

    @property
    def status(self) -> int:
        assert isinstance(self.msg, SipResponse), self.msg
        return self.msg.status

    @property
    def method(self) -> str:
        assert isinstance(self.msg, SipRequest), self.msg
        return self.msg.method


def drain(edge: SipEdge) -> list[Sent]:
    """Parse everything the edge queued."""
    return [_parse(o) for o in edge.take_outgoing()]


def _parse(o: Outgoing) -> Sent:
    return Sent(parse_message(o.data), o.peer)


@dataclass
class FakeBackend:
    """Records what the edge asks; tests decide placements by hand (or ``auto``)."""

    capacity: dict[str, bool] = field(default_factory=dict)
    edge: SipEdge | None = None
    auto_place_at: float | None = None  # place synchronously inside request()
    fail: bool = False
    requests: dict[str, tuple[str, float, Mapping[str, str]]] = field(default_factory=dict)
    open: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    finals: list[tuple[str, int]] = field(default_factory=list)
    jobs: int = 0

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        if self.fail:
            raise RuntimeError("backend down")
        self.requests[call_ref] = (pool, max_wait_s, dict(metadata))
        self.open.add(call_ref)
        if self.auto_place_at is not None:
            self.place(call_ref, self.auto_place_at)

    def cancel(self, call_ref: str, reason: str) -> None:
        self.cancelled.append((call_ref, reason))
        self.open.discard(call_ref)

    def release(self, call_ref: str, outcome: str) -> None:
        self.released.append((call_ref, outcome))
        self.held.discard(call_ref)

    def final_sent(self, call_ref: str, status: int) -> None:
        self.finals.append((call_ref, status))

    def has_capacity(self, pool: str) -> bool:
        if self.fail:
            raise RuntimeError("backend down")
        return self.capacity.get(pool, True)

    def place(self, call_ref: str, now: float) -> str:
        assert self.edge is not None
        self.jobs += 1
        job = f"job-{self.jobs}"
        self.open.discard(call_ref)
        self.held.add(call_ref)
        self.edge.on_placed(call_ref, job, "worker-1", now)
        return job

    def refuse(self, call_ref: str, reason: str, now: float) -> None:
        assert self.edge is not None
        self.open.discard(call_ref)
        self.edge.on_refused(call_ref, reason, now)

    @property
    def only_ref(self) -> str:
        assert len(self.requests) == 1, self.requests
        return next(iter(self.requests))


def make_edge(
    sip: Mapping[str, object] | None = None, **trunk: object
) -> tuple[SipEdge, FakeBackend]:
    """An edge with one trunk and a fake backend wired both ways (seeded random)."""
    backend = FakeBackend()
    edge = SipEdge(config(sip, **trunk), backend, random=seeded())
    backend.edge = edge
    return edge, backend


class PoolBackend:
    """In-process stand-in for the scheduler: N slots per pool, FIFO queue, deadline.

    Places by calling ``server.on_placed`` on the next loop iteration (as an
    asynchronous scheduler would), refuses at ``max_wait_s``, gives a released
    slot to the oldest queued call.
    """

    def __init__(self, capacity: dict[str, int]) -> None:
        self.server: SipServer | None = None
        self.free = dict(capacity)
        self.queues: dict[str, deque[str]] = {p: deque() for p in capacity}
        self.pool_of: dict[str, str] = {}
        self.deadlines: dict[str, asyncio.TimerHandle] = {}
        self.held: dict[str, str] = {}
        self.requested: list[str] = []
        self.refused: list[str] = []
        self.cancelled: list[tuple[str, str]] = []
        self.released: list[tuple[str, str]] = []
        self.finals: list[tuple[str, int]] = []
        self.changed = asyncio.Event()  # set after every backend event
        self._jobs = 0

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        self.requested.append(call_ref)
        self.changed.set()
        self.pool_of[call_ref] = pool
        if self.free.get(pool, 0) > 0:
            self._place(call_ref)
            return
        self.queues.setdefault(pool, deque()).append(call_ref)
        loop = asyncio.get_running_loop()
        self.deadlines[call_ref] = loop.call_later(max_wait_s, self._expire, call_ref)

    def _place(self, call_ref: str) -> None:
        pool = self.pool_of[call_ref]
        self.free[pool] -= 1
        self._jobs += 1
        job = f"job-{self._jobs}"
        self.held[call_ref] = job
        asyncio.get_running_loop().call_soon(self._tell_placed, call_ref, job)

    def _tell_placed(self, call_ref: str, job: str) -> None:
        assert self.server is not None
        self.server.on_placed(call_ref, job, "w1")
        self.changed.set()

    def _expire(self, call_ref: str) -> None:
        pool = self.pool_of[call_ref]
        self.queues[pool].remove(call_ref)
        del self.deadlines[call_ref]
        self.refused.append(call_ref)
        assert self.server is not None
        self.server.on_refused(call_ref, f"pool {pool!r} has no free slot")
        self.changed.set()

    def cancel(self, call_ref: str, reason: str) -> None:
        self.cancelled.append((call_ref, reason))
        self.changed.set()
        handle = self.deadlines.pop(call_ref, None)
        if handle is not None:
            handle.cancel()
            self.queues[self.pool_of[call_ref]].remove(call_ref)

    def release(self, call_ref: str, outcome: str) -> None:
        self.released.append((call_ref, outcome))
        self.changed.set()
        if self.held.pop(call_ref, None) is None:
            return
        pool = self.pool_of[call_ref]
        self.free[pool] += 1
        if self.queues[pool]:
            nxt = self.queues[pool].popleft()
            self.deadlines.pop(nxt).cancel()
            self._place(nxt)

    def final_sent(self, call_ref: str, status: int) -> None:
        self.finals.append((call_ref, status))

    def has_capacity(self, pool: str) -> bool:
        return self.free.get(pool, 0) > 0


async def until(predicate: Callable[[], bool], changed: asyncio.Event, within: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, re-checking whenever ``changed`` is set."""
    async with asyncio.timeout(within):
        while not predicate():
            changed.clear()
            await changed.wait()


class UdpEndpoint(asyncio.DatagramProtocol):
    """A UDP socket on 127.0.0.1 (or another loopback address) that queues what it
    receives, parsed, and counts the bytes it sends and receives."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[SipRequest | SipResponse, float]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.host = "127.0.0.1"
        self.bytes_in = self.bytes_out = self.received = 0
        self._held: list[SipRequest | SipResponse] = []

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> UdpEndpoint:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # floods of replies
        proto.host = host
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.bytes_in += len(data)
        self.received += 1
        self.inbox.put_nowait((parse_message(data), asyncio.get_running_loop().time()))

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.bytes_out += len(data)
        self.transport.sendto(data, ("127.0.0.1", port))

    async def recv_where(
        self, pred: Callable[[SipRequest | SipResponse], bool], within: float = 3.0
    ) -> SipRequest | SipResponse:
        """The first message (held back earlier, or arriving) for which ``pred``
        holds; others are held for later calls."""
        for i, msg in enumerate(self._held):
            if pred(msg):
                return self._held.pop(i)
        async with asyncio.timeout(within):
            while True:
                msg, _ = await self.inbox.get()
                if pred(msg):
                    return msg
                self._held.append(msg)

    async def recv(self, within: float = 3.0) -> SipRequest | SipResponse:
        """The next message received, waiting at most ``within`` seconds."""
        async with asyncio.timeout(within):
            msg, _ = await self.inbox.get()
        return msg

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()
