"""asyncio adapters for the SIP edge: UDP, TCP and TLS listeners, one timer, the clock.

Theory of operation: :class:`SipServer` owns the sockets and ``loop.time()``.
Every datagram (read up to :data:`UDP_BATCH` at a time per wake-up of the
loop, so a flood costs little more than the reading), and every message a
:class:`~trunkline.sip.message.StreamFramer` cuts from a TCP or TLS stream,
goes into :meth:`SipEdge.receive` with the sender and the current time; then
the edge's outbox is flushed to the network and one timer handle is re-armed
to :meth:`SipEdge.next_deadline`. The backend's answers come in through
:meth:`SipServer.on_placed` / :meth:`on_refused` / :meth:`on_job_ended`,
which do the same. Nothing here decides anything about calls.
:meth:`SipServer.replace_trunks` (a config reload) resolves the host names
of new downstreams, then swaps the edge's trunk table at once.

Streams: responses go back on the connection a request came in on (keyed by
the peer's transport and address). A new outgoing connection is opened only
to a trunk's configured TCP downstream, never to an address a message names,
so the edge can not be made to connect anywhere else; a message for a
stream peer whose connection is gone is dropped and counted. A stream that
cannot be framed is closed; so is one that has carried no complete message
and no CRLF keep-alive (answered with a CRLF pong, RFC 5626) for
``tcp_idle_timeout_s``, one whose peer stops reading (more than
:data:`MAX_WRITE_BUFFER` unsent), and any beyond ``max_tcp_connections`` or
``max_tcp_connections_per_source`` (closed at accept, before a TLS
handshake). TLS (``tls_port``) uses the stdlib :mod:`ssl` module with the
configured certificate chain and key, TLS 1.2 or later, and no client
certificates; the listener keeps running whatever a peer sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Coroutine, Sequence

from trunkline.sip.backend import AdmissionBackend
from trunkline.sip.config import SipConfig, SipConfigError, Trunk, TrunkChanges
from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipParseError, StreamFramer
from trunkline.sip.transaction import Outgoing, Peer, TimerConfig

__all__ = ["MAX_WRITE_BUFFER", "SipServer"]

log = logging.getLogger("trunkline.sip")


UDP_RCVBUF_BYTES = 4 << 20
UDP_BATCH = 64  # datagrams read per readiness event (one epoll wake-up for a burst)
MAX_WRITE_BUFFER = 256 << 10  # unsent bytes after which a stream peer is cut off
TLS_HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


class SipServer:
    """Runs a :class:`SipEdge` on UDP, TCP and/or TLS. Use from one event loop.

    ``start()`` binds the listeners (port 0 picks a free port, the same for UDP
    and TCP; ``tls_port`` 0 another one); ``close()`` stops them. The scheduler
    reports decisions through ``on_placed`` / ``on_refused`` / ``on_job_ended``.
    """

    def __init__(
        self,
        config: SipConfig,
        backend: AdmissionBackend,
        *,
        timers: TimerConfig | None = None,
        decision_grace_s: float = 0.05,
    ) -> None:
        self.config = config
        self.edge = SipEdge(config, backend, timers=timers, decision_grace_s=decision_grace_s)
        self.port = config.port
        self.tls_port: int | None = config.tls_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._tcp: asyncio.Server | None = None
        self._tls: asyncio.Server | None = None
        self._tls_ctx: ssl.SSLContext | None = None
        self._conns: dict[Peer, asyncio.StreamWriter] = {}
        self._per_source: Counter[str] = Counter()
        self._inbound = 0
        self._connecting: dict[Peer, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Bind the configured listeners; raise OSError if a port is taken, or
        SipConfigError if the TLS certificate or key cannot be loaded."""
        self._loop = asyncio.get_running_loop()
        tls = self._tls_context() if self.config.tls_port is not None else None
        host, port = self.config.host, self.config.port
        for attempt in range(5):
            try:
                await self._bind(host, port, tls)
                break
            except OSError:
                await self._close_listeners()
                if port != 0 or attempt == 4:
                    raise
        self.edge.bind(self.port, self.tls_port)
        for name, addresses in (await self._resolve(self.config.trunks)).items():
            self.edge.set_downstream_addresses(name, addresses)
        _warn_open(self.config.trunks)
        log.info("sip listening", extra={"host": host, "port": self.port, "tls": self.tls_port})

    def _tls_context(self) -> ssl.SSLContext:
        cert, key = self.config.tls_cert, self.config.tls_key
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cert or "", key or "")
        except (OSError, ssl.SSLError) as exc:
            raise SipConfigError(
                f"sip.tls_cert/sip.tls_key: cannot load certificate {cert!r} with key {key!r}: "
                f"{exc}; give PEM files readable by this process"
            ) from exc
        return ctx

    async def _bind(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        loop = self._loop
        assert loop is not None
        if self.config.udp:
            infos = await loop.getaddrinfo(
                host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                # The default (~208 KB) holds ~100 ms of INVITEs at 200/s: a
                # pause of the loop longer than that would drop calls.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF_BYTES)
                sock.bind(addr)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._udp = sock
            # Our own reader rather than a DatagramTransport: it drains up to
            # UDP_BATCH datagrams per wake-up, which under a flood costs far less
            # than one event-loop round per datagram.
            loop.add_reader(sock.fileno(), self._read_udp)
            port = int(sock.getsockname()[1])
        if self.config.tcp:
            self._tcp = await asyncio.start_server(self._serve_tcp, host, port)
            port = int(self._tcp.sockets[0].getsockname()[1])
        self.port = port
        if tls is not None:
            # A plain listener: the connection caps apply before the handshake,
            # which is the expensive part of a connection flood.
            self._tls_ctx = tls
            self._tls = await asyncio.start_server(self._serve_tls, host, self.config.tls_port)
            self.tls_port = int(self._tls.sockets[0].getsockname()[1])

    async def replace_trunks(self, trunks: Sequence[Trunk]) -> TrunkChanges:
        """Admit and route new calls by ``trunks`` from now on: the host names
        of new or changed downstreams are resolved first, then the edge's
        whole table is swapped at once (:meth:`SipEdge.replace_trunks`).
        Calls in progress keep the trunk they started on; the listener
        settings stay as they are. Returns what changed (also logged)."""
        old = set(self.config.trunks)
        resolved = await self._resolve([t for t in trunks if t not in old])
        changes = self.edge.replace_trunks(trunks)
        for name, addresses in resolved.items():
            self.edge.set_downstream_addresses(name, addresses)
        self.config = dataclasses.replace(self.config, trunks=tuple(trunks))
        _warn_open([t for t in trunks if t not in old])
        log.info(
            "sip trunks replaced",
            extra={
                "added": ",".join(changes.added) or "-",
                "removed": ",".join(changes.removed) or "-",
                "changed": ",".join(name for name, _ in changes.changed) or "-",
                "calls_in_progress": len(self.edge),
            },
        )
        return changes

    async def _resolve(self, trunks: Sequence[Trunk]) -> dict[str, list[str]]:
        """The addresses each trunk's downstream host name resolves to (trunks
        whose downstream is an IP address, or does not resolve, are left out)."""
        loop = self._loop or asyncio.get_running_loop()
        out: dict[str, list[str]] = {}
        for trunk in trunks:
            host = trunk.downstream_host
            try:
                ipaddress.ip_address(host)
                continue
            except ValueError:
                pass
            try:
                infos = await loop.getaddrinfo(host, trunk.downstream_port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning(
                    "sip downstream does not resolve",
                    extra={"trunk": trunk.name, "host": host, "error": str(exc)},
                )
                continue
            out[trunk.name] = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return out

    async def _close_listeners(self) -> None:
        if self._udp is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        for server in (self._tcp, self._tls):
            if server is not None:
                server.close()
                await server.wait_closed()
        self._tcp = self._tls = None

    async def close(self) -> None:
        """Stop listening, close connections and the timer. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for writer in list(self._conns.values()):
            writer.close()
        self._conns.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        await self._close_listeners()

    def connections(self) -> int:
        """Stream connections open now (inbound and to downstreams)."""
        return len(self._conns)

    # -- backend callbacks -------------------------------------------------

    def on_placed(self, call_ref: str, job_id: str, worker_id: str) -> None:
        """The scheduler placed ``call_ref`` as ``job_id`` on ``worker_id``."""
        self.edge.on_placed(call_ref, job_id, worker_id, self._now())
        self._flush()

    def on_refused(self, call_ref: str, reason: str) -> None:
        """The scheduler could not place ``call_ref``; ``reason`` goes in the Reason header."""
        self.edge.on_refused(call_ref, reason, self._now())
        self._flush()

    def on_job_ended(self, job_id: str) -> None:
        """The agent's job ended (its slot is free already)."""
        self.edge.on_job_ended(job_id, self._now())
        self._flush()

    # -- plumbing ----------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()

    def _receive(self, data: bytes, peer: Peer) -> None:
        self.edge.receive(data, peer, self._now())
        self._flush()

    def _read_udp(self) -> None:
        sock = self._udp
        if sock is None:
            return
        now = self._now()
        edge = self.edge
        for _ in range(UDP_BATCH):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP port unreachable from a caller that went away: not our problem.
                log.debug("sip udp error", extra={"error": str(exc)})
                continue
            edge.receive(data, Peer("udp", str(addr[0]), int(addr[1])), now)
        self._flush()

    def _flush(self) -> None:
        for out in self.edge.take_outgoing():
            self._send(out)
        self._rearm()

    def _send(self, out: Outgoing) -> None:
        peer = out.peer
        if peer.transport == "udp":
            if self._udp is not None:
                try:
                    self._udp.sendto(out.data, (peer.host, peer.port))
                except (BlockingIOError, InterruptedError):
                    self.edge.stats.unsendable += 1  # send buffer full: UDP may drop
                except OSError as exc:
                    log.debug("sip udp send failed", extra={"peer": peer.host, "error": str(exc)})
            return
        writer = self._conns.get(peer)
        if writer is not None and not writer.is_closing():
            writer.write(out.data)
            if writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                self.edge.stats.tcp_slow_reader_closed += 1
                log.info("sip stream peer stopped reading", extra={"peer": peer.host})
                writer.transport.abort()
        elif peer in self._connecting:
            self._connecting[peer].append(out.data)
        elif peer.transport == "tcp" and peer in self.edge.downstream_peers():
            self._connecting[peer] = [out.data]
            self._spawn(self._connect(peer))
        else:
            # A caller whose connection closed (or any address a message named):
            # the edge never opens a connection it was not configured to open.
            self.edge.stats.unsendable += 1
            log.debug("sip stream peer not connected", extra={"peer": peer.host})

    def _rearm(self) -> None:
        deadline = self.edge.next_deadline()
        if deadline == self._armed or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed = None, None
        self.edge.on_timer(self._now())
        self._flush()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, peer: Peer) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.warning("sip tcp connect failed", extra={"peer": peer.host, "error": str(exc)})
            self._connecting.pop(peer, None)
            return
        for data in self._connecting.pop(peer, []):
            writer.write(data)
        await self._read_stream(reader, writer, peer)

    def _admit_connection(self, writer: asyncio.StreamWriter) -> str | None:
        """The peer host of a new inbound connection, or None if it is over a cap."""
        addr = writer.get_extra_info("peername")
        host = str(addr[0])
        cfg = self.config
        if (
            self._inbound >= cfg.max_tcp_connections
            or self._per_source[host] >= cfg.max_tcp_connections_per_source
        ):
            self.edge.stats.tcp_refused += 1
            log.debug("sip connection over the limit", extra={"peer": host})
            writer.transport.abort()
            return None
        return host

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = self._admit_connection(writer)
        if host is not None:
            port = int(writer.get_extra_info("peername")[1])
            await self._serve_inbound(reader, writer, Peer("tcp", host, port))

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = self._admit_connection(writer)
        if host is None:
            return
        port = int(writer.get_extra_info("peername")[1])
        assert self._tls_ctx is not None
        self._inbound += 1
        self._per_source[host] += 1
        try:
            try:
                await writer.start_tls(self._tls_ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                self.edge.stats.tls_handshake_failed += 1
                log.debug("sip tls handshake failed", extra={"peer": host, "error": str(exc)})
                writer.transport.abort()
                return
            await self._read_stream(reader, writer, Peer("tls", host, port))
        finally:
            self._release_source(host)

    async def _serve_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        self._inbound += 1
        self._per_source[peer.host] += 1
        try:
            await self._read_stream(reader, writer, peer)
        finally:
            self._release_source(peer.host)

    def _release_source(self, host: str) -> None:
        self._inbound -= 1
        self._per_source[host] -= 1
        if self._per_source[host] <= 0:
            del self._per_source[host]

    async def _read_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        loop = self._loop or asyncio.get_running_loop()
        idle = self.config.tcp_idle_timeout_s
        self._conns[peer] = writer
        framer = StreamFramer()
        deadline = loop.time() + idle
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(65536)
                except TimeoutError:
                    self.edge.stats.tcp_idle_closed += 1
                    log.debug("sip stream idle, closed", extra={"peer": peer.host})
                    break
                if not data:
                    break
                framer.feed(data)
                framed = False
                while (frame := framer.next_frame()) is not None:
                    framed = True
                    self._receive(frame, peer)
                if framed:
                    deadline = loop.time() + idle
                elif not framer.pending() and b"\r\n\r\n" in data:
                    writer.write(b"\r\n")  # RFC 5626 keep-alive: pong
                    deadline = loop.time() + idle
        except SipParseError as exc:
            self.edge.stats.dropped += 1
            log.info("sip stream unframeable", extra={"peer": peer.host, "reason": exc.reason})
        except (ConnectionError, OSError):
            pass
        finally:
            if self._conns.get(peer) is writer:
                del self._conns[peer]
            writer.close()


def _warn_open(trunks: Sequence[Trunk]) -> None:
    for trunk in trunks:
        if trunk.is_open:
            log.warning(
                "sip trunk takes calls from any source",
                extra={
                    "trunk": trunk.name,
                    "fix": "set allowed_addresses, or auth_username and auth_password",
                },
            )
