"""LiveKit's `AgentDispatchService` over Twirp, so `livekit-api` works unchanged.

`POST /twirp/livekit.AgentDispatchService/{CreateDispatch,ListDispatch,
DeleteDispatch}` with a protobuf (`application/protobuf`) or JSON
(`application/json`, protojson field names) body; the reply uses the same
encoding. Errors follow Twirp: JSON `{"code", "msg"}` with the matching HTTP
status. A dispatch maps to exactly one job here (dispatch id = job's
`dispatch_id`), whose state is reported in `AgentDispatch.state.jobs`.

`CreateDispatch` has REST's limits (`rest.dispatch_problem`: agent name, room,
64 KiB of metadata, 64 attributes of 64 KiB together) and is refused
`resource_exhausted` (HTTP 429) when the queue has no room (`queue_full`).
"""

from __future__ import annotations

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.api.access_token import Claims
from livekit.protocol import agent, agent_dispatch

from trunkline.auth import Authenticator, AuthError, room_scope
from trunkline.core import TERMINAL, Job, JobState
from trunkline.runtime.dispatcher import Dispatcher, job_proto
from trunkline.runtime.idempotency import HEADER as IDEMPOTENCY_HEADER
from trunkline.runtime.idempotency import DispatchSpec
from trunkline.server import idempotent
from trunkline.server.keys import AUTH, DISPATCHER
from trunkline.server.rest import dispatch_problem, queue_full
from trunkline.server.views import json_response

PREFIX = "/twirp/livekit.AgentDispatchService/"

_TWIRP_STATUS = {
    "malformed": 400,
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 412,
    "bad_route": 404,
    "resource_exhausted": 429,
    "internal": 500,
}

_STATUS = {
    JobState.QUEUED: agent.JobStatus.JS_PENDING,
    JobState.OFFERED: agent.JobStatus.JS_PENDING,
    JobState.ASSIGNED: agent.JobStatus.JS_PENDING,
    JobState.RUNNING: agent.JobStatus.JS_RUNNING,
    JobState.ORPHANED: agent.JobStatus.JS_RUNNING,
    JobState.TERMINATING: agent.JobStatus.JS_RUNNING,
    JobState.SUCCEEDED: agent.JobStatus.JS_SUCCESS,
}


def twirp_error(code: str, msg: str) -> web.Response:
    return json_response({"code": code, "msg": msg}, status=_TWIRP_STATUS.get(code, 500))


class _Codec:
    def __init__(self, request: web.Request) -> None:
        ctype = request.content_type
        if ctype == "application/protobuf":
            self.json = False
        elif ctype == "application/json":
            self.json = True
        else:
            raise _TwirpError("bad_route", f"unsupported Content-Type {ctype!r}")

    def decode(self, body: bytes, msg: Message) -> None:
        try:
            if self.json:
                json_format.Parse(body or b"{}", msg, ignore_unknown_fields=False)
            else:
                msg.ParseFromString(body)
        except (DecodeError, json_format.ParseError) as exc:
            raise _TwirpError("malformed", f"request body does not decode: {exc}") from None
        except RecursionError:
            raise _TwirpError("malformed", "request body is nested too deeply") from None

    def respond(self, msg: Message) -> web.Response:
        if self.json:
            return web.Response(
                text=json_format.MessageToJson(msg), content_type="application/json"
            )
        return web.Response(body=msg.SerializeToString(), content_type="application/protobuf")


class _TwirpError(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _job_pb(d: Dispatcher, job: Job) -> agent.Job:
    failed = job.state.terminal and job.state is not JobState.SUCCEEDED
    state = agent.JobState(
        status=_STATUS.get(job.state, agent.JobStatus.JS_FAILED),
        error=job.reason if failed else "",
        worker_id=job.worker_id or "",
        participant_identity=job.accept.identity if job.accept else "",
    )
    for field, t in (("started_at", job.running_at), ("ended_at", job.ended_at)):
        wall = d.wall(t)
        if wall is not None:
            setattr(state, field, int(wall * 1e9))
    pb = job_proto(job)
    pb.state.CopyFrom(state)
    return pb


def _dispatch_pb(d: Dispatcher, job: Job) -> agent_dispatch.AgentDispatch:
    created = d.wall(job.created_at) or 0.0
    state = agent_dispatch.AgentDispatchState(jobs=[_job_pb(d, job)], created_at=int(created * 1e9))
    if job.state in TERMINAL and job.ended_at is not None:
        state.deleted_at = int((d.wall(job.ended_at) or 0.0) * 1e9)
    return agent_dispatch.AgentDispatch(
        id=job.dispatch_id,
        agent_name=job.agent_name,
        room=job.room,
        metadata=job.metadata,
        state=state,
    )


async def twirp_handler(request: web.Request) -> web.Response:
    method = request.match_info["method"]
    try:
        authn: Authenticator = request.app[AUTH]
        # The token first, whatever the body: a bad one is 401, never `malformed`.
        # The room scope is checked once the body says which room.
        claims = authn.require_admin(request.headers.get("Authorization"))
        codec = _Codec(request)
        body = await request.read()
        d: Dispatcher = request.app[DISPATCHER]
        if method == "CreateDispatch":
            req = agent_dispatch.CreateAgentDispatchRequest()
            codec.decode(body, req)
            authn.check_room(claims, req.room)
            if not req.room:
                raise _TwirpError("invalid_argument", "room is required")
            attributes = dict(req.attributes)
            problem = dispatch_problem(req.agent_name, req.room, req.metadata, attributes)
            if problem is not None:
                raise _TwirpError("invalid_argument", problem)
            key = request.headers.get(IDEMPOTENCY_HEADER)
            if key is not None:  # a retry gets the same dispatch (server/idempotent.py)
                return await _keyed_create(request, claims, key, req, attributes, codec)
            job = d.request(
                req.agent_name,
                room=req.room,
                metadata=req.metadata,
                attributes=attributes,
            )
            if queue_full(job):
                raise _TwirpError("resource_exhausted", job.reason)
            return codec.respond(_dispatch_pb(d, job))
        if method == "ListDispatch":
            lreq = agent_dispatch.ListAgentDispatchRequest()
            codec.decode(body, lreq)
            authn.check_room(claims, lreq.room)
            room = lreq.room or room_scope(claims)  # a room-scoped token lists its room only
            found = [_dispatch_pb(d, j) for j in d.live_dispatches(room, lreq.dispatch_id)]
            return codec.respond(agent_dispatch.ListAgentDispatchResponse(agent_dispatches=found))
        if method == "DeleteDispatch":
            dreq = agent_dispatch.DeleteAgentDispatchRequest()
            codec.decode(body, dreq)
            authn.check_room(claims, dreq.room)
            room = dreq.room or room_scope(claims)
            deleted = d.cancel_dispatch(dreq.dispatch_id, room, "dispatch deleted")
            if deleted is not None:
                return codec.respond(_dispatch_pb(d, deleted))
            raise _TwirpError("not_found", f"no live dispatch {dreq.dispatch_id!r}")
        raise _TwirpError("bad_route", f"no method {method!r} on AgentDispatchService")
    except _TwirpError as exc:
        return twirp_error(exc.code, exc.msg)
    except AuthError as exc:
        return twirp_error(exc.code, exc.message)


async def _keyed_create(
    request: web.Request,
    claims: Claims,
    key: str,
    req: agent_dispatch.CreateAgentDispatchRequest,
    attributes: dict[str, str],
    codec: _Codec,
) -> web.Response:
    spec = DispatchSpec(req.agent_name, req.room, req.metadata, attributes, None)
    try:
        got = await idempotent.keyed_job(request, claims, key, spec)
    except idempotent.KeyRefused as exc:
        code = {422: "already_exists", 409: "failed_precondition"}.get(exc.status, exc.code)
        return twirp_error(code, exc.message)
    d: Dispatcher = request.app[DISPATCHER]
    if got.job is None:
        assert got.record is not None
        return codec.respond(idempotent.record_dispatch_pb(got.record))
    if not got.replayed and queue_full(got.job):
        return twirp_error("resource_exhausted", got.job.reason)
    return codec.respond(_dispatch_pb(d, got.job))
