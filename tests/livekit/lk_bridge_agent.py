"""A livekit-agents 1.8.9 worker for the bridge tests (run as
`python lk_bridge_agent.py start`, LIVEKIT_URL pointing at trunkline).

Each job appends JSON lines to env TL_EVENTS: `start` with what the job was
given (its id, room, type, participant, metadata, and the URL and token of
its assignment, which for a bridged job come from the LiveKit server), then
`end`. The job holds for metadata `hold_s` (else env TL_HOLD_S, else 0.2),
or with metadata `release` (a path) until that file exists (for at most 120
s), and calls `ctx.shutdown()` (there is no media server to join). No load guard:
trunkline alone holds the cap.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from livekit.agents import AgentServer, JobContext, JobRequest, cli

TAG = os.environ.get("TL_TAG", "w")
EVENTS = os.environ["TL_EVENTS"]


def _record(**fields: object) -> None:
    line = json.dumps({"tag": TAG, "t": time.time(), **fields}) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def _released(path: str, limit_s: float) -> None:
    """Return once the file `path` exists (the test's signal, written by
    another process, so it is polled) or after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(os.path.exists, path):
            return
        await asyncio.sleep(0.05)


def _zero_load() -> float:
    return 0.0


server = AgentServer(
    port=0,
    load_threshold=float("inf"),
    load_fnc=_zero_load,
    num_idle_processes=int(os.environ.get("TL_IDLE", "1")),
)


async def on_request(req: JobRequest) -> None:
    await req.accept(
        identity=f"agent-{TAG}-{req.id}",
        name=f"Agent {TAG}",
        metadata=json.dumps({"tag": TAG}),
        attributes={"tl.tag": TAG},
    )


@server.rtc_session(agent_name=os.environ.get("TL_AGENT_NAME", ""), on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    info = ctx._info  # the RunningJobInfo: the assignment's URL and token
    _record(
        event="start",
        job_id=job.id,
        room=job.room.name,
        room_sid=job.room.sid,
        type=int(job.type),
        participant=job.participant.identity,
        metadata=job.metadata,
        url=info.url,
        token=info.token,
    )
    meta = json.loads(job.metadata or "{}")
    release = meta.get("release")
    if release:
        await _released(release, 120.0)
    else:
        await asyncio.sleep(float(meta.get("hold_s", os.environ.get("TL_HOLD_S", 0.2))))
    _record(event="end", job_id=job.id)
    ctx.shutdown(reason="done")


if __name__ == "__main__":
    cli.run_app(server)
