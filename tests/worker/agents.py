"""Job entrypoints the worker tests run in real job processes.

They are module-level so job processes can import them by name. A job reports
what it saw by appending JSON lines to the file named in its metadata
(`"events": path`), since it lives in another process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from trunkline.worker import JobContext, JobProcess


def record(ctx: JobContext, event: str, **fields: Any) -> None:
    path = ctx.metadata.get("events")
    if path:
        with open(path, "a") as f:
            line = {"event": event, "job_id": ctx.id, "t": time.time(), **fields}
            f.write(json.dumps(line) + "\n")


async def hold(ctx: JobContext) -> None:
    """Hold for `hold_s` seconds (default 0), then end with ctx.shutdown()."""

    async def on_shutdown(reason: str) -> None:
        record(ctx, "shutdown_callback", reason=reason)

    ctx.add_shutdown_callback(on_shutdown)
    record(
        ctx,
        "started",
        pid=os.getpid(),
        url=ctx.url,
        token=ctx.token,
        identity=ctx.participant_identity,
        userdata=ctx.proc.userdata,
    )
    await asyncio.sleep(float(ctx.metadata.get("hold_s", 0)))
    record(ctx, "finished")
    ctx.shutdown("held")


async def forever(ctx: JobContext) -> None:
    """Run until shut down from outside; records the cancellation."""

    async def on_shutdown() -> None:
        record(ctx, "shutdown_callback", reason=ctx.shutdown_reason)

    ctx.add_shutdown_callback(on_shutdown)
    record(ctx, "started", pid=os.getpid())
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        record(ctx, "cancelled")
        raise


async def fail(ctx: JobContext) -> None:
    """Raise with a recognizable message."""
    record(ctx, "started", pid=os.getpid())
    raise RuntimeError(f"agent exploded on {ctx.room}")


async def crash(ctx: JobContext) -> None:
    """Kill the job process outright, as an OOM kill or segfault would."""
    record(ctx, "started", pid=os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def prewarm(proc: JobProcess) -> None:
    proc.userdata["model"] = "loaded"
    proc.userdata["prewarm_pid"] = proc.pid


def bad_prewarm(proc: JobProcess) -> None:
    raise ValueError("model file missing")


async def stubborn(ctx: JobContext) -> None:
    """Ignore cancellation, as a badly written agent might."""
    record(ctx, "started", pid=os.getpid())
    while True:
        try:
            await asyncio.sleep(3600)  # ok-sleep: an agent that blocks until cancelled
        except asyncio.CancelledError:
            record(ctx, "ignored_cancel")
