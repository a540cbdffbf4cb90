"""Helpers shared by the worker SDK tests: job event files, options, a running Worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from worker import agents
from worker.fake_server import KEY, SECRET

from trunkline.worker import Worker, WorkerOptions


class Events:
    """What job processes recorded (JSON lines appended by tests/worker/agents.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def of(self, job_id: str, event: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.all()
            if e["job_id"] == job_id and (event is None or e["event"] == event)
        ]

    def metadata(self, **extra: Any) -> str:
        return json.dumps({"events": str(self.path), **extra})


def make_opts(url: str, **overrides: Any) -> WorkerOptions:
    base: dict[str, Any] = {
        "entrypoint_fnc": agents.hold,
        "ws_url": url,
        "api_key": KEY,
        "api_secret": SECRET,
        "agent_name": "tester",
        "max_jobs": 2,
        "num_idle_processes": 1,
        "shutdown_process_timeout": 5.0,
        "reconnect_base": 0.05,
        "reconnect_cap": 0.5,
    }
    base.update(overrides)
    return WorkerOptions(**base)


@contextlib.asynccontextmanager
async def running(opts: WorkerOptions) -> AsyncIterator[Worker]:
    """A Worker running until the block ends; it must then close cleanly."""
    worker = Worker(opts)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_registered(), 10)
        yield worker
    finally:
        await asyncio.wait_for(worker.aclose(), 30)
        await asyncio.wait_for(task, 5)
