"""The JSON views of jobs, workers and pools: one shape for REST, Twirp and
the dashboard, so they cannot drift apart. Times are Unix seconds.

JSON leaves the server strictly: `json_dumps` / `json_response` refuse NaN and
infinities (`allow_nan=False`) instead of writing the `NaN` tokens that
`json.dumps` allows and every JSON parser, the dashboard's included, rejects.
Every HTTP surface answers through them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from trunkline.core import TERMINAL, Job, TraceEvent, Worker
from trunkline.core.pool import Pool
from trunkline.stores import JobRecord, TraceRecord

_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)

# Compact and strict: a non-finite float raises ValueError rather than
# producing invalid JSON (inputs are checked so none gets this far). One
# encoder for every call: `json.dumps` with options builds a new one each time.
json_dumps = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`data` as an `application/json` response, encoded by `json_dumps`."""
    return web.json_response(data, status=status, headers=headers, dumps=json_dumps)


def served_version(r: JobRecord) -> str:
    """The version of the replica that served the job: its trace's last
    `version` event (docs/rollout.md); "" when its worker had none."""
    return _trace_version(r.trace)


def _trace_version(trace: Sequence[TraceEvent | TraceRecord]) -> str:
    for ev in reversed(trace):
        if ev.event == "version":
            return ev.detail or ""
    return ""


def job_json(r: JobRecord, *, trace: bool = True, metadata: bool = True) -> dict[str, Any]:
    """A job (live snapshot or stored record) as the API shows it."""
    out: dict[str, Any] = {
        "job_id": r.job_id,
        "dispatch_id": r.dispatch_id,
        "agent_name": r.agent_name,
        "room": r.room,
    }
    if metadata:
        out["metadata"] = r.metadata
    out.update(
        {
            "state": r.state,
            "ended": r.state in _TERMINAL_VALUES,
            "reason": r.reason,
            "worker_id": r.worker_id,
            "created_at": r.created_at,
            "placed_at": r.placed_at,
            "running_at": r.running_at,
            "ended_at": r.ended_at,
            "queue_wait_s": round(r.queue_wait_s, 6),
            "max_wait_s": r.max_wait_s,
            "replica_id": r.replica_id,
            "version": served_version(r),
            "sip": None
            if r.sip is None
            else {
                "call_id": r.sip.call_id,
                "from": r.sip.from_number,
                "to": r.sip.to_number,
                "trunk": r.sip.trunk,
                "final_status": r.sip.final_status,
            },
        }
    )
    if trace:
        out["trace"] = [
            {
                "at": ev.at,
                "t_ms": round((ev.at - r.created_at) * 1000, 3),
                "event": ev.event,
                "worker_id": ev.worker_id,
                "detail": ev.detail,
            }
            for ev in r.trace
        ]
    return out


def live_job_json(job: Job, wall_offset: float) -> dict[str, Any]:
    """`job_json(JobRecord.from_job(job, wall_offset))` for a job of no SIP call
    (what a REST dispatch makes), built without the record: the 201 of every
    dispatch, where the snapshot was a tenth of the server's extra work per
    job. Same keys, order and values (tests/server/test_views.py pins it)."""
    created = job.created_at + wall_offset
    return {
        "job_id": job.id,
        "dispatch_id": job.dispatch_id,
        "agent_name": job.agent_name,
        "room": job.room,
        "metadata": job.metadata,
        "state": job.state.value,
        "ended": job.state.terminal,
        "reason": job.reason,
        "worker_id": job.worker_id,
        "created_at": created,
        "placed_at": None if job.placed_at is None else job.placed_at + wall_offset,
        "running_at": None if job.running_at is None else job.running_at + wall_offset,
        "ended_at": None if job.ended_at is None else job.ended_at + wall_offset,
        "queue_wait_s": round(job.queue_wait_s, 6),
        "max_wait_s": job.max_wait_s,
        "replica_id": None,
        "version": _trace_version(job.trace),
        "sip": None,
        "trace": [
            {
                "at": (at := ev.at + wall_offset),
                "t_ms": round((at - created) * 1000, 3),
                "event": ev.event,
                "worker_id": ev.worker_id,
                "detail": ev.detail,
            }
            for ev in job.trace
        ],
    }


def job_row(r: JobRecord) -> dict[str, Any]:
    """A job as one line of a list (the dashboard's job table)."""
    return {
        "job_id": r.job_id,
        "agent_name": r.agent_name,
        "state": r.state,
        "worker_id": r.worker_id,
        "created_at": r.created_at,
        "ended_at": r.ended_at,
        "reason": r.reason,
    }


def worker_json(w: Worker, *, detail: bool = True) -> dict[str, Any]:
    """A connected worker: its slots (used = running + reserved) and why it
    does or does not get offers (`state`)."""
    running = w.running
    out: dict[str, Any] = {
        "worker_id": w.id,
        "agent_name": w.agent_name,
        "capacity": w.capacity,
        "used": w.used,
        "running": running,
        "reserved": w.used - running,
        "state": w.state,
        "load": w.load,
        "jobs": sorted(w.jobs),
    }
    if detail:
        out.update(
            {
                "offers": len(w.offers),
                "status": w.status.value,
                "draining": w.draining,
                "benched": w.cooldown_until is not None,
                "suspended": w.suspended,
                "strikes": w.strikes,
            }
        )
    return out


def pool_json(pool: Pool) -> dict[str, Any]:
    """A pool: its workers' slots, queue and settings (autoscale parts are
    added by the caller when the pool is autoscaled)."""
    cfg = pool.config
    return {
        "agent_name": pool.name,
        "workers": len(pool.workers),
        "slots_used": sum(w.used for w in pool.workers.values()),
        "slots_free": pool.free_slots(),
        "queued": pool.queued,
        "active_jobs": pool.active,
        "config": {
            "max_jobs_per_worker": cfg.max_jobs_per_worker,
            "max_concurrent_jobs": cfg.max_concurrent_jobs,
            "queue_max_wait_s": cfg.queue_max_wait_s,
            "availability_timeout_s": cfg.availability_timeout_s,
            "placement": cfg.placement.value,
            "load_threshold": cfg.load_threshold,
            "reconnect_grace_s": cfg.reconnect_grace_s,
            "redispatch_on_worker_loss": cfg.redispatch_on_worker_loss,
            "max_queued": cfg.max_queued,
            "terminate_timeout_s": cfg.terminate_timeout_s,
        },
    }


def is_terminal(state: str) -> bool:
    return state in _TERMINAL_VALUES


__all__ = [
    "is_terminal",
    "job_json",
    "job_row",
    "json_dumps",
    "json_response",
    "live_job_json",
    "pool_json",
    "worker_json",
]
