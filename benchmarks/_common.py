"""Shared helpers for the end-to-end benchmarks.

Theory of operation: a benchmark driver starts the server under test as a child
process on a free loopback port, starts `protocol_workers.py` as a second child
process, and drives HTTP load itself. Every child is registered with `Children`,
which kills it on any exit of the driver (normal return, exception, SIGINT,
SIGTERM) and, through `PR_SET_PDEATHSIG`, even when the driver is SIGKILLed.

The load-side HTTP client (`HttpConn`) is a bare asyncio protocol over a
keep-alive connection sending pre-built request bytes, so the generator spends
microseconds per request instead of the tens that a full client library costs;
that keeps the generator from being the bottleneck on a 2-core machine.

Run directly, this module also serves as a *baseline server* (`python
benchmarks/_common.py fake-server --port P`): a plain aiohttp server that speaks
the same worker protocol and REST subset and does nothing but place jobs. It is
the yardstick DESIGN.md compares trunkline against, and it lets the load
generators be checked before (or without) the real server.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

# A config [keys] entry: outside --dev a secret must be at least 32 bytes.
DEV_KEY = "benchkey"
DEV_SECRET = "bench-secret-0123456789abcdef012345"
POOL = "bench"

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- tokens


def agent_token(key: str = DEV_KEY, secret: str = DEV_SECRET) -> str:
    """A worker JWT (`video.agent = true`), as a LiveKit worker sends it."""
    from livekit import api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that LiveKit's dev secret is short
        return api.AccessToken(key, secret).with_grants(api.VideoGrants(agent=True)).to_jwt()


def admin_token(key: str = DEV_KEY, secret: str = DEV_SECRET) -> str:
    """A server-API JWT (`video.roomAdmin = true`), as livekit-api sends it."""
    from livekit import api

    grants = api.VideoGrants(room_admin=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that LiveKit's dev secret is short
        return api.AccessToken(key, secret).with_grants(grants).to_jwt()


# ------------------------------------------------------------------ machine, /proc


def redis_server_class() -> Any:
    """tests/cluster/redisserver.py's RedisServer, loaded by path: the cluster
    benchmarks run with benchmarks/ on sys.path, where `cluster` names
    benchmarks/cluster.py, so the test package cannot be imported by name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_redisserver", ROOT / "tests" / "cluster" / "redisserver.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit(want: int = 16384) -> None:
    """Raise the soft open-files limit (inherited by children) for many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def machine_info() -> str:
    """One line naming the machine: cores, CPU model, Python version."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name is in parentheses and may contain spaces; fields follow it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


class CpuMeter:
    """CPU% of several processes, and of the rest of the machine, over a window.

    `start()`, then `stop()`. "rest" is everything else that ran on the machine
    meanwhile (other programs, hypervisor steal, kernel softirq work such as
    loopback TCP that is not charged to a process): when it is high, the
    figures are disturbed. Inside an event loop it also samples every second,
    so that a short burst (`rest_peak`) is not averaged away.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._m0 = (0, 0)
        self.percent: dict[str, float] = {}
        self.rest = 0.0
        self.rest_peak = 0.0
        self._sampler: asyncio.Task[None] | None = None

    def _own_seconds(self) -> float:
        total = 0.0
        for pid in self.pids.values():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._m0 = _machine_ticks()
        self.rest_peak = 0.0
        with contextlib.suppress(RuntimeError):  # no running loop: no sampling
            self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            t0, own0, (busy0, _) = time.monotonic(), self._own_seconds(), _machine_ticks()
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - t0
            busy = (_machine_ticks()[0] - busy0) / CLK_TCK
            rest = 100.0 * (busy - (self._own_seconds() - own0)) / elapsed
            self.rest_peak = max(self.rest_peak, rest)

    def stop(self) -> dict[str, float]:
        """Returns {name: percent of one core} since `start()`; sets `rest`."""
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        elapsed = time.monotonic() - self._t0
        self.percent = {
            name: 100.0 * (cpu_seconds(pid) - self._c0[name]) / elapsed
            for name, pid in self.pids.items()
        }
        busy1, _ = _machine_ticks()
        machine = 100.0 * (busy1 - self._m0[0]) / CLK_TCK / elapsed
        self.rest = max(0.0, machine - sum(self.percent.values()))
        return self.percent

    def line(self) -> str:
        parts = [f"{name} {pct:.0f}%" for name, pct in self.percent.items()]
        rest = f"rest of machine {self.rest:.0f}%"
        if self.rest_peak:
            rest += f" (worst second {self.rest_peak:.0f}%)"
        return ", ".join([*parts, rest])


async def wait_machine_quiet(
    own_pids: Sequence[int], max_rest_pct: float = 25.0, timeout_s: float = 120.0
) -> float:
    """Wait until the rest of the machine (not `own_pids`) uses < `max_rest_pct`% of a core.

    The benchmark machine may be shared; a test suite running next to the
    benchmark takes a core away and the figures then measure that instead.
    Samples 1 s windows; returns the last window's figure, quiet or not, after
    at most `timeout_s` (the caller reports it).
    """
    meter = CpuMeter({str(pid): pid for pid in own_pids})
    deadline = time.monotonic() + timeout_s
    while True:
        meter.start()
        await asyncio.sleep(1.0)
        meter.stop()
        if meter.rest < max_rest_pct or time.monotonic() >= deadline:
            return meter.rest


async def quiet_machine(args: argparse.Namespace, pids: dict[str, int]) -> None:
    """Hold the next measurement until the rest of the machine is quiet (see
    `--quiet-wait`, `--quiet-below` from `add_quiet_options`); says so when it
    waited noticeably or gave up."""
    if args.quiet_wait <= 0:
        return
    t0 = time.monotonic()
    rest = await wait_machine_quiet(list(pids.values()), args.quiet_below, args.quiet_wait)
    waited = time.monotonic() - t0
    if rest >= args.quiet_below:
        print(f"  note: rest of machine still at {rest:.0f}% of a core after {waited:.0f} s")
    elif waited > 1.5:
        print(f"  (waited {waited:.0f} s for other programs on the machine to quiet down)")


def add_quiet_options(p: argparse.ArgumentParser, *, quiet_wait: float, unit: str) -> None:
    """`--quiet-wait`, `--quiet-below` and `--retries` for a driver that measures
    each `unit` ("phase", "case") after `quiet_machine` and again when disturbed."""
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help=f"max seconds to wait before each {unit} for other programs to go quiet (0: don't)",
    )
    p.add_argument(
        "--quiet-below", type=float, default=25.0, help="quiet = rest of machine below this %%"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"measure a {unit} again (up to N more times) if other programs disturbed it",
    )


def wait_rss_quiet(pid: int, settle_s: float = 2.0, timeout_s: float = 20.0) -> int:
    """RSS once it has not changed by more than 16 KiB for `settle_s` seconds."""
    deadline = time.monotonic() + timeout_s
    last = rss_kb(pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now_rss = rss_kb(pid)
        if abs(now_rss - last) > 16:
            last = now_rss
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= settle_s:
            return now_rss
    return rss_kb(pid)


# ------------------------------------------------------------------------ statistics


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[rank]


def verdict(ok: bool, what: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {what}"


# ---------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the driver dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Children:
    """Every child process a driver starts; all are killed when the driver exits."""

    _procs: list[subprocess.Popen[bytes] | asyncio.subprocess.Process] = []
    _installed = False

    @classmethod
    def install(cls) -> None:
        """Make SIGTERM/SIGHUP unwind like Ctrl-C, and clean up at interpreter exit."""
        if cls._installed:
            return
        cls._installed = True
        atexit.register(cls.kill_all)

        def _raise(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise)

    @classmethod
    def add(cls, proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> None:
        cls._procs.append(proc)

    @classmethod
    def kill_all(cls) -> None:
        """SIGTERM every live child, wait up to 3 s, then SIGKILL the rest."""
        live = [p for p in cls._procs if p.returncode is None and _alive(p.pid)]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in live:
            while _alive(p.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in live:
            if isinstance(p, subprocess.Popen):
                with contextlib.suppress(Exception):
                    p.wait(timeout=1.0)
        cls._procs.clear()


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def run_driver(
    make_run: Callable[[], Coroutine[Any, Any, dict[str, Any]]], json_path: str | None
) -> dict[str, Any] | None:
    """Run a driver's main coroutine (made by `make_run`) with `Children` cleanup
    installed and the fd limit raised, and write its figures to `json_path` if
    given. Returns the figures, or None if interrupted: the caller exits 130."""
    Children.install()
    raise_fd_limit()
    try:
        out = asyncio.run(make_run())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None
    finally:
        Children.kill_all()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def child_kwargs() -> dict[str, Any]:
    """Popen keyword arguments every benchmark child gets."""
    return {"preexec_fn": _die_with_parent, "cwd": str(ROOT)}


class ServerUnderTest:
    """The dispatch server (or the baseline) as a child process on a free port.

    `start()` writes a config, launches the process with its output in a log
    file, and returns once `GET /healthz` answers 200. Raises `RuntimeError`
    with the tail of the log if it does not come up.
    """

    def __init__(self, *, baseline: bool = False, max_jobs_per_worker: int = 4) -> None:
        self.baseline = baseline
        self.max_jobs_per_worker = max_jobs_per_worker
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="trunkline-bench-"))
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/agent"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def name(self) -> str:
        return "baseline (plain aiohttp)" if self.baseline else "trunkline"

    def config_text(self) -> str:
        return (
            "[server]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'data_dir = "{self.tmp / "data"}"\n'
            'log_level = "warning"\n'
            "\n[keys]\n"
            f'{DEV_KEY} = "{DEV_SECRET}"\n'
            f"\n[pools.{POOL}]\n"
            f"max_jobs_per_worker = {self.max_jobs_per_worker}\n"
            "queue_max_wait_s = 10\n"
        )

    def command(self) -> list[str]:
        if self.baseline:
            return [
                PYTHON,
                str(BENCH_DIR / "_common.py"),
                "fake-server",
                "--port",
                str(self.port),
                "--max-jobs-per-worker",
                str(self.max_jobs_per_worker),
            ]
        config = self.tmp / "trunkline.toml"
        config.write_text(self.config_text())
        exe = VENV_BIN / "trunkline"
        prefix = [str(exe)] if exe.exists() else [PYTHON, "-m", "trunkline"]
        return [*prefix, "serve", "--config", str(config), "--port", str(self.port)]

    def start(self, timeout_s: float = 20.0) -> None:
        env = dict(os.environ, TRUNKLINE_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, **child_kwargs()
            )
        Children.add(self.proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} no /healthz in {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def get_json(self, path: str) -> Any:
        """GET a REST path with an admin token; returns the decoded JSON body."""
        req = urllib.request.Request(
            self.base_url + path, headers={"Authorization": f"Bearer {admin_token()}"}
        )
        with urllib.request.urlopen(req, timeout=5.0) as r:
            return json.loads(r.read())

    def count_workers(self) -> int:
        """Workers the server reports as connected (`GET /v1/workers`)."""
        body = self.get_json("/v1/workers")
        if isinstance(body, dict):
            body = body.get("workers", [])
        return len(body)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5.0) as r:
            text: str = r.read().decode()
            return text


def worker_command(
    ws_url: str,
    workers: int,
    *,
    hold_s: float = 0.0,
    max_jobs: int = 0,
    status_interval_s: float = 2.5,
) -> list[str]:
    """Command line that starts `protocol_workers.py` with these settings."""
    return [
        PYTHON,
        str(BENCH_DIR / "protocol_workers.py"),
        "--url",
        ws_url,
        "--workers",
        str(workers),
        "--agent-name",
        POOL,
        "--hold",
        str(hold_s),
        "--max-jobs",
        str(max_jobs),
        "--status-interval",
        str(status_interval_s),
    ]


# -------------------------------------------------------------- load-side HTTP client


def build_request(port: int, path: str, body: bytes, token: str) -> bytes:
    """Complete HTTP/1.1 POST bytes for a keep-alive connection."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


ResponseCallback = Callable[[int, bytes], None]


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight at a time.

    `send(data, on_done)` writes pre-built request bytes; `on_done(status, body)`
    runs from `data_received` when the full response has arrived. Understands
    Content-Length and chunked bodies; anything else is a benchmark error.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._on_done: ResponseCallback | None = None
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int) -> HttpConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, "127.0.0.1", port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if self._on_done is not None:
            cb, self._on_done = self._on_done, None
            cb(0, b"connection lost")

    @property
    def busy(self) -> bool:
        return self._on_done is not None

    def send(self, data: bytes, on_done: ResponseCallback) -> None:
        assert self.transport is not None
        assert self._on_done is None
        self._on_done = on_done
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._on_done is not None:
            parsed = _parse_response(self._buf)
            if parsed is None:
                return
            status, body, used = parsed
            del self._buf[:used]
            cb, self._on_done = self._on_done, None
            cb(status, body)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes consumed) if `buf` holds a full response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = -1
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lname = name.strip().lower()
        if lname == "content-length":
            length = int(value.strip())
        elif lname == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    start = end + 4
    if not chunked:
        if length < 0:
            length = 0
        if len(buf) < start + length:
            return None
        return status, bytes(buf[start : start + length]), start + length
    body = bytearray()
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        chunk_start = line_end + 2
        if len(buf) < chunk_start + size + 2:
            return None
        if size == 0:
            return status, bytes(body), chunk_start + 2
        body += buf[chunk_start : chunk_start + size]
        pos = chunk_start + size + 2


class ConnPool:
    """A fixed set of keep-alive connections; `take()` an idle one, `give()` it back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: deque[HttpConn] = deque()
        self.all: list[HttpConn] = []
        self.grown = 0

    async def fill(self, n: int) -> None:
        for _ in range(n):
            conn = await HttpConn.open(self.port)
            self.all.append(conn)
            self.idle.append(conn)

    async def take(self) -> HttpConn:
        """An idle connection; opens a new one (and counts it) if none is idle."""
        if self.idle:
            return self.idle.popleft()
        self.grown += 1
        conn = await HttpConn.open(self.port)
        self.all.append(conn)
        return conn

    def give(self, conn: HttpConn) -> None:
        if not conn.closed.done():
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.all:
            conn.close()


# ------------------------------------------------------------------- workers process


class WorkersProcess:
    """`protocol_workers.py` as an asyncio child, with its stdout event stream.

    Lines: `A <seq> <t_monotonic>` per assignment (job metadata = seq), and JSON
    objects for everything else (`ready`, `summary`, `error`). `on_assign` is
    called for every `A` line; JSON events are queued for `next_event()`.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.on_assign: Callable[[int, float], None] = lambda seq, t: None
        self.assignments = 0
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
            **child_kwargs(),
        )
        Children.add(self.proc)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        rest = b""
        while True:
            # Whole chunks, split here: far cheaper than a readline() per assignment.
            chunk = await stdout.read(1 << 16)
            if not chunk:
                await self.events.put({"event": "exit"})
                return
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            on_assign = self.on_assign
            for line in lines:
                if line.startswith(b"A "):
                    _, seq, t = line.split()
                    self.assignments += 1
                    on_assign(int(seq), float(t))
                elif line:
                    try:
                        self.events.put_nowait(json.loads(line))
                    except ValueError:
                        sys.stderr.write(f"workers: {line.decode(errors='replace')}\n")

    async def next_event(self, timeout_s: float) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), timeout_s)

    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the `ready` event (all workers registered); raise on anything else."""
        event = await self.next_event(timeout_s)
        if event.get("event") != "ready":
            raise RuntimeError(f"workers process did not get ready: {event}")
        return event

    async def command(self, line: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Ask the process to disconnect and summarize; returns its summary."""
        summary: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            await self.command("stop")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                event = await self.next_event(max(0.01, deadline - time.monotonic()))
                if event.get("event") == "summary":
                    summary = event
                if event.get("event") == "exit":
                    break
        if self.proc is not None:
            # Let asyncio's child watcher reap it: kill() on a process that has just
            # exited would reap it first (Popen.send_signal polls) and make asyncio
            # warn about an unknown child.
            try:
                await asyncio.wait_for(self.proc.wait(), 3.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return summary


# ------------------------------------------------------------------------- profiling


class PySpy:
    """`py-spy record` attached to a process for one window (raw collapsed stacks).

    Sampling is non-blocking by default so the profiler barely perturbs the
    figures (some stacks then come out torn, which undercounts the inclusive
    column but not self time); idle
    samples (the event loop waiting in epoll) are kept so that percentages are
    of wall time and the idle share is visible.
    """

    def __init__(
        self, pid: int, seconds: float, out: Path, rate: int = 200, blocking: bool = False
    ) -> None:
        self.out = out
        exe = VENV_BIN / "py-spy"
        self.argv = [
            str(exe) if exe.exists() else "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nolineno",
            "--idle",
            "--output",
            str(out),
        ]
        if not blocking:
            self.argv.append("--nonblocking")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **child_kwargs()
        )
        Children.add(self.proc)

    async def wait(self) -> None:
        assert self.proc is not None
        proc = self.proc
        _, err = await asyncio.to_thread(proc.communicate)
        if proc.returncode != 0:
            sys.stderr.write(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')}")


IDLE_FRAMES = ("EpollSelector.select (selectors.py)", "select (selectors.py)")


def profile_summary(path: Path, top: int = 15) -> str:
    """Self time, inclusive time and per-file self time from py-spy raw output."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    files: dict[str, int] = {}
    total = 0
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = stack.split(";")
        # The first frame may name the process/thread; real frames look like "fn (file)".
        frames = [f for f in frames if f.endswith(")")]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if leaf in IDLE_FRAMES:
            idle += count
            continue
        self_t[leaf] = self_t.get(leaf, 0) + count
        fname = leaf[leaf.rfind("(") + 1 : -1]
        files[fname] = files.get(fname, 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return "(no samples)"

    def table(title: str, d: dict[str, int]) -> list[str]:
        rows = [f"  {title}"]
        for name, n in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
            rows.append(f"    {100.0 * n / total:5.1f}%  {name}")
        return rows

    lines = [f"  {total} samples; event loop idle {100.0 * idle / total:.1f}% of wall time"]
    lines += table("self time (leaf frame):", self_t)
    lines += table("self time by file:", files)
    lines += table("inclusive time (frame anywhere on the stack):", incl)
    return "\n".join(lines)


# -------------------------------------------------------------------- baseline server


def run_fake_server(port: int, max_jobs_per_worker: int) -> None:
    """A plain aiohttp dispatch server: the yardstick, not trunkline.

    Least-loaded placement among connected workers with a free slot, a FIFO
    queue when none has one, no traces, no metrics beyond a stub, JWTs checked
    only for presence. It answers the same routes the benchmarks use.
    """
    import itertools

    from aiohttp import WSMsgType, web
    from livekit.protocol import agent, models

    class W:
        __slots__ = ("cap", "id", "used", "ws")

        def __init__(self, wid: str, ws: web.WebSocketResponse, cap: int) -> None:
            self.id, self.ws, self.cap, self.used = wid, ws, cap, 0

    workers: dict[str, W] = {}
    jobs: dict[str, tuple[agent.Job, W | None]] = {}
    queue: deque[agent.Job] = deque()
    ids = itertools.count(1)

    async def offer(job: agent.Job) -> bool:
        best: W | None = None
        for w in workers.values():
            if w.used < w.cap and (best is None or w.used < best.used):
                best = w
        if best is None:
            return False
        best.used += 1
        jobs[job.id] = (job, best)
        msg = agent.ServerMessage(availability=agent.AvailabilityRequest(job=job))
        await best.ws.send_bytes(msg.SerializeToString())
        return True

    async def release(w: W) -> None:
        w.used -= 1
        if queue:
            await offer(queue.popleft())

    async def handle_agent(request: web.Request) -> web.StreamResponse:
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            raise web.HTTPUnauthorized()
        cap = int(request.query.get("max_jobs", max_jobs_per_worker))
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        w = W(f"W_{next(ids)}", ws, cap)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                m = agent.WorkerMessage.FromString(msg.data)
                kind = m.WhichOneof("message")
                if kind == "register":
                    workers[w.id] = w
                    reg = agent.RegisterWorkerResponse(worker_id=w.id)
                    reply = agent.ServerMessage(register=reg)
                    await ws.send_bytes(reply.SerializeToString())
                    if queue:
                        await offer(queue.popleft())
                elif kind == "availability":
                    job, _ = jobs[m.availability.job_id]
                    if m.availability.available:
                        a = agent.JobAssignment(job=job, token="t")
                        await ws.send_bytes(agent.ServerMessage(assignment=a).SerializeToString())
                    else:
                        jobs.pop(job.id, None)
                        await release(w)
                elif kind == "update_job":
                    status = m.update_job.status
                    ended = status in (agent.JS_SUCCESS, agent.JS_FAILED)
                    if ended and jobs.pop(m.update_job.job_id, None) is not None:
                        await release(w)
        finally:
            workers.pop(w.id, None)
        return ws

    async def handle_dispatch(request: web.Request) -> web.Response:
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            raise web.HTTPUnauthorized()
        body = await request.json()
        n = next(ids)
        job = agent.Job(
            id=f"AJ_{n}",
            type=agent.JT_ROOM,
            room=models.Room(name=body.get("room", f"room-{n}")),
            metadata=body.get("metadata", ""),
            agent_name=body.get("agent_name", ""),
        )
        state = "offered" if await offer(job) else "queued"
        if state == "queued":
            queue.append(job)
        return web.json_response({"job_id": job.id, "state": state}, status=201)

    async def handle_workers(_request: web.Request) -> web.Response:
        return web.json_response(
            {"workers": [{"id": w.id, "capacity": w.cap, "used": w.used} for w in workers.values()]}
        )

    async def handle_ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/agent", handle_agent)
    app.router.add_post("/v1/dispatches", handle_dispatch)
    app.router.add_get("/v1/workers", handle_workers)
    app.router.add_get("/healthz", handle_ok)
    app.router.add_get("/metrics", handle_ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fake = sub.add_parser("fake-server", help="run the plain-aiohttp baseline server")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--max-jobs-per-worker", type=int, default=4)
    args = parser.parse_args(argv)
    if args.cmd == "fake-server":
        run_fake_server(args.port, args.max_jobs_per_worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
