"""N protocol-level LiveKit agent workers in one process, for load generation.

Each worker is a websocket to `/agent` speaking only protobuf: it registers,
accepts every offer at once, reports `JS_RUNNING` on assignment and `JS_SUCCESS`
after `--hold` seconds (0: immediately, in the same write, for cycle
benchmarks), and sends `UpdateWorkerStatus` every `--status-interval` seconds
like a LiveKit worker (staggered, so the server sees a steady trickle).

The websocket client is a bare asyncio protocol: callbacks instead of a task
per worker, one `write` per reply, and the all-zero masking key (valid per RFC
6455, which only asks for unpredictable keys to protect browsers from cache
poisoning), so client frames need no XOR pass. This keeps the generator's CPU
well below the server's; the driver measures that rather than trusting it.
That is why this is not `tests/protoworker.py`, the one scriptable test worker:
its aiohttp client, reader task and per-kind queues cost more CPU per message
than the server spends, and the figure these benchmarks compare is server CPU
per job cycle measured against a generator that stays out of the way.

Output on stdout, one line per item, flushed once per event-loop iteration:
  `A <seq> <t>`  an assignment arrived at `time.monotonic()` = t for the job whose
                 metadata is the integer `seq` (the driver's correlation key);
  `{json}`       events: `ready` (all registered), `error`, `summary` (at exit).
Commands on stdin, one per line: `hold <seconds>`, `stop` (also on EOF).

    .venv/bin/python benchmarks/protocol_workers.py --url ws://127.0.0.1:7880/agent \
        --workers 200 --agent-name bench --hold 0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from _common import DEV_KEY, DEV_SECRET, agent_token
from livekit.protocol import agent

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ZERO_MASK = b"\x00\x00\x00\x00"


def frame(opcode: int, payload: bytes) -> bytes:
    """A final, client-masked (all-zero key) websocket frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + ZERO_MASK + payload


def job_status(job_id: str, status: int) -> bytes:
    msg = agent.WorkerMessage(
        update_job=agent.UpdateJobStatus(job_id=job_id, status=status)  # type: ignore[arg-type]
    )
    return frame(OP_BINARY, msg.SerializeToString())


class Reporter:
    """Buffers stdout lines and writes them once per loop iteration."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._scheduled = False
        self._out = sys.stdout.buffer

    def assign(self, seq: int, t: float) -> None:
        self._lines.append(b"A %d %.9f\n" % (seq, t))
        self._schedule()

    def event(self, name: str, **fields: Any) -> None:
        self._lines.append(json.dumps({"event": name, **fields}).encode() + b"\n")
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            self._out.write(data)
            self._out.flush()


class Fleet:
    """Settings and counters shared by all workers of this process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hold_s: float = args.hold
        self.reporter = Reporter()
        self.workers: list[Worker] = []
        self.registered = 0
        self.all_registered = asyncio.Event()
        self.stopping = False
        self.offers = 0
        self.assignments = 0
        self.successes = 0
        self.terminations = 0
        self.other = 0
        self.disconnects = 0
        self.errors: list[str] = []
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        target = url.path or "/agent"
        query = url.query
        if args.max_jobs > 0:
            query = (query + "&" if query else "") + f"max_jobs={args.max_jobs}"
        if query:
            target += "?" + query
        self.target = target
        self.token = agent_token(args.key, args.secret)
        register = agent.WorkerMessage(
            register=agent.RegisterWorkerRequest(
                type=agent.JT_ROOM, agent_name=args.agent_name, version="bench"
            )
        )
        self.register_frame = frame(OP_BINARY, register.SerializeToString())

    def upgrade_request(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {self.target} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {self.token}\r\n"
            "\r\n"
        ).encode()

    def error(self, idx: int, message: str) -> None:
        self.errors.append(f"worker {idx}: {message}")
        self.reporter.event("error", worker=idx, error=message)


class Worker(asyncio.Protocol):
    """One worker connection: upgrade, register, then answer every server message."""

    def __init__(self, fleet: Fleet, idx: int) -> None:
        self.fleet = fleet
        self.idx = idx
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.registered = asyncio.get_running_loop().create_future()
        self.partial: bytearray | None = None
        self.running: dict[str, asyncio.TimerHandle | None] = {}
        self.closed = False

    # ---------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.fleet.upgrade_request())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for handle in self.running.values():
            if handle is not None:
                handle.cancel()
        self.running.clear()
        if not self.registered.done():
            self.registered.set_exception(ConnectionError(f"closed before register: {exc!r}"))
        elif not self.fleet.stopping:
            self.fleet.disconnects += 1
            self.fleet.error(self.idx, f"disconnected: {exc!r}")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Send a normal close frame and drop the connection."""
        if self.transport is not None and not self.closed:
            self.transport.write(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
            if status_line.split(" ", 2)[1:2] != ["101"]:
                self._fail(f"upgrade refused: {status_line}")
                return
            del buf[: end + 4]
            self.upgraded = True
            self.write(self.fleet.register_frame)
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = int.from_bytes(buf[2:10], "big")
                pos = 10
            if b1 & 0x80:  # a server must not mask; tolerate it anyway
                pos += 4
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode in (OP_BINARY, OP_TEXT, OP_CONT):
                if not fin:
                    if self.partial is None:
                        self.partial = bytearray()
                    self.partial += payload
                    continue
                if self.partial is not None:
                    payload = bytes(self.partial + payload)
                    self.partial = None
                if opcode != OP_TEXT:
                    self.on_message(payload)
            elif opcode == OP_PING:
                self.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close()
                return

    def _fail(self, message: str) -> None:
        if not self.registered.done():
            self.registered.set_exception(ConnectionError(message))
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------- protocol

    def on_message(self, data: bytes) -> None:
        t = time.monotonic()
        fleet = self.fleet
        m = agent.ServerMessage.FromString(data)
        kind = m.WhichOneof("message")
        if kind == "availability":
            fleet.offers += 1
            job_id = m.availability.job.id
            answer = agent.WorkerMessage(
                availability=agent.AvailabilityResponse(
                    job_id=job_id, available=True, participant_identity=f"agent-{job_id}"
                )
            )
            self.write(frame(OP_BINARY, answer.SerializeToString()))
        elif kind == "assignment":
            fleet.assignments += 1
            job = m.assignment.job
            meta = job.metadata
            if meta.isdigit():
                fleet.reporter.assign(int(meta), t)
            if fleet.hold_s <= 0:
                fleet.successes += 1
                self.write(
                    job_status(job.id, agent.JS_RUNNING) + job_status(job.id, agent.JS_SUCCESS)
                )
            else:
                self.write(job_status(job.id, agent.JS_RUNNING))
                loop = asyncio.get_running_loop()
                self.running[job.id] = loop.call_later(fleet.hold_s, self._finish, job.id)
        elif kind == "register":
            if not self.registered.done():
                self.registered.set_result(m.register.worker_id)
        elif kind == "termination":
            fleet.terminations += 1
            job_id = m.termination.job_id
            if job_id in self.running:
                handle = self.running.get(job_id)
                if handle is not None:
                    handle.cancel()
                self._finish(job_id)
        else:
            fleet.other += 1

    def _finish(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self.fleet.successes += 1
        self.write(job_status(job_id, agent.JS_SUCCESS))

    def send_status(self) -> None:
        status = agent.WorkerMessage(
            update_worker=agent.UpdateWorkerStatus(
                status=agent.WS_AVAILABLE, load=0.0, job_count=len(self.running)
            )
        )
        self.write(frame(OP_BINARY, status.SerializeToString()))


async def connect(fleet: Fleet, idx: int, gate: asyncio.Semaphore) -> None:
    """Open worker `idx` and wait for its registration (bounded concurrency)."""
    loop = asyncio.get_running_loop()
    try:
        async with gate:
            _, worker = await loop.create_connection(
                lambda: Worker(fleet, idx), fleet.host, fleet.port
            )
            fleet.workers[idx] = worker
            await asyncio.wait_for(worker.registered, fleet.args.register_timeout)
    except Exception as exc:
        fleet.error(idx, f"register failed: {exc!r}")
        return
    fleet.registered += 1
    if fleet.registered == fleet.args.workers:
        fleet.all_registered.set()


async def report_status(fleet: Fleet) -> None:
    """Each worker's `UpdateWorkerStatus` once per interval, staggered across workers."""
    interval = fleet.args.status_interval
    if interval <= 0:
        return
    await fleet.all_registered.wait()
    step = interval / max(1, len(fleet.workers))
    while not fleet.stopping:
        for worker in fleet.workers:
            await asyncio.sleep(step)
            if fleet.stopping:
                return
            worker.send_status()


async def read_commands(fleet: Fleet) -> None:
    """Apply stdin commands until `stop` or EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            return
        cmd, _, arg = line.partition(" ")
        if cmd == "hold":
            fleet.hold_s = float(arg)
        else:
            fleet.reporter.event("error", error=f"unknown command {line!r}")


async def amain(args: argparse.Namespace) -> int:
    fleet = Fleet(args)
    n = args.workers
    fleet.workers = [None] * n  # type: ignore[list-item]
    cpu0 = time.process_time()
    t0 = time.monotonic()
    gate = asyncio.Semaphore(args.connect_concurrency)
    connecting = asyncio.gather(*(connect(fleet, i, gate) for i in range(n)))
    commands = asyncio.create_task(read_commands(fleet))
    status_task = asyncio.create_task(report_status(fleet))
    await asyncio.wait([connecting, commands], return_when=asyncio.FIRST_COMPLETED)
    if fleet.all_registered.is_set():
        fleet.reporter.event("ready", workers=n, seconds=round(time.monotonic() - t0, 3))
        await commands
    else:
        fleet.reporter.event(
            "error", error=f"only {fleet.registered} of {n} workers registered", fatal=True
        )
    fleet.stopping = True
    status_task.cancel()
    commands.cancel()
    connecting.cancel()
    for worker in fleet.workers:
        if worker is not None:
            worker.close()
    await asyncio.sleep(0.05)  # let the close frames go out
    fleet.reporter.event(
        "summary",
        workers=n,
        registered=fleet.registered,
        offers=fleet.offers,
        assignments=fleet.assignments,
        successes=fleet.successes,
        terminations=fleet.terminations,
        other_messages=fleet.other,
        disconnects=fleet.disconnects,
        errors=fleet.errors[:10],
        cpu_s=round(time.process_time() - cpu0, 3),
    )
    fleet.reporter.flush()
    return 0 if fleet.all_registered.is_set() and not fleet.disconnects else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="ws://HOST:PORT/agent")
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--agent-name", default="bench")
    p.add_argument("--hold", type=float, default=0.0, help="seconds from running to success")
    p.add_argument("--max-jobs", type=int, default=0, help="declared slot cap (?max_jobs=N)")
    p.add_argument("--status-interval", type=float, default=2.5, help="0 disables")
    p.add_argument("--connect-concurrency", type=int, default=50)
    p.add_argument("--register-timeout", type=float, default=30.0)
    p.add_argument("--key", default=DEV_KEY)
    p.add_argument("--secret", default=DEV_SECRET)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
