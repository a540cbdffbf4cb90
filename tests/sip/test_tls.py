"""SIP over TLS on its own port, with certificates made at test time by the openssl CLI.

Debian's sip-tester (SIPp 3.6.1) is built without OpenSSL ("To use a TLS transport you
must compile SIPp with OpenSSL"), so the TLS caller here is a Python ssl client.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from sip.sipkit import PoolBackend, UdpEndpoint, answer, invite, request_like, until

from trunkline.runtime.sip_server import SipServer
from trunkline.sip import SipConfigError, parse_sip_config
from trunkline.sip.message import SipRequest, SipResponse, StreamFramer, parse_message

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 and its key."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "sip.crt", d / "sip.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


class TlsPeer:
    """A SIP UA on a TLS connection: writes messages, reads whole frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = StreamFramer()
        self.port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def connect(cls, port: int, crt: Path) -> TlsPeer:
        ctx = ssl.create_default_context(cafile=str(crt))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        return cls(reader, writer)

    async def recv(self, within: float = 3.0) -> SipRequest | SipResponse:
        async with asyncio.timeout(within):
            while (frame := self.framer.next_frame()) is None:
                data = await self.reader.read(65536)
                assert data, "connection closed"
                self.framer.feed(data)
        return parse_message(frame, stream=True)


async def test_a_call_over_tls_is_placed_relayed_and_hung_up_by_the_downstream(
    cert: tuple[Path, Path],
) -> None:
    """INVITE over TLS: 100 on the TLS connection, forwarded to the UDP gateway with two
    Record-Routes; the 200 comes back over TLS; the gateway's BYE (routed through both
    entries) reaches the caller over TLS, and the slot is released."""
    crt, key = cert
    gateway = await UdpEndpoint.open()
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "tls_port": 0,
            "tls_cert": str(crt),
            "tls_key": str(key),
            "trunks": {
                "t": {
                    "numbers": ["*"],
                    "pool": "p",
                    "downstream": f"127.0.0.1:{gateway.port}",
                    "allowed_addresses": ["127.0.0.1"],
                }
            },
        }
    )
    backend = PoolBackend({"p": 1})
    server = SipServer(config, backend)
    backend.server = server
    await server.start()
    assert server.tls_port not in (None, 0, server.port)
    try:
        assert server.tls_port is not None
        # A client speaking plain SIP to the TLS port is cut off; the listener stays up.
        r, w = await asyncio.open_connection("127.0.0.1", server.tls_port)
        w.write(invite(transport="TCP"))
        async with asyncio.timeout(12):
            while await r.read(4096):
                pass
        w.close()
        caller = await TlsPeer.connect(server.tls_port, crt)
        caller.writer.write(invite(transport="TLS", host="127.0.0.1", port=caller.port))
        trying = await caller.recv()
        assert isinstance(trying, SipResponse)
        assert trying.status == 100
        fwd = await gateway.recv()
        assert isinstance(fwd, SipRequest)
        rr = fwd.headers.get_all("Record-Route")
        assert rr == [
            f"<sip:127.0.0.1:{server.port};transport=udp;lr>",
            f"<sip:127.0.0.1:{server.tls_port};transport=tls;lr>",
        ]
        gateway.send(answer(fwd, 200, "OK"), server.port)
        ok = await caller.recv()
        assert isinstance(ok, SipResponse)
        assert ok.status == 200
        ack = request_like("ACK", branch="z9hG4bKack", to_tag="gw1", host="127.0.0.1")
        caller.writer.write(ack.replace(b"SIP/2.0/UDP", b"SIP/2.0/TLS"))
        assert getattr(await gateway.recv(), "method", None) == "ACK"
        bye = (
            f"BYE sip:alice@127.0.0.1:{caller.port};transport=tls SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{gateway.port};branch=z9hG4bKgwbye\r\n"
            f"Route: {rr[0]}\r\nRoute: {rr[1]}\r\nMax-Forwards: 70\r\n"
            "From: <sip:+15550100@10.0.0.5>;tag=gw1\r\nTo: <sip:alice@10.0.0.1>;tag=ft1\r\n"
            "Call-ID: call-1@10.0.0.1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        gateway.send(bye, server.port)
        got = await caller.recv()
        assert isinstance(got, SipRequest)
        assert got.method == "BYE"
        assert (got.headers.get("Via") or "").startswith(f"SIP/2.0/TLS 127.0.0.1:{server.tls_port}")
        await until(lambda: backend.released != [], backend.changed)
        assert backend.released == [(backend.requested[0], "downstream_bye")]
        assert server.edge.stats.tls_handshake_failed == 1
        caller.writer.close()
    finally:
        await server.close()
        gateway.close()


async def test_an_unreadable_certificate_is_a_clear_config_error(tmp_path: Path) -> None:
    """A missing certificate or key names both keys and the files at start."""
    config = parse_sip_config(
        {
            "host": "127.0.0.1",
            "port": 0,
            "tls_port": 0,
            "tls_cert": str(tmp_path / "missing.crt"),
            "tls_key": str(tmp_path / "missing.key"),
        }
    )
    server = SipServer(config, PoolBackend({}))
    with pytest.raises(
        SipConfigError, match=r"sip.tls_cert/sip.tls_key: cannot load .*missing.crt"
    ):
        await server.start()
    await server.close()
