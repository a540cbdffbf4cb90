"""`Idempotency-Key` on the create endpoints (REST `POST /v1/dispatches`, Twirp
`CreateDispatch`), and cluster mode's answer-after-record middleware.

The logic is `runtime.idempotency`; this is its HTTP side. A request
without the header never comes here (the handlers look the header up once).
Answers: a new job as the endpoint answers it (201); a retry gets the
same job as it is now, with the endpoint's status and
`Idempotent-Replayed: true`; the key used before with a different request
is 422 `idempotency_key_reused` naming the fields; a key bound to a job
this server cannot find is 409 `idempotency_key_unresolved`; a malformed
key is 400 `invalid_argument`.
"""

from __future__ import annotations

from typing import Any

import jwt
from aiohttp import web
from livekit.api.access_token import Claims
from livekit.protocol import agent, agent_dispatch

from trunkline.auth import room_scope
from trunkline.core import Job
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.idempotency import (
    DispatchSpec,
    IdempotencyKeys,
    IdempotencyMismatch,
    IdempotencyUnresolved,
    Outcome,
    RecordWaits,
    key_problem,
    scoped_key,
)
from trunkline.server.keys import DISPATCHER, IDEMPOTENCY
from trunkline.server.views import job_json, json_response, live_job_json
from trunkline.stores import JobRecord

__all__ = ["KeyRefused", "answer_after_record", "keyed_job", "record_dispatch_pb", "rest_dispatch"]

REPLAYED = {"Idempotent-Replayed": "true"}


class KeyRefused(Exception):
    """The key cannot be served: `status`, stable `code`, `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _scope(request: web.Request, claims: Claims) -> tuple[str, str, str]:
    """(API key, token identity, token room scope) of a verified request."""
    token = request.headers.get("Authorization", "").partition(" ")[2].strip()
    try:  # verified already (the claims): only read which key signed it
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss", "")
    except jwt.PyJWTError:
        iss = ""
    return str(iss), claims.identity or "", room_scope(claims)


async def keyed_job(request: web.Request, claims: Claims, key: str, spec: DispatchSpec) -> Outcome:
    """The job for this keyed create request (new or replayed); raises
    `KeyRefused`, or `ClusterRefusal` (forwarded / 503 by the middleware)."""
    problem = key_problem(key)
    if problem is not None:
        raise KeyRefused(400, "invalid_argument", problem)
    keys: IdempotencyKeys = request.app[IDEMPOTENCY]
    d: Dispatcher = request.app[DISPATCHER]
    scoped = scoped_key(*_scope(request, claims), key)

    def make(job_id: str) -> Job:
        return d.request(
            spec.agent_name,
            room=spec.room,
            metadata=spec.metadata,
            max_wait_s=spec.max_wait_s,
            attributes=spec.attributes or None,
            job_id=job_id,
        )

    try:
        return await keys.dispatch(key, scoped, spec, make)
    except IdempotencyMismatch as exc:
        raise KeyRefused(422, "idempotency_key_reused", exc.message) from None
    except IdempotencyUnresolved as exc:
        raise KeyRefused(409, "idempotency_key_unresolved", exc.message) from None


async def rest_dispatch(
    request: web.Request, claims: Claims, key: str, spec: DispatchSpec, wait: bool
) -> web.Response:
    """`POST /v1/dispatches` with an `Idempotency-Key` (see the module docstring)."""
    try:
        got = await keyed_job(request, claims, key, spec)
    except KeyRefused as exc:
        return _error(exc.status, exc.code, exc.message)
    d: Dispatcher = request.app[DISPATCHER]
    job = got.job
    if job is not None:
        if not got.replayed and job.code == "queue_full":
            return _error(429, "queue_full", job.reason, job_id=job.id)
        if wait:
            await d.wait_started(job, job.max_wait_s + 10.0)
        body = live_job_json(job, d.wall_offset)
    else:
        assert got.record is not None
        body = job_json(got.record)
    return json_response(body, status=201, headers=REPLAYED if got.replayed else None)


def record_dispatch_pb(rec: JobRecord) -> agent_dispatch.AgentDispatch:
    """An ended job's dispatch as Twirp shows it (a replayed `CreateDispatch`)."""
    ok = rec.state == "succeeded"
    state = agent.JobState(
        status=agent.JobStatus.JS_SUCCESS if ok else agent.JobStatus.JS_FAILED,
        error="" if ok else rec.reason,
        worker_id=rec.worker_id or "",
    )
    for field, t in (("started_at", rec.running_at), ("ended_at", rec.ended_at)):
        if t is not None:
            setattr(state, field, int(t * 1e9))
    job = agent.Job(
        id=rec.job_id,
        dispatch_id=rec.dispatch_id,
        agent_name=rec.agent_name,
        metadata=rec.metadata,
        state=state,
    )
    job.room.name = rec.room
    job.attributes.update(rec.attributes_dict)
    out = agent_dispatch.AgentDispatch(
        id=rec.dispatch_id, agent_name=rec.agent_name, room=rec.room, metadata=rec.metadata
    )
    out.state.jobs.append(job)
    out.state.created_at = int(rec.created_at * 1e9)
    if rec.ended_at is not None:
        out.state.deleted_at = int(rec.ended_at * 1e9)
    return out


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"code": code, "message": message, **extra}, status=status)


@web.middleware
async def answer_after_record(request: web.Request, handler: Any) -> web.StreamResponse:
    """Cluster mode: a request that admitted jobs answers once their records
    are in the store; a job whose record this member can no longer write
    (it lost the pool) is cancelled and the request answered 503."""
    if request.method != "POST":
        response: web.StreamResponse = await handler(request)
        return response
    with RecordWaits.collecting() as waits:
        response = await handler(request)
    if not waits.writes:
        return response
    refused = await waits.settle()
    if not refused or response.prepared:
        return response  # a streamed answer (SIP join) went out already: it says it itself
    d: Dispatcher = request.app[DISPATCHER]
    for job_id in refused:
        d.cancel(job_id, "not recorded: this member lost the pool before its record was written")
    message = (
        f"job {', '.join(refused)} could not be recorded (this member lost the pool); "
        "it was cancelled: retry (with the same Idempotency-Key, if one was sent)"
    )
    if request.path.startswith("/twirp/"):
        return json_response({"code": "unavailable", "msg": message}, status=503)
    return _error(503, "cluster_unavailable", message)
