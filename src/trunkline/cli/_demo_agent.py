"""The sample agent `trunkline demo` scales: each job is a "call" that holds
for `metadata["hold_s"]` seconds (default 8), then ends itself.

It is an ordinary trunkline SDK entrypoint, run by the demo's replicas as
`trunkline worker trunkline.cli._demo_agent:entrypoint --max-jobs N`.
"""

from __future__ import annotations

import asyncio

from trunkline.worker import JobContext


async def entrypoint(ctx: JobContext) -> None:
    """Hold the call for `hold_s` seconds, then hang up."""
    await asyncio.sleep(float(ctx.metadata.get("hold_s", 8)))
    ctx.shutdown("call complete")
