"""Twirp for the LiveKit double: `AgentDispatchService` (livekit/livekit
`pkg/service/agent_dispatch_service.go`: admin grant, room auto-created, then
`Room.AddAgentDispatch`) and `RoomService` basics (`roomservice.go`: CreateRoom
and DeleteRoom need `roomCreate`, ListRooms `roomList`, participants
`roomAdmin`). Bodies are protobuf (what livekit-api sends) or JSON; errors are
Twirp JSON `{code, msg}` with a 4xx status (a 5xx would send livekit-api's
client into its region failover)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from livekit.protocol import agent_dispatch, models, room

if TYPE_CHECKING:
    from livekit.lk_double import LiveKitDouble


def twirp_handler(d: LiveKitDouble) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler for `POST /twirp/livekit.{service}/{method}`."""

    async def handle(request: web.Request) -> web.Response:
        service, method = request.match_info["service"], request.match_info["method"]
        claims = d.claims(request.headers.get("Authorization"))
        if claims is None:
            return _twirp_error(401, "unauthenticated", "invalid token")
        handler = _TWIRP.get((service, method))
        if handler is None:
            return _twirp_error(404, "bad_route", f"no handler for {service}/{method}")
        req_cls, grant, fn = handler
        body = await request.read()
        json_body = "json" in request.headers.get("Content-Type", "")
        req = req_cls()
        try:
            if json_body:
                json_format.Parse(body.decode() or "{}", req)
            else:
                req.ParseFromString(body)
        except Exception as exc:
            return _twirp_error(400, "malformed", str(exc))
        if not getattr(claims.video, grant):
            return _twirp_error(401, "unauthenticated", f"requires the {grant} grant")
        try:
            resp = fn(d, req)
        except KeyError as exc:
            return _twirp_error(404, "not_found", str(exc))
        if json_body:
            return web.Response(
                text=json_format.MessageToJson(resp), content_type="application/json"
            )
        return web.Response(body=resp.SerializeToString(), content_type="application/protobuf")

    return handle


def _twirp_error(status: int, code: str, msg: str) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status)


def _create_dispatch(
    d: LiveKitDouble, req: agent_dispatch.CreateAgentDispatchRequest
) -> agent_dispatch.AgentDispatch:
    return d.add_dispatch(req.room, req.agent_name, req.metadata, dict(req.attributes))


def _list_dispatch(
    d: LiveKitDouble, req: agent_dispatch.ListAgentDispatchRequest
) -> agent_dispatch.ListAgentDispatchResponse:
    r = d.rooms.get(req.room)
    found = [
        x
        for x in (r.dispatches.values() if r else ())
        if x.id == req.dispatch_id or not req.dispatch_id
    ]
    return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=found)


def _create_room(d: LiveKitDouble, req: room.CreateRoomRequest) -> models.Room:
    return d.create_room(req.name, list(req.agents) or None).proto


def _list_rooms(d: LiveKitDouble, req: room.ListRoomsRequest) -> room.ListRoomsResponse:
    names = set(req.names)
    return room.ListRoomsResponse(
        rooms=[r.proto for n, r in d.rooms.items() if not names or n in names]
    )


def _delete_room(d: LiveKitDouble, req: room.DeleteRoomRequest) -> room.DeleteRoomResponse:
    d.delete_room(req.room)
    return room.DeleteRoomResponse()


def _list_participants(
    d: LiveKitDouble, req: room.ListParticipantsRequest
) -> room.ListParticipantsResponse:
    r = d.rooms.get(req.room)
    if r is None:
        raise KeyError(f"room {req.room} not found")
    return room.ListParticipantsResponse(participants=list(r.participants.values()))


def _remove_participant(
    d: LiveKitDouble, req: room.RoomParticipantIdentity
) -> room.RemoveParticipantResponse:
    d.leave(req.room, req.identity)
    return room.RemoveParticipantResponse()


_TWIRP: dict[tuple[str, str], tuple[type[Message], str, Any]] = {
    ("AgentDispatchService", "CreateDispatch"): (
        agent_dispatch.CreateAgentDispatchRequest, "room_admin", _create_dispatch,
    ),
    ("AgentDispatchService", "ListDispatch"): (
        agent_dispatch.ListAgentDispatchRequest, "room_admin", _list_dispatch,
    ),
    ("RoomService", "CreateRoom"): (room.CreateRoomRequest, "room_create", _create_room),
    ("RoomService", "ListRooms"): (room.ListRoomsRequest, "room_list", _list_rooms),
    ("RoomService", "DeleteRoom"): (room.DeleteRoomRequest, "room_create", _delete_room),
    ("RoomService", "ListParticipants"): (
        room.ListParticipantsRequest, "room_admin", _list_participants,
    ),
    ("RoomService", "RemoveParticipant"): (
        room.RoomParticipantIdentity, "room_admin", _remove_participant,
    ),
}  # fmt: skip
