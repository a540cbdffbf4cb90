"""SipServer on real 127.0.0.1 sockets (UDP and TCP) with an in-process pool backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sip.sipkit import PoolBackend, UdpEndpoint, answer, invite, request_like, until

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import parse_sip_config
from trunkline.sip.message import SipRequest, SipResponse, StreamFramer, parse_message


@dataclass
class Rig:
    server: SipServer
    backend: PoolBackend
    caller: UdpEndpoint
    gateway: UdpEndpoint


async def make_rig(capacity: int, max_wait_s: float, refusal: int = 503) -> Rig:
    gateway = await UdpEndpoint.open()
    caller = await UdpEndpoint.open()
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "trunks": {
                "support": {
                    "numbers": ["*"],
                    "pool": "support",
                    "max_wait_s": max_wait_s,
                    "downstream": f"127.0.0.1:{gateway.port}",
                    "refusal": refusal,
                    "retry_after_s": 3,
                }
            },
        }
    )
    backend = PoolBackend({"support": capacity})
    server = SipServer(config, backend)
    backend.server = server
    await server.start()
    return Rig(server, backend, caller, gateway)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig(capacity=1, max_wait_s=0.3)
    yield r
    await r.server.close()
    r.caller.close()
    r.gateway.close()


def caller_invite(rig: Rig, n: int) -> bytes:
    return invite(
        branch=f"z9hG4bKc{n}", call_id=f"call-{n}", port=rig.caller.port, host="127.0.0.1"
    )


async def test_call_is_placed_forwarded_answered_and_hung_up(rig: Rig) -> None:
    """INVITE → 100 → forwarded with job headers → 200 relayed → ACK and BYE relayed → released."""
    rig.caller.send(caller_invite(rig, 1), rig.server.port)
    trying = await rig.caller.recv()
    assert isinstance(trying, SipResponse)
    assert trying.status == 100
    fwd = await rig.gateway.recv()
    assert isinstance(fwd, SipRequest)
    assert fwd.headers.get("X-Trunkline-Job") == "job-1"
    rig.gateway.send(answer(fwd, 200, "OK"), rig.server.port)
    ok = await rig.caller.recv()
    assert isinstance(ok, SipResponse)
    assert ok.status == 200
    route = ok.headers.get("Record-Route")
    me = {"host": "127.0.0.1", "port": rig.caller.port}
    ack = request_like("ACK", branch="z9hG4bKa1", call_id="call-1", to_tag="gw1", route=route, **me)
    rig.caller.send(ack, rig.server.port)
    assert getattr(await rig.gateway.recv(), "method", None) == "ACK"
    bye = request_like("BYE", branch="z9hG4bKb1", call_id="call-1", cseq=2, to_tag="gw1", **me)
    rig.caller.send(bye, rig.server.port)
    bye_fwd = await rig.gateway.recv()
    assert isinstance(bye_fwd, SipRequest)
    rig.gateway.send(answer(bye_fwd, 200, "OK"), rig.server.port)
    assert getattr(await rig.caller.recv(), "status", None) == 200
    await until(lambda: rig.backend.released != [], rig.backend.changed)
    assert rig.backend.released == [(rig.backend.requested[0], "caller_bye")]
    assert rig.server.edge.pending_calls() == 0


async def test_full_pool_refuses_within_max_wait_and_retransmits_until_ack(rig: Rig) -> None:
    """With the slot taken, the next call gets 503 + Retry-After within max_wait + 100 ms."""
    rig.caller.send(caller_invite(rig, 1), rig.server.port)
    await rig.gateway.recv()  # first call placed
    loop = asyncio.get_running_loop()
    start = loop.time()
    rig.caller.send(caller_invite(rig, 2), rig.server.port)
    statuses: list[int] = []
    while not statuses or statuses[-1] < 200:
        msg = await rig.caller.recv()
        assert isinstance(msg, SipResponse)
        if msg.headers.get("Call-ID") == "call-2":
            statuses.append(msg.status)
    assert statuses == [100, 503]
    assert loop.time() - start <= 0.3 + 0.1
    assert msg.headers.get("Retry-After") == "3"
    again = await rig.caller.recv(within=1.0)  # Timer G retransmission
    assert getattr(again, "status", None) == 503
    tag = (msg.headers.get("To") or "").split("tag=")[1]
    ack = request_like(
        "ACK",
        branch="z9hG4bKc2",
        call_id="call-2",
        to_tag=tag,
        host="127.0.0.1",
        port=rig.caller.port,
    )
    rig.caller.send(ack, rig.server.port)
    assert rig.backend.refused == [rig.backend.requested[1]]
    assert rig.server.edge.pending_calls() == 1  # only the placed call holds a slot


async def test_cancel_frees_a_queued_place_and_a_released_slot_goes_to_the_next() -> None:
    """A queued call's CANCEL gives 200 + 487; a released slot goes to the next queued call."""
    rig = await make_rig(capacity=1, max_wait_s=5.0)
    try:
        for n in (1, 2, 3):
            rig.caller.send(caller_invite(rig, n), rig.server.port)
        first = await rig.gateway.recv()
        assert isinstance(first, SipRequest)
        assert first.headers.get("Call-ID") == "call-1"
        cancel = request_like(
            "CANCEL", branch="z9hG4bKc2", call_id="call-2", host="127.0.0.1", port=rig.caller.port
        )
        rig.caller.send(cancel, rig.server.port)
        await until(lambda: len(rig.backend.cancelled) == 1, rig.backend.changed)
        rig.gateway.send(answer(first, 486, "Busy Here"), rig.server.port)
        nxt = await rig.gateway.recv()  # the hop-by-hop ACK for the 486 comes first
        while getattr(nxt, "method", None) != "INVITE":
            nxt = await rig.gateway.recv()
        assert nxt.headers.get("Call-ID") == "call-3"
        finals = set()
        while len(finals) < 3:
            msg = await rig.caller.recv()
            assert isinstance(msg, SipResponse)
            if msg.status >= 200:
                finals.add((msg.headers.get("Call-ID"), msg.status, msg.headers.get("CSeq")))
        assert finals == {
            ("call-2", 200, "1 CANCEL"),
            ("call-2", 487, "1 INVITE"),
            ("call-1", 486, "1 INVITE"),
        }
        assert len(rig.backend.requested) == 3
    finally:
        await rig.server.close()
        rig.caller.close()
        rig.gateway.close()


async def test_tcp_caller_gets_answers_on_its_connection(rig: Rig) -> None:
    """Over TCP the INVITE is framed, answered 100 on the same connection, and forwarded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.server.port)
    port = writer.get_extra_info("sockname")[1]
    writer.write(invite(transport="TCP", host="127.0.0.1", port=port, call_id="tcp-1"))
    framer = StreamFramer()
    async with asyncio.timeout(3):
        frame = None
        while frame is None:
            framer.feed(await reader.read(4096))
            frame = framer.next_frame()
    trying = parse_message(frame, stream=True)
    assert isinstance(trying, SipResponse)
    assert trying.status == 100
    fwd = await rig.gateway.recv()
    assert fwd.headers.get("Call-ID") == "tcp-1"
    writer.write(b"garbage without framing\r\n\r\n")  # unframeable: connection closed
    async with asyncio.timeout(3):
        while await reader.read(4096):
            pass
    writer.close()
    rig.caller.send(request_like("OPTIONS", branch="z9hG4bKo"), rig.server.port)
    assert getattr(await rig.caller.recv(), "status", None) in (200, 503)


async def test_tcp_downstream_gets_the_invite_and_its_answer_is_relayed() -> None:
    """With downstream_transport=tcp the edge connects out, sends a TCP Via, relays the 200."""
    got: asyncio.Queue[tuple[SipRequest, asyncio.StreamWriter]] = asyncio.Queue()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        while data := await reader.read(4096):
            framer.feed(data)
            while (frame := framer.next_frame()) is not None:
                msg = parse_message(frame, stream=True)
                if isinstance(msg, SipRequest):
                    got.put_nowait((msg, writer))

    listener = await asyncio.start_server(gateway, "127.0.0.1", 0)
    gw_port = listener.sockets[0].getsockname()[1]
    caller = await UdpEndpoint.open()
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "trunks": {
                "t": {
                    "numbers": ["*"],
                    "pool": "p",
                    "downstream": f"127.0.0.1:{gw_port}",
                    "downstream_transport": "tcp",
                }
            },
        }
    )
    backend = PoolBackend({"p": 1})
    server = SipServer(config, backend)
    backend.server = server
    await server.start()
    try:
        caller.send(invite(branch="z9hG4bKt1", host="127.0.0.1", port=caller.port), server.port)
        async with asyncio.timeout(3):
            fwd, writer = await got.get()
        assert (fwd.headers.get("Via") or "").startswith("SIP/2.0/TCP ")
        writer.write(answer(fwd, 200, "OK"))
        statuses = [getattr(await caller.recv(), "status", None) for _ in range(2)]
        assert statuses == [100, 200]
        writer.close()
    finally:
        await server.close()
        caller.close()
        listener.close()
        await listener.wait_closed()
