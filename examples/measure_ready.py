"""Measure how fast a new SDK replica is ready: spawn -> registered -> first job running.

Starts `trunkline serve --dev` on a free port, then N times: spawns
`trunkline worker examples.echo_agent:entrypoint`, polls `GET /v1/workers`
every 5 ms until the replica is registered, dispatches one job at that moment
and polls the job until it is running. Run from the repository root::

    .venv/bin/python examples/measure_ready.py 10
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from typing import Any

from trunkline.auth import admin_token

warnings.filterwarnings("ignore", message="The HMAC key is")  # the dev secret is short

KEY, SECRET = "devkey", "secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = {
            "Authorization": f"Bearer {admin_token(KEY, SECRET)}",
            "Content-Type": "application/json",
        }

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)


def poll(predicate: Any, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def registered_as(api: Api, agent_name: str) -> bool:
    return any(w["agent_name"] == agent_name for w in api.call("/v1/workers")["workers"])


def main(runs: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "trunkline", "serve", "--dev", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = Api(url)
    env = dict(os.environ, LIVEKIT_URL=url, LIVEKIT_API_KEY=KEY, LIVEKIT_API_SECRET=SECRET)
    registered: list[float] = []
    running: list[float] = []

    def up() -> bool:
        try:
            api.call("/healthz")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    try:
        poll(up, "server up")
        for i in range(runs):
            name = f"ready-{i}"
            argv = [sys.executable, "-m", "trunkline", "worker", "examples.echo_agent:entrypoint"]
            t0 = time.monotonic()
            worker = subprocess.Popen(
                [*argv, "--agent-name", name], env=env, stderr=subprocess.DEVNULL
            )
            poll(lambda n=name: registered_as(api, n), "registered")
            registered.append(time.monotonic() - t0)
            body = {"agent_name": name, "metadata": json.dumps({"hold_s": 0})}
            job_id = api.call("/v1/dispatches", body)["job_id"]
            poll(lambda j=job_id: api.call(f"/v1/jobs/{j}")["running_at"] is not None, "running")
            running.append(time.monotonic() - t0)
            worker.terminate()
            worker.wait()
    finally:
        server.terminate()
        server.wait()
    for label, values in (("spawn -> registered", registered), ("spawn -> job running", running)):
        print(
            f"{label:22} median {statistics.median(values):.3f} s  "
            f"min {min(values):.3f}  max {max(values):.3f}  (n={len(values)})"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
