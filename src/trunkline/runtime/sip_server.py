"""asyncio adapters for the SIP edge: UDP and TCP listeners, one timer, the clock.

Theory of operation: :class:`SipServer` owns the sockets and ``loop.time()``.
Every datagram, and every message a :class:`~trunkline.sip.message.StreamFramer`
cuts from a TCP stream, goes into :meth:`SipEdge.receive` with the sender and
the current time; then the edge's outbox is flushed to the network and one
timer handle is re-armed to :meth:`SipEdge.next_deadline`. The backend's
answers come in through :meth:`SipServer.on_placed` / :meth:`on_refused` /
:meth:`on_job_ended`, which do the same. Nothing here decides anything.

TCP: responses go back on the connection a request came in on (keyed by the
peer's address); a message for a TCP peer with no open connection (the
downstream) opens one, whose replies are read like any other connection. A
stream that cannot be framed is closed; the listener keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine

from trunkline.sip.backend import AdmissionBackend
from trunkline.sip.config import SipConfig
from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipParseError, StreamFramer
from trunkline.sip.transaction import Outgoing, Peer, TimerConfig

__all__ = ["SipServer"]

log = logging.getLogger("trunkline.sip")


UDP_RCVBUF_BYTES = 4 << 20


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._server._receive(data, Peer("udp", str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a caller that went away: not our problem.
        log.debug("sip udp error", extra={"error": str(exc)})


class SipServer:
    """Runs a :class:`SipEdge` on UDP and/or TCP. Use from one event loop.

    ``start()`` binds the listeners (port 0 picks a free port, the same for UDP
    and TCP); ``close()`` stops them. The scheduler reports decisions through
    ``on_placed`` / ``on_refused`` / ``on_job_ended``.
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: dict[tuple[str, int], asyncio.StreamWriter] = {}
        self._connecting: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Bind the configured listeners; raise OSError if a port is taken."""
        self._loop = asyncio.get_running_loop()
        host, port = self.config.host, self.config.port
        for attempt in range(5):
            try:
                await self._bind(host, port)
                break
            except OSError:
                await self._close_listeners()
                if port != 0 or attempt == 4:
                    raise
        self.edge.bind(self.port)
        log.info("sip listening", extra={"host": host, "port": self.port})

    async def _bind(self, host: str, port: int) -> None:
        loop = self._loop
        assert loop is not None
        if self.config.udp:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port)
            )
            self._udp = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # The default (~208 KB) holds ~100 ms of INVITEs at 200/s: a
                # pause of the loop longer than that would drop calls.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF_BYTES)
            port = int(transport.get_extra_info("sockname")[1])
        if self.config.tcp:
            self._tcp = await asyncio.start_server(self._serve_tcp, host, port)
            port = int(self._tcp.sockets[0].getsockname()[1])
        self.port = port

    async def _close_listeners(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

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

    def _flush(self) -> None:
        for out in self.edge.take_outgoing():
            self._send(out)
        self._rearm()

    def _send(self, out: Outgoing) -> None:
        peer = out.peer
        if peer.transport == "udp":
            if self._udp is not None:
                self._udp.sendto(out.data, (peer.host, peer.port))
            return
        key = (peer.host, peer.port)
        writer = self._conns.get(key)
        if writer is not None and not writer.is_closing():
            writer.write(out.data)
        elif key in self._connecting:
            self._connecting[key].append(out.data)
        else:
            self._connecting[key] = [out.data]
            self._spawn(self._connect(key))

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

    async def _connect(self, key: tuple[str, int]) -> None:
        try:
            reader, writer = await asyncio.open_connection(key[0], key[1])
        except OSError as exc:
            log.warning("sip tcp connect failed", extra={"peer": key, "error": str(exc)})
            self._connecting.pop(key, None)
            return
        for data in self._connecting.pop(key, []):
            writer.write(data)
        await self._read_stream(reader, writer, Peer("tcp", key[0], key[1]))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        await self._read_stream(reader, writer, Peer("tcp", str(addr[0]), int(addr[1])))

    async def _read_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        key = (peer.host, peer.port)
        self._conns[key] = writer
        framer = StreamFramer()
        try:
            while data := await reader.read(65536):
                framer.feed(data)
                while (frame := framer.next_frame()) is not None:
                    self._receive(frame, peer)
        except SipParseError as exc:
            self.edge.stats.dropped += 1
            log.info("sip tcp stream unframeable", extra={"peer": key, "reason": exc.reason})
        except (ConnectionError, OSError):
            pass
        finally:
            if self._conns.get(key) is writer:
                del self._conns[key]
            writer.close()
