"""REST API under `/v1`: dispatches, jobs (with traces), workers, pools.

Every endpoint needs a LiveKit server-API token (`video.roomAdmin`); the GET
endpoints also take a read-only viewer token (`video.roomList`). Errors are
JSON `{"code": ..., "message": ...}` with a stable code and a message that
names the cause (see docs/api.md).

Request limits (`dispatch_problem`, shared with Twirp): agent name as
`agent_name_problem` allows, room name <= 256 bytes, metadata <= 64 KiB, at
most 64 attributes of <= 64 KiB together. A request its pool's queue (or the
server's) has no room for is refused 429 `queue_full`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from aiohttp import web
from livekit.api.access_token import Claims

from trunkline.auth import Authenticator, AuthError, room_scope
from trunkline.core import Job, agent_name_problem
from trunkline.runtime.cluster import ClusterRefusal
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.idempotency import HEADER as IDEMPOTENCY_HEADER
from trunkline.runtime.idempotency import DispatchSpec
from trunkline.server import idempotent, job_export
from trunkline.server.job_params import ParamError, parse_query
from trunkline.server.keys import AUTH, AUTOSCALER, DISPATCHER
from trunkline.server.views import job_json, json_response, live_job_json, pool_json, worker_json
from trunkline.stores import InvalidQuery, JobRecord

routes = web.RouteTableDef()

MAX_METADATA_BYTES = 64 * 1024
MAX_ROOM_BYTES = 256
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTES_BYTES = 64 * 1024  # keys and values together
MAX_WAIT_CAP_S = 3600.0


def dispatch_problem(
    agent_name: str, room: str, metadata: str, attributes: dict[str, str]
) -> str | None:
    """Why a dispatch request's fields are out of bounds (REST and Twirp share
    these limits), or None."""
    problem = agent_name_problem(agent_name)
    if problem is not None:
        return problem
    if over_utf8(room, MAX_ROOM_BYTES):
        return f"room name exceeds {MAX_ROOM_BYTES} bytes"
    if over_utf8(metadata, MAX_METADATA_BYTES):
        return f"metadata exceeds {MAX_METADATA_BYTES} bytes"
    if not attributes:
        return None
    if len(attributes) > MAX_ATTRIBUTES:
        return f"{len(attributes)} attributes; at most {MAX_ATTRIBUTES} allowed"
    size = sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())
    if size > MAX_ATTRIBUTES_BYTES:
        return f"attributes total {size} bytes; at most {MAX_ATTRIBUTES_BYTES} allowed"
    return None


def over_utf8(text: str, limit: int) -> bool:
    """`len(text.encode()) > limit`, without encoding (copying) a text too short
    to exceed it: UTF-8 takes at most 4 bytes per character."""
    return len(text) * 4 > limit and len(text.encode()) > limit


def queue_full(job: Job) -> bool:
    """The request was refused at once because the queue had no room."""
    return job.code == "queue_full"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"code": code, "message": message, **extra}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn `ApiError`/`AuthError`/`ClusterRefusal` into JSON error responses."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except AuthError as exc:
        return error_response(exc.http_status, exc.code, exc.message)
    except ClusterRefusal as exc:
        # Cluster mode: this member may not let the request in (docs/cluster.md):
        # the pool's owner answers it instead, once.
        if exc.owner_url:
            from trunkline.server.relay import forward

            forwarded = await forward(request, exc.owner_url)
            if forwarded is not None:
                return forwarded
        if request.path.startswith("/twirp/"):
            return json_response({"code": "unavailable", "msg": exc.message}, status=503)
        extra = {"owner_url": exc.owner_url} if exc.owner_url else {}
        return error_response(503, exc.code, exc.message, **extra)


def _dispatcher(request: web.Request) -> Dispatcher:
    d: Dispatcher = request.app[DISPATCHER]
    return d


def _admin(request: web.Request, room: str = "") -> Claims:
    authn: Authenticator = request.app[AUTH]
    return authn.require_admin(request.headers.get("Authorization"), room)


def _cluster_admin(request: web.Request) -> Claims:
    """Workers and pools span every room: a room-scoped token may not see them."""
    claims = _admin(request)
    if room_scope(claims):
        raise AuthError(
            "permission_denied",
            f"token is scoped to room {room_scope(claims)!r}; this endpoint needs a roomAdmin "
            "token without a room",
        )
    return claims


def _visible(claims: Claims, job: JobRecord) -> bool:
    scope = room_scope(claims)
    return not scope or job.room == scope


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "malformed", "request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "malformed", "request body is nested too deeply") from None
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed", "request body must be a JSON object")
    return body


def _str_field(body: dict[str, Any], key: str, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ApiError(400, "invalid_argument", f"'{key}' must be a string")
    return value


@routes.post("/v1/dispatches")
async def create_dispatch(request: web.Request) -> web.Response:
    """Request a session. 201 with the job; with `wait: true`, answers once the
    job runs or ends (`max_wait_s` plus a little)."""
    claims = _admin(request)  # before the body: a bad token is 401 whatever it sent
    body = await _json_body(request)
    room = _str_field(body, "room")
    Authenticator.check_room(claims, room)
    agent_name = _str_field(body, "agent_name")
    metadata = body.get("metadata", "")
    if not isinstance(metadata, str):
        try:
            metadata = json.dumps(metadata, allow_nan=False)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_argument", "'metadata' is not valid JSON") from None
    attributes = body.get("attributes", {})
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise ApiError(400, "invalid_argument", "'attributes' must be an object of strings")
    problem = dispatch_problem(agent_name, room, metadata, attributes)
    if problem is not None:
        raise ApiError(400, "invalid_argument", problem)
    max_wait = body.get("max_wait_s")
    if max_wait is not None and (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or not math.isfinite(max_wait)
        or not 0 <= max_wait <= MAX_WAIT_CAP_S
    ):
        raise ApiError(
            400, "invalid_argument", f"'max_wait_s' must be a number in [0, {MAX_WAIT_CAP_S:g}]"
        )
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise ApiError(400, "invalid_argument", "'wait' must be true or false")
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None:  # a retry gets the same job (server/idempotent.py)
        wait_s = float(max_wait) if max_wait is not None else None
        spec = DispatchSpec(agent_name, room, metadata, attributes, wait_s)
        return await idempotent.rest_dispatch(request, claims, key, spec, wait)
    d = _dispatcher(request)
    job = d.request(
        agent_name,
        room=room,
        metadata=metadata,
        max_wait_s=float(max_wait) if max_wait is not None else None,
        attributes=attributes or None,
    )
    if queue_full(job):
        return error_response(429, "queue_full", job.reason, job_id=job.id)
    if wait:
        await d.wait_started(job, job.max_wait_s + 10.0)
    # Straight from the live job: a snapshot record per dispatch cost as much as its JSON.
    return json_response(live_job_json(job, d.wall_offset), status=201)


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    claims = request.app[AUTH].require_reader(request.headers.get("Authorization"))
    d = _dispatcher(request)
    job = await d.find_job(request.match_info["job_id"])
    if job is None or not _visible(claims, job):
        raise ApiError(
            404, "not_found", f"no job {request.match_info['job_id']!r} (live or in history)"
        )
    return json_response(job_json(job))


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.StreamResponse:
    """Jobs, live first, then ended newest first, a page at a time
    (`next_cursor`), or every match streamed as `format=csv|jsonl`; filters
    and formats in `server.job_params` and docs/api.md."""
    claims = request.app[AUTH].require_reader(request.headers.get("Authorization"))
    query = {k: request.query.getall(k) for k in request.query}
    try:
        q = parse_query(query, now=time.time())
    except ParamError as exc:
        raise ApiError(400, "invalid_argument", str(exc)) from None
    scope = room_scope(claims)
    if scope:  # a room-scoped token sees its room only
        if q.flt.room is not None and q.flt.room != scope:
            raise AuthError("permission_denied", f"token is scoped to room {scope!r}")
        q = dataclasses.replace(q, flt=dataclasses.replace(q.flt, room=scope))
    d = _dispatcher(request)
    try:
        if q.format != "json":
            return await job_export.stream(request, d, q)
        assert q.limit is not None
        page = await d.query_jobs(q.flt, limit=q.limit, cursor=q.cursor)
    except InvalidQuery as exc:
        raise ApiError(400, "invalid_argument", str(exc)) from None
    return json_response(
        {"jobs": [job_json(j, trace=False) for j in page.jobs], "next_cursor": page.next_cursor}
    )


@routes.delete("/v1/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.Response:
    """Terminate a job. A placed job is told to stop and keeps its slot until
    the worker confirms; the response shows the state at that moment."""
    claims = _admin(request)
    d = _dispatcher(request)
    job_id = request.match_info["job_id"]
    live = d.live_job(job_id)
    if live is not None and not _visible(claims, d.record(live)):
        # as if it did not exist: a scoped token learns nothing about other rooms
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if live is None:
        ended = await d.find_job(job_id)
        if ended is None or not _visible(claims, ended):
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        raise ApiError(409, "failed_precondition", f"job {job_id} already ended ({ended.state})")
    d.cancel(job_id, "terminated by API request")
    return json_response(job_json(d.record(live)))


@routes.get("/v1/workers")
async def list_workers(request: web.Request) -> web.Response:
    request.app[AUTH].require_reader(request.headers.get("Authorization"), all_rooms=True)
    d = _dispatcher(request)
    return json_response({"workers": [worker_json(w) for w in d.workers()]})


@routes.post("/v1/workers/{worker_id}/drain")
async def drain_worker(request: web.Request) -> web.Response:
    """Stop offering jobs to a worker; its running jobs continue."""
    _cluster_admin(request)
    d = _dispatcher(request)
    wid = request.match_info["worker_id"]
    w = d.worker(wid)
    if w is None or not d.drain(wid):
        raise ApiError(404, "not_found", f"no connected worker {wid!r}")
    return json_response(worker_json(w))


@routes.get("/v1/pools")
async def list_pools(request: web.Request) -> web.Response:
    request.app[AUTH].require_reader(request.headers.get("Authorization"), all_rooms=True)
    d = _dispatcher(request)
    scaler = request.app.get(AUTOSCALER)  # AutoscaleController, when pools have `command`
    pools = []
    for pool in d.pools():
        entry = pool_json(pool)
        name = pool.name
        entry["autoscale"] = scaler.settings_json(name) if scaler else None
        entry["replicas"] = scaler.replicas_json(name) if scaler else []
        entry["scale_events"] = scaler.events_json(name) if scaler else []
        entry["rollout"] = scaler.rollout_json(name) if scaler else None
        pools.append(entry)
    return json_response({"pools": pools})
