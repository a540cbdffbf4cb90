"""An unmodified-API livekit-agents worker used by the compatibility tests.

Run as `python lk_agent.py start` with LIVEKIT_URL / LIVEKIT_API_KEY /
LIVEKIT_API_SECRET pointing at trunkline. Behaviour comes from the environment
and each job's metadata (JSON):

- env TL_NO_LOAD_GUARD: no load guard and load reported as 0.
- env TL_LOAD_PER_JOB=x: the load guard stays on (threshold 0.95) and the load
  is x per running job instead of the machine's CPU, so the guard refuses
  deterministically (livekit-agents' `_is_available`: load plus reserved
  slots against the threshold; with x = 0.32 it refuses a 4th job).
- env TL_AGENT_NAME: agent name to register; env TL_TAG: this worker's tag;
  env TL_EVENTS: a file each job appends JSON lines to (start/end, metadata).
- metadata {"hold_s": 0.5} (else env TL_HOLD_S, else 0.2): how long the job runs
  before `ctx.shutdown()`; a JobTermination ends it sooner.
- metadata {"soft_reject_tag": T}: a worker tagged T answers
  `reject(terminate=False)`; {"hard_reject_tag": T}: `reject()`.
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


NO_LOAD_GUARD = bool(os.environ.get("TL_NO_LOAD_GUARD"))
LOAD_PER_JOB = float(os.environ.get("TL_LOAD_PER_JOB", "0") or 0)


def _zero_load() -> float:
    return 0.0


def _jobs_load(server: AgentServer) -> float:
    return LOAD_PER_JOB * len(server.active_jobs)


# With TL_NO_LOAD_GUARD the worker neither refuses on load nor reports any:
# its default load_fnc reports machine CPU, which on a busy 2-core CI box reaches
# 1.0 and (rightly) stops trunkline offering to it. These tests isolate
# trunkline's own slot cap.
server = AgentServer(
    port=0,
    load_threshold=float("inf") if NO_LOAD_GUARD else 0.95,
    load_fnc=_zero_load if NO_LOAD_GUARD else (_jobs_load if LOAD_PER_JOB else None),
    num_idle_processes=int(os.environ.get("TL_IDLE", "1")),
)


async def on_request(req: JobRequest) -> None:
    meta = json.loads(req.job.metadata or "{}")
    if meta.get("soft_reject_tag") == TAG:
        _record(event="soft_reject", job_id=req.id)
        await req.reject(terminate=False)
    elif meta.get("hard_reject_tag") == TAG:
        _record(event="hard_reject", job_id=req.id)
        await req.reject()
    else:
        await req.accept(identity=f"agent-{TAG}-{req.id}")


@server.rtc_session(agent_name=os.environ.get("TL_AGENT_NAME", ""), on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    meta = json.loads(ctx.job.metadata or "{}")
    _record(event="start", job_id=ctx.job.id, metadata=ctx.job.metadata)
    await asyncio.sleep(float(meta.get("hold_s", os.environ.get("TL_HOLD_S", 0.2))))
    _record(event="end", job_id=ctx.job.id)
    ctx.shutdown(reason="done")


if __name__ == "__main__":
    cli.run_app(server)
