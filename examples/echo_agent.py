"""Echo agent: the smallest trunkline worker.

Each job logs its metadata, holds the "call" for `hold_s` seconds (from the
job's JSON metadata, default 1), then ends itself with `ctx.shutdown()`.

Run it against a server (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET set)::

    trunkline worker examples.echo_agent:entrypoint --max-jobs 4 --agent-name echo
    python examples/echo_agent.py
"""

from __future__ import annotations

import asyncio
import logging

from trunkline.worker import JobContext, WorkerOptions, run_app

logger = logging.getLogger("echo_agent")


async def entrypoint(ctx: JobContext) -> None:
    """Hold the job for `metadata["hold_s"]` seconds (default 1), then end it."""
    logger.info(
        "job metadata", extra={"job_id": ctx.id, "room": ctx.room, "metadata": ctx.metadata}
    )
    await asyncio.sleep(float(ctx.metadata.get("hold_s", 1)))
    ctx.shutdown("call complete")


if __name__ == "__main__":
    raise SystemExit(run_app(WorkerOptions(entrypoint_fnc=entrypoint, agent_name="echo")))
