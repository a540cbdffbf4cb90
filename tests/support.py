"""Helpers for integration tests: a real trunkline server in a child process,
and condition waits (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from trunkline.auth import admin_token

# Not the dev key's secret: servers started from a config file need a secret
# of at least 32 bytes (only --dev serves devkey/secret).
KEY, SECRET = "devkey", "trunkline-tests-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`trunkline serve` on 127.0.0.1 with the given TOML, as a child process."""

    def __init__(self, tmp: Path, config_toml: str = "", *, log_level: str = "info") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.config = tmp / "trunkline.toml"
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nlog_level = "{log_level}"\n'
            f'[keys]\n{KEY} = "{SECRET}"\n' + config_toml
        )
        self.log = tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trunkline", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)  # ok-sleep: polling for the port to open
        raise TimeoutError(f"server did not listen within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}

    async def get(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as s,
            s.get(self.url + path, headers=self.headers()) as r,
        ):
            r.raise_for_status()
            return await r.json()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.url + path, json=body, headers=self.headers()) as r,
        ):
            return r.status, await r.json()


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM `proc` if it still runs and wait up to `timeout` s for it, then
    SIGKILL; on return it has exited and `proc.returncode` is set."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_process(tmp: Path, config_toml: str = "") -> Iterator[ServerProcess]:
    """A started server for a generator fixture: `yield from server_process(...)`;
    stopped when the fixture is torn down."""
    srv = ServerProcess(tmp, config_toml)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def wait_until(
    predicate: Callable[[], Any], within: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll an (a)sync predicate until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s: {what or predicate}")
        await asyncio.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def peak_level(changes: Iterable[tuple[float, int]]) -> int:
    """The highest running sum of `(time, +1 or -1)` changes taken in time order:
    the most intervals open at one instant. At equal times -1 sorts first, so a
    slot freed and taken again at the same instant counts once."""
    level = peak = 0
    for _, delta in sorted(changes):
        level += delta
        peak = max(peak, level)
    return peak
