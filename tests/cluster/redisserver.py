"""A throwaway redis-server for tests and benchmarks: Debian's binary
(`scripts/bootstrap --test` installs the `redis-server` package) on a free
loopback port, its files in a temp directory, ready when it answers PING
(no fixed sleeps). `stop_hard()` is kill -9 (state lost unless saved),
`restart()` brings it back on the same port and directory (with
`appendonly=True` it reloads what it had), `pause()`/`resume()` SIGSTOP and
SIGCONT it (unreachable but connections stay open). Standalone (no pytest),
so benchmarks use it too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class RedisUnavailable(RuntimeError):
    """No redis-server binary on this machine."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`start()`, `url`, `stop()`; see the module docstring."""

    def __init__(self, *, appendonly: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable(
                "redis-server not found: run scripts/bootstrap --test, "
                "which installs Debian's redis-server package"
            )
        self.exe = exe
        self.port = _free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="trunkline-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer PING within {timeout} s")
            time.sleep(0.01)  # ok-sleep: polling for PING

    def log(self) -> str:
        p = self.dir / "redis.log"
        return p.read_text() if p.exists() else ""

    def stop_hard(self) -> None:
        """kill -9 and wait (no save)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop_hard()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.resume()
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
