"""Issue 9's SIP findings as attacks on a real SipServer (127.0.0.1 sockets), each with a
bystander call from a listed caller that must keep working through it.

Addresses: the server, the listed caller and the downstream gateway use 127.0.0.1;
the attacker sends from 127.0.0.2 and the victim of a relay listens on 127.0.0.3
(Linux routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from sip.sipkit import PoolBackend, UdpEndpoint, answer, invite, request_like, until

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import parse_sip_config
from trunkline.sip.message import SipRequest, SipResponse
from trunkline.sip.transaction import TimerConfig

ATTACKER, VICTIM = "127.0.0.2", "127.0.0.3"
# What a PBX offers (sipp's default audio offer): INVITEs are this size, not 300 bytes.
SDP = (
    b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.2\r\ns=-\r\n"
    b"c=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
)
Message = SipRequest | SipResponse


@dataclass
class Rig:
    server: SipServer
    backend: PoolBackend
    caller: UdpEndpoint
    gateway: UdpEndpoint
    attacker: UdpEndpoint

    async def close(self) -> None:
        await self.server.close()
        for ep in (self.caller, self.gateway, self.attacker):
            ep.close()


async def make_rig(
    *,
    capacity: int = 2,
    trunk: Mapping[str, Any] | None = None,
    sip: Mapping[str, Any] | None = None,
    timers: TimerConfig | None = None,
) -> Rig:
    gateway = await UdpEndpoint.open()
    caller = await UdpEndpoint.open()
    attacker = await UdpEndpoint.open(ATTACKER)
    t: dict[str, Any] = {
        "numbers": ["*"],
        "pool": "support",
        "max_wait_s": 0.5,
        "downstream": f"127.0.0.1:{gateway.port}",
        "allowed_addresses": ["127.0.0.1"],
    }
    t.update(trunk or {})
    t = {k: v for k, v in t.items() if v is not None}  # None: leave the key out
    config = parse_sip_config(
        {"host": "127.0.0.1", "port": 0, **(sip or {}), "trunks": {"support": t}}
    )
    backend = PoolBackend({"support": capacity})
    server = SipServer(config, backend, timers=timers)
    backend.server = server
    await server.start()
    return Rig(server, backend, caller, gateway, attacker)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig()
    yield r
    await r.close()


def of_call(call_id: str, *, method: str | None = None, status: int | None = None) -> Any:
    def pred(m: Message) -> bool:
        if m.headers.get("Call-ID") != call_id:
            return False
        if method is not None:
            return isinstance(m, SipRequest) and m.method == method
        return status is None or (isinstance(m, SipResponse) and m.status == status)

    return pred


async def answered_call(rig: Rig, call_id: str) -> SipRequest:
    """A call from the listed caller, placed and answered 200 and ACKed; the INVITE the
    gateway got."""
    me = {"host": "127.0.0.1", "port": rig.caller.port}
    rig.caller.send(invite(branch=f"z9hG4bK{call_id}", call_id=call_id, **me), rig.server.port)
    fwd = await rig.gateway.recv_where(of_call(call_id, method="INVITE"))
    assert isinstance(fwd, SipRequest)
    rig.gateway.send(answer(fwd, 200, "OK"), rig.server.port)
    await rig.caller.recv_where(of_call(call_id, status=200))
    ack = request_like("ACK", branch=f"z9hG4bKa{call_id}", call_id=call_id, to_tag="gw1", **me)
    rig.caller.send(ack, rig.server.port)
    await rig.gateway.recv_where(of_call(call_id, method="ACK"))
    return fwd


async def hang_up(rig: Rig, call_id: str) -> None:
    """The caller's BYE goes through and its slot is released."""
    me = {"host": "127.0.0.1", "port": rig.caller.port}
    bye = request_like(
        "BYE", branch=f"z9hG4bKb{call_id}", call_id=call_id, cseq=2, to_tag="gw1", **me
    )
    before = len(rig.backend.released)
    rig.caller.send(bye, rig.server.port)
    bye_fwd = await rig.gateway.recv_where(of_call(call_id, method="BYE"))
    assert isinstance(bye_fwd, SipRequest)
    rig.gateway.send(answer(bye_fwd, 200, "OK"), rig.server.port)
    await rig.caller.recv_where(of_call(call_id, status=200))
    await until(lambda: len(rig.backend.released) > before, rig.backend.changed)


async def bystander(rig: Rig, call_id: str) -> None:
    """A whole call from the listed caller: placed, answered, hung up, slot freed."""
    await answered_call(rig, call_id)
    await hang_up(rig, call_id)


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (for counters the test cannot await)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - server counters have no event to await
            await asyncio.sleep(0.01)


# -- allowed_addresses -------------------------------------------------------


async def test_unlisted_source_is_refused_403_and_takes_no_slot(rig: Rig) -> None:
    """Finding: INVITEs from any address were placed. Now an unlisted address gets one
    403 per INVITE and no job, while the listed caller's call goes through."""
    for n in range(50):
        rig.attacker.send(
            invite(branch=f"z9hG4bKx{n}", call_id=f"x{n}", host=ATTACKER, port=rig.attacker.port),
            rig.server.port,
        )
    await bystander(rig, "bystander-1")
    await wait_for(lambda: rig.attacker.received >= 50)
    statuses = {(await rig.attacker.recv()).status for _ in range(50)}  # type: ignore[union-attr]
    assert statuses == {403}
    assert len(rig.backend.requested) == 1  # the bystander only
    assert rig.server.edge.stats.forbidden == 50
    assert rig.attacker.bytes_in <= rig.attacker.bytes_out


# -- open relay ---------------------------------------------------------------


async def test_forged_responses_are_never_relayed_to_a_victim(rig: Rig) -> None:
    """Finding: a response with our branch prefix and a victim in the second Via was
    relayed to the victim over UDP or a new TCP connection. Now neither the victim's UDP
    socket nor its TCP listener hears anything, even with a live call's real branch."""
    victim_udp = await UdpEndpoint.open(VICTIM)
    accepted: list[str] = []

    async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append("connection")
        writer.close()

    victim_tcp = await asyncio.start_server(on_connect, VICTIM, 0)
    tcp_port = victim_tcp.sockets[0].getsockname()[1]
    try:
        me = {"host": "127.0.0.1", "port": rig.caller.port}
        rig.caller.send(invite(branch="z9hG4bKlive", call_id="live", **me), rig.server.port)
        fwd = await rig.gateway.recv_where(of_call("live", method="INVITE"))
        assert isinstance(fwd, SipRequest)
        live_branch = (fwd.headers.get("Via") or "").split("branch=")[1].split(";")[0]
        for n, (branch, via) in enumerate(
            [
                ("z9hG4bKtl.abc.1", f"SIP/2.0/UDP {VICTIM}:{victim_udp.port}"),
                ("z9hG4bKtl.s.0123", f"SIP/2.0/TCP {VICTIM}:{tcp_port}"),
                (live_branch, f"SIP/2.0/UDP {VICTIM}:{victim_udp.port}"),
                (live_branch, f"SIP/2.0/TCP {VICTIM}:{tcp_port}"),
            ]
        ):
            forged = (
                "SIP/2.0 200 OK\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{rig.server.port};branch={branch}\r\n"
                f"Via: {via};rport;branch=z9hG4bKv{n}\r\n"
                "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: live\r\n"
                f"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            rig.attacker.send(forged, rig.server.port)
        # The real answer still completes the call; the bystander runs after it.
        rig.gateway.send(answer(fwd, 200, "OK"), rig.server.port)
        ok = await rig.caller.recv_where(of_call("live", status=200))
        assert "tag=gw1" in (ok.headers.get("To") or "")
        await bystander(rig, "bystander-2")
        assert victim_udp.received == 0
        assert accepted == []
        assert rig.server.edge.stats.stray >= 4
        assert rig.server.edge.stats.unsendable == 0  # nothing was even attempted
    finally:
        victim_udp.close()
        victim_tcp.close()
        await victim_tcp.wait_closed()


# -- in-dialog requests from a third address ---------------------------------------


async def test_bye_from_a_third_address_does_not_end_the_call() -> None:
    """Finding: a BYE from a third address ended someone else's call. Now it gets 403,
    the gateway never sees it, the slot stays held, and the caller's BYE still works.
    The third address is itself listed (another caller of the same trunk): only the
    call's own hops may act in its dialog."""
    rig = await make_rig(trunk={"allowed_addresses": ["127.0.0.1", ATTACKER]})
    try:
        await third_party_bye(rig)
    finally:
        await rig.close()


async def third_party_bye(rig: Rig) -> None:
    await answered_call(rig, "victim-call")
    evil = request_like(
        "BYE",
        branch="z9hG4bKevil",
        call_id="victim-call",
        cseq=2,
        to_tag="gw1",
        host=ATTACKER,
        port=rig.attacker.port,
    )
    rig.attacker.send(evil, rig.server.port)
    refused = await rig.attacker.recv()
    assert isinstance(refused, SipResponse)
    assert refused.status == 403
    await bystander(rig, "bystander-3")
    assert rig.backend.released == [(rig.backend.requested[1], "caller_bye")]  # bystander's
    assert rig.server.edge.pending_calls() == 1
    await hang_up(rig, "victim-call")
    assert rig.server.edge.pending_calls() == 0
    assert rig.server.edge.stats.foreign_hop == 1


# -- never-ACKed floods -----------------------------------------------------------


async def test_never_acked_flood_from_an_unlisted_source_is_not_amplified(rig: Rig) -> None:
    """Finding: 5,000 never-ACKed INVITEs drew ~15x their bytes in replies. From an
    unlisted source now: at most one small reply per INVITE, most dropped by the rate
    limit, no retransmission, no transaction, no slot; the bystander call still works."""
    body = invite(branch="z9hG4bKf", call_id="f", host=ATTACKER, port=rig.attacker.port)
    for n in range(5000):
        rig.attacker.send(body.replace(b"z9hG4bKf", f"z9hG4bKf{n}".encode()), rig.server.port)
        if n % 500 == 0:
            await asyncio.sleep(0)  # let the server read its socket
    await bystander(rig, "bystander-4")
    await wait_for(lambda: rig.server.edge.stats.datagrams >= 5000 + 5, within=10)
    stats = rig.server.edge.stats
    assert stats.rate_limited >= 5000 - 200 - 100
    assert rig.attacker.bytes_in <= 0.2 * rig.attacker.bytes_out
    assert len(rig.server.edge.layer) == 0 or rig.server.edge.layer.retransmitting() == 0
    assert len(rig.backend.requested) == 1


async def test_never_acked_refusals_retransmit_within_the_global_budget() -> None:
    """An open trunk (the old, insecure default): refusals to 2,000 never-ACKed INVITEs
    still get the 100 and the final RFC 3261 requires, but Timer G runs for at most
    max_retransmitting of them at once, so the replies stay near the bytes received
    (was ~15x)."""
    r = await make_rig(
        capacity=1,
        trunk={"allowed_addresses": None, "max_wait_s": 0},
        sip={"invite_rate_per_source": 0, "max_retransmitting": 20},
        # Timer H (64*T1 = 3.2 s) outlasts the flood: one budget's worth of Timer G.
        timers=TimerConfig(t1=0.05, t2=0.4, t4=0.5),
    )
    try:
        body = invite(branch="z9hG4bKf", call_id="f", host=ATTACKER, port=r.attacker.port, body=SDP)
        await answered_call(r, "held")  # the only slot is taken: every flood call is refused
        for n in range(2000):
            data = body.replace(b"z9hG4bKf", f"z9hG4bKf{n}".encode()).replace(
                b"Call-ID: f", f"Call-ID: f{n}".encode()
            )
            r.attacker.send(data, r.server.port)
            if n % 200 == 0:
                await asyncio.sleep(0)
        await wait_for(lambda: r.server.edge.stats.refused >= 2000, within=15)
        await wait_for(lambda: r.server.edge.layer.retransmitting() == 0, within=10)
        await wait_for(
            lambda: r.attacker.received >= sum(r.server.edge.stats.responses.values()) - 2
        )
        # One 100 and one 503 per INVITE; Timer G resends only within the budget.
        assert r.attacker.received <= 2 * 2000 + 20 * 10
        assert r.attacker.bytes_in <= 1.2 * r.attacker.bytes_out
        assert r.server.edge.layer.unretransmitted >= 1000
        await hang_up(r, "held")
        await bystander(r, "bystander-5")
    finally:
        await r.close()


# -- calls whose BYE never comes ------------------------------------------------------


async def test_a_call_whose_bye_never_comes_is_ended_and_frees_its_slot() -> None:
    """Finding: calls whose downstream never sent BYE held their slots forever. With
    max_call_duration_s, both sides get a BYE and the slot goes to the next call."""
    r = await make_rig(capacity=1, trunk={"max_call_duration_s": 0.5})
    try:
        await answered_call(r, "forever")
        down = await r.gateway.recv_where(of_call("forever", method="BYE"))
        up = await r.caller.recv_where(of_call("forever", method="BYE"))
        assert "max_call_duration_s=0.5" in (down.headers.get("Reason") or "")
        assert isinstance(up, SipRequest)
        await until(lambda: r.backend.released != [], r.backend.changed)
        assert r.backend.released == [(r.backend.requested[0], "max_call_duration")]
        r.gateway.send(answer(down, 200, "OK"), r.server.port)  # type: ignore[arg-type]
        await answered_call(r, "next")  # the single slot is free again
        await hang_up(r, "next")
    finally:
        await r.close()


# -- stream limits -------------------------------------------------------------------


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    data = b""
    async with asyncio.timeout(within):
        while chunk := await reader.read(4096):
            data += chunk
    return data


async def test_idle_and_dribbling_tcp_connections_are_closed() -> None:
    """A silent connection and one dribbling a byte at a time are closed after
    tcp_idle_timeout_s; one sending CRLF keep-alives gets pongs and stays open."""
    r = await make_rig(sip={"tcp_idle_timeout_s": 1})
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", r.server.port)
        drip_r, drip_w = await asyncio.open_connection("127.0.0.1", r.server.port)
        ping_r, ping_w = await asyncio.open_connection("127.0.0.1", r.server.port)

        async def drip() -> None:
            for ch in b"OPTIONS sip:x@y SIP/2.0\r\n":
                if drip_w.is_closing():
                    return
                drip_w.write(bytes([ch]))
                await asyncio.sleep(0.1)

        async def ping() -> bytes:
            pongs = b""
            for _ in range(6):
                ping_w.write(b"\r\n\r\n")
                pongs += await asyncio.wait_for(ping_r.read(2), 1)
                await asyncio.sleep(0.3)
            return pongs

        dripping = asyncio.ensure_future(drip())
        pinging = asyncio.ensure_future(ping())
        assert await read_until_closed(silent_r, 3) == b""
        assert await read_until_closed(drip_r, 3) == b""
        assert 0.9 <= loop.time() - start <= 2.5
        assert await pinging == b"\r\n" * 6  # 1.8 s alive on keep-alives alone
        dripping.cancel()
        ping_w.write(request_like("OPTIONS", branch="z9hG4bKp", host="127.0.0.1"))
        assert (await asyncio.wait_for(ping_r.read(4096), 2)).startswith(b"SIP/2.0 200")
        assert r.server.edge.stats.tcp_idle_closed >= 2
        for w in (silent_w, drip_w, ping_w):
            w.close()
        await bystander(r, "bystander-6")
    finally:
        await r.close()


async def test_tcp_connections_per_source_are_capped() -> None:
    """Beyond max_tcp_connections_per_source, a new connection is closed at once; the
    ones within the cap keep working, and so does the bystander call over UDP."""
    r = await make_rig(sip={"max_tcp_connections_per_source": 3})
    try:
        conns = [await asyncio.open_connection("127.0.0.1", r.server.port) for _ in range(3)]
        await wait_for(lambda: r.server.connections() == 3)
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", r.server.port)
        assert await read_until_closed(extra_r, 2) == b""
        assert r.server.edge.stats.tcp_refused == 1
        reader, writer = conns[0]
        writer.write(request_like("OPTIONS", branch="z9hG4bKq", host="127.0.0.1"))
        assert (await asyncio.wait_for(reader.read(4096), 2)).startswith(b"SIP/2.0 200")
        await bystander(r, "bystander-7")
        for _, w in [*conns, (extra_r, extra_w)]:
            w.close()
    finally:
        await r.close()


async def test_an_open_trunk_is_warned_about_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """A trunk with neither allowed_addresses nor auth logs a warning naming it and the
    fix when the server starts; a trunk with either does not."""
    caplog.set_level("WARNING", logger="trunkline.sip")
    for trunk, warned in (({"allowed_addresses": None}, True), ({}, False)):
        caplog.clear()
        r = await make_rig(trunk=trunk)
        await r.close()
        records = [
            rec for rec in caplog.records if rec.msg == "sip trunk takes calls from any source"
        ]
        assert bool(records) is warned
        if warned:
            assert getattr(records[0], "trunk", None) == "support"
            assert "allowed_addresses" in getattr(records[0], "fix", "")
