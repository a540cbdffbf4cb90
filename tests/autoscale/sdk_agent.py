"""A trunkline SDK agent for the autoscale tests, run by the local provider as
`trunkline worker sdk_agent:entrypoint` (PYTHONPATH = this directory).

Each job appends `start` and `end` lines (JSON: event, job_id, replica, t) to
the file named by env TL_EVENTS, so the tests see, from the replicas' side,
how many calls each replica held at every instant. metadata {"hold_s": S}
(default 1) is how long the call lasts; {"until": PATH} holds it instead
until that file exists (a test ends the call when its scenario needs).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from trunkline.worker import JobContext


def _record(event: str, job_id: str) -> None:
    line = json.dumps(
        {
            "event": event,
            "job_id": job_id,
            "replica": os.environ.get("TRUNKLINE_REPLICA_ID", "?"),
            "t": time.time(),
        }
    )
    fd = os.open(os.environ["TL_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def entrypoint(ctx: JobContext) -> None:
    """Record the start, hold the call, record the end, hang up."""
    _record("start", ctx.id)
    until = ctx.metadata.get("until")
    if until:
        # Another process creates the file: there is no event to wait on.
        while not os.path.exists(until):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
    else:
        await asyncio.sleep(float(ctx.metadata.get("hold_s", 1)))
    _record("end", ctx.id)
    ctx.shutdown("call complete")
