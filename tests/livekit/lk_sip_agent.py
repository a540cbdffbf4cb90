"""A livekit-agents 1.8.9 worker for the SIP-through-LiveKit tests (run as
`python lk_sip_agent.py start`, LIVEKIT_URL pointing at trunkline).

Each job appends JSON lines to env TL_EVENTS: `start` with its id, room,
metadata and the URL and token of its assignment; then it "connects" to the
room by posting that token to the LiveKit SIP stand-in's `/join` (env
TL_JOIN_URL: there is no media server, the stand-in admits it into the
LiveKit double's room as the LiveKit server would, from the token); at the
job's end (a JobTermination when the call ends, or TL_HOLD_S, default 60)
it posts `/leave` and records `end`. No load guard: trunkline holds the cap.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
from livekit.agents import AgentServer, JobContext, JobRequest, cli

EVENTS = os.environ["TL_EVENTS"]
JOIN_URL = os.environ["TL_JOIN_URL"]


def _record(**fields: object) -> None:
    line = json.dumps({"t": time.time(), **fields}) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _zero_load() -> float:
    return 0.0


server = AgentServer(
    port=0,
    load_threshold=float("inf"),
    load_fnc=_zero_load,
    num_idle_processes=int(os.environ.get("TL_IDLE", "4")),
)


async def on_request(req: JobRequest) -> None:
    await req.accept(identity=f"agent-{req.id}", name="SIP agent")


async def _post(path: str, token: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(JOIN_URL + path, json={"token": token}) as r:
        return r.status


@server.rtc_session(agent_name=os.environ.get("TL_AGENT_NAME", ""), on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    token = ctx._info.token  # the RunningJobInfo: the assignment's token
    _record(
        event="start",
        job_id=job.id,
        room=job.room.name,
        metadata=job.metadata,
        url=ctx._info.url,
        token=token,
    )

    async def leave(reason: str) -> None:
        await _post("/leave", token)
        _record(event="end", job_id=job.id, reason=reason)

    ctx.add_shutdown_callback(leave)
    status = await _post("/join", token)
    _record(event="joined", job_id=job.id, status=status)
    await asyncio.sleep(float(os.environ.get("TL_HOLD_S", "60")))
    ctx.shutdown(reason="held long enough")


if __name__ == "__main__":
    cli.run_app(server)
