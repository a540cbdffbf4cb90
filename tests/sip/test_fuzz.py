"""Hypothesis fuzzing: mutated SIP at the parser, the sans-IO edge and the live listener."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sip.sipkit import CALLER, DOWNSTREAM, FakeBackend, PoolBackend, answer, invite, make_edge
from sip.sipkit import request_like as req

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import SipEdge, TimerConfig, parse_sip_config
from trunkline.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    StreamFramer,
    parse_message,
)

T = TypeVar("T")

BASES = [
    invite(),
    invite(branch="z9hG4bKinv2", call_id="call-2", user="+15550199"),
    invite(extra="Route: <sip:10.0.0.5:5060;lr>\r\nv: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKx\r\n"),
    req("CANCEL"),
    req("ACK", to_tag="x"),
    req("BYE", to_tag="gw1", cseq=2, branch="z9hG4bKbye"),
    req("OPTIONS", branch="z9hG4bKopt"),
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKtl.x.1\r\n"
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: z\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n",
]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2000), st.integers(1, 200)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("truncate"), st.integers(0, 2000), st.just(0)),
    st.tuples(
        st.just("token"),
        st.integers(0, 2000),
        st.sampled_from(
            [b"\r\n", b"\r\n ", b":", b";", b",", b"<", b">", b'"', b"\\", b"\x00", b"99999999999"]
        ),
    ),
)


def mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    """Apply byte-level mutations at positions wrapped into the message length."""
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        at = pos % (len(buf) + 1)
        if kind == "flip" and buf:
            buf[at % len(buf)] ^= arg
        elif kind == "cut":
            del buf[at : at + arg]
        elif kind in ("insert", "token"):
            buf[at:at] = arg
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


mutated = st.one_of(
    st.builds(mutate, st.sampled_from(BASES), st.lists(mutation, min_size=1, max_size=4)),
    st.binary(max_size=300),
)

# Well-formed traffic for three calls, so the fuzzer reaches every call state.
call_ids = st.sampled_from(["a", "b", "c"])
valid = st.one_of(
    st.builds(lambda i: invite(branch=f"z9hG4bK{i}", call_id=i, from_tag=i), call_ids),
    st.builds(lambda i: req("CANCEL", branch=f"z9hG4bK{i}", call_id=i, from_tag=i), call_ids),
    st.builds(
        lambda i: req("BYE", branch=f"z9hG4bKb{i}", call_id=i, from_tag=i, cseq=2, to_tag="gw1"),
        call_ids,
    ),
    st.just(req("OPTIONS", branch="z9hG4bKopt")),
)
traffic = st.one_of(
    valid, st.builds(mutate, valid, st.lists(mutation, min_size=1, max_size=2)), mutated
)


@settings(max_examples=400, deadline=None)
@given(mutated)
def test_parser_raises_only_sip_parse_error(data: bytes) -> None:
    """Any bytes either parse or raise SipParseError; parsed messages re-serialize and re-parse."""
    for stream in (False, True):
        try:
            msg = parse_message(data, stream=stream)
        except SipParseError:
            continue
        again = parse_message(msg.to_bytes(), stream=True)
        assert type(again) is type(msg)


@settings(max_examples=200, deadline=None)
@given(st.lists(mutated, max_size=5), st.integers(1, 50))
def test_stream_framer_never_raises_anything_else(chunks: list[bytes], step: int) -> None:
    """The TCP framer yields frames or raises SipParseError, whatever the stream holds."""
    framer = StreamFramer(max_bytes=4096)
    data = b"".join(chunks)
    try:
        for i in range(0, len(data), step):
            framer.feed(data[i : i + step])
            while (frame := framer.next_frame()) is not None:
                assert frame
    except SipParseError:
        pass


send = st.tuples(st.just("msg"), traffic, st.floats(0, 3))
action = st.one_of(
    send,
    send,
    send,
    st.tuples(st.just("place"), st.integers(0, 10), st.just(0.0)),
    st.tuples(st.just("ack"), st.integers(0, 10), st.floats(0, 1)),
    st.tuples(st.just("place"), st.integers(0, 10), st.just(0.0)),
    st.tuples(st.just("refuse"), st.integers(0, 10), st.just(0.0)),
    st.tuples(st.just("answer"), st.sampled_from([100, 180, 200, 486, 487, 503]), st.just(0.0)),
    st.tuples(st.just("tick"), st.just(0), st.floats(0, 40)),
)


def pick(items: list[T], index: int) -> T | None:
    return items[index % len(items)] if items else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=3, max_size=40))
def test_edge_never_raises_and_never_leaks_a_slot(actions: list[tuple[str, Any, float]]) -> None:
    """Mutated traffic plus random decisions: no exception, and once idle no slot is held."""
    drive(actions)


def random_walk(seed: int, steps: int) -> list[tuple[str, Any, float]]:
    """A long deterministic action sequence (hypothesis keeps its lists short)."""
    rnd = random.Random(seed)
    out: list[tuple[str, Any, float]] = []
    for _ in range(steps):
        roll = rnd.random()
        if roll < 0.5:
            i = rnd.choice("abcd")
            method = rnd.choice(["INVITE", "INVITE", "CANCEL", "BYE"])
            if method == "INVITE":
                data = invite(branch=f"z9hG4bK{i}", call_id=i, from_tag=i)
            elif method == "CANCEL":
                data = req("CANCEL", branch=f"z9hG4bK{i}", call_id=i, from_tag=i)
            else:
                data = req(
                    "BYE", branch=f"z9hG4bKb{i}", call_id=i, from_tag=i, cseq=2, to_tag="gw1"
                )
            if rnd.random() < 0.2:
                muts = [
                    (
                        rnd.choice(["flip", "cut", "truncate"]),
                        rnd.randrange(2000),
                        rnd.randrange(1, 9),
                    )
                ]
                data = mutate(data, muts)
            out.append(("msg", data, rnd.choice([0.0, 0.01, 0.5, 2.0])))
        elif roll < 0.65:
            out.append((rnd.choice(["place", "refuse"]), rnd.randrange(10), 0.0))
        elif roll < 0.8:
            out.append(("answer", rnd.choice([100, 180, 200, 200, 486, 487]), 0.0))
        elif roll < 0.9:
            out.append(("ack", rnd.randrange(10), 0.1))
        else:
            out.append(("tick", 0, rnd.choice([0.5, 3.0, 40.0])))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_edge_random_walk_never_leaks_a_slot(seed: int) -> None:
    """Long seeded walks through every call state: no exception, no held slot once idle."""
    edge = drive(random_walk(seed, 150))
    assert edge.stats.invites > 0


def drive(actions: list[tuple[str, Any, float]]) -> SipEdge:
    """Run actions against a fresh edge, end every job, run the clock out, check invariants."""
    edge, backend = make_edge(max_wait_s=1.0)
    now = 0.0
    forwarded: list[SipRequest] = []
    finals: list[SipResponse] = []

    def collect() -> None:
        for out in edge.take_outgoing():
            msg = parse_message(out.data)
            if isinstance(msg, SipRequest) and msg.method == "INVITE":
                forwarded.append(msg)
            elif isinstance(msg, SipResponse) and msg.status >= 300:
                finals.append(msg)

    for kind, arg, dt in actions:
        now += dt
        if kind == "msg":
            edge.receive(arg, CALLER, now)
        elif kind in ("place", "refuse") and (ref := pick(sorted(backend.open), arg)):
            if kind == "place":
                backend.place(ref, now)
            else:
                backend.refuse(ref, "fuzz", now)
        elif kind == "ack" and (final := pick(finals, arg)) is not None:
            edge.receive(ack_for(final), CALLER, now)
        elif kind == "answer" and (fwd := pick(forwarded, -1)) is not None:
            edge.receive(answer(fwd, arg, "Fuzz"), DOWNSTREAM, now)
        elif kind == "tick":
            edge.on_timer(now)
        collect()
    for job in range(1, backend.jobs + 1):  # every agent eventually ends its job
        edge.on_job_ended(f"job-{job}", now)
    while (deadline := edge.next_deadline()) is not None:
        now = max(now, deadline)
        edge.on_timer(now)
        collect()
        assert now < 10_000
    assert edge.stats.internal_errors == 0
    assert edge.pending_calls() == 0
    assert len(edge) == 0
    assert len(edge.layer) == 0
    assert_backend_balanced(backend)
    return edge


def ack_for(final: SipResponse) -> bytes:
    """The caller's ACK for a non-2xx final it received."""
    h = final.headers
    via, cseq = h.get("Via") or "", (h.get("CSeq") or "1 X").split()[0]
    return (
        f"ACK sip:+15550100@10.0.0.5 SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
        f"From: {h.get('From')}\r\nTo: {h.get('To')}\r\nCall-ID: {h.get('Call-ID')}\r\n"
        f"CSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def assert_backend_balanced(backend: FakeBackend) -> None:
    """Every request is placed, refused or cancelled; nothing placed stays held by the edge."""
    cancelled = {ref for ref, _ in backend.cancelled}
    assert backend.open <= cancelled


class ThreadedServer:
    """A SipServer running on its own event loop thread, for blocking-socket fuzzing."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.backend = PoolBackend({"support": 2})
        config = parse_sip_config(
            {
                "host": "127.0.0.1",
                "port": 0,
                "tcp": False,
                "trunks": {
                    "support": {
                        "numbers": ["*"],
                        "pool": "support",
                        "max_wait_s": 0.0,
                        "downstream": "127.0.0.1:9",
                    }
                },
            }
        )
        self.server = SipServer(config, self.backend, timers=TimerConfig(t1=0.01, t4=0.05))
        self.backend.server = self.server

    def run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[ThreadedServer, socket.socket]]:
    with (
        ThreadedServer() as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        yield server, sock
        wait_idle(server)


def wait_idle(server: ThreadedServer) -> None:
    """Wait (bounded) until the live edge holds no call; then check nothing leaked."""
    end = time.monotonic() + 10
    while server.run(lambda: len(server.server.edge)) and time.monotonic() < end:
        time.sleep(0.02)  # ok-sleep: polling a condition, bounded by `end`
    edge = server.server.edge
    assert server.run(edge.pending_calls) == 0
    assert server.run(lambda: edge.stats.internal_errors) == 0
    assert server.backend.free == {"support": 2}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(traffic, min_size=1, max_size=8))
def test_live_listener_survives_mutated_datagrams(
    live: tuple[ThreadedServer, socket.socket], datagrams: list[bytes]
) -> None:
    """After any burst of mutated datagrams the UDP listener still answers an OPTIONS probe."""
    server, sock = live
    port = server.server.port
    for data in datagrams:
        sock.sendto(data[:65000], ("127.0.0.1", port))
    me = sock.getsockname()
    probe = req("OPTIONS", branch=f"z9hG4bKprobe{id(datagrams)}", host=me[0], port=me[1])
    sock.sendto(probe, ("127.0.0.1", port))
    while True:
        reply = parse_message(sock.recv(65536))
        if reply.headers.get("CSeq") == "1 OPTIONS" and "probe" in (reply.headers.get("Via") or ""):
            break
    assert getattr(reply, "status", None) in (200, 503)
