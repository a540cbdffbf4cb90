"""A stand-in for LiveKit SIP's inbound side (no livekit-sip binary can run
here), over UDP on loopback, creating its rooms and SIP participants in the
LiveKit double. Each step follows the named function of livekit/sip be5d3f5
(and livekit/protocol for dispatch rules; see /work/shared/LIVEKIT.md):

- `pkg/sip/inbound.go Server.processInvite`: an INVITE from an address the
  trunk's `allowed_addresses` does not list matches no trunk and is dropped
  (the open-source server answers DROP for no match); else `100
  Processing` (`sipInbound.Processing`).
- `inboundCall.handleInvite`: `StartRinging` sends `180 Ringing` with our
  To tag at once and again every `SIPRingingInterval` (default 1 s,
  `pkg/config`), then `DispatchCall`: the rule is chosen from the called
  number (the user part of **To**, protocol `sip/sip.go MatchTrunkDetailed`
  / `EvaluateDispatchRule`): a direct rule gives its fixed room, an
  individual one `prefix + "_" + caller + "_" + random`, a callee one
  `prefix + "_" + callee`; the participant is `sip_<caller>` (protocol
  d74e7cd). No rule:
  `DispatchNoRuleDrop` after the first 180: `sipInbound.drop` stops ringing
  and terminates the INVITE transaction without a final, so a later CANCEL
  matches no transaction (481) and no room is ever made.
- `HeadersToAttrs` (`pkg/sip/types.go`): each header named in the trunk's
  `headers_to_attributes` (looked up case-insensitively) becomes that
  attribute; `include_headers = "x"` (SIP_X_HEADERS) adds every `X-` header
  as `sip.h.<lower-case name>`; always `sip.callIDFull` (the Call-ID) and
  `sip.callTag`; plus `createLiveKitParticipant`'s `sip.callStatus` and the
  built-ins (`sip.callID`, `sip.trunkID`, `sip.ruleID`, `sip.phoneNumber`,
  `sip.trunkPhoneNumber`, livekit/protocol `livekit/attrs.go`).
- `joinRoom` / `createLiveKitParticipant`: the SIP participant (kind SIP)
  joins the room with those attributes from its first moment, the room
  created with the rule's `room_config` agents (the double then dispatches,
  and sends `room_started` and `participant_joined` webhooks).
- `waitSubscribe`: the call is answered (`acceptCall`: 200 with SDP) only
  once the participant has subscribed to a remote track, which here means
  an agent participant is in the room (the agent "connects" by posting its
  token to this stand-in's `/join`, verified with the double's keys as the
  LiveKit server verifies a join: room, identity and kind from the token);
  a ringing timeout (default 3 min) ends it with 408.
- `sipInbound.StartRinging`'s CANCEL branch and `closeWithCancelled`: a
  CANCEL gets 200 and the INVITE 487; the SIP participant leaves.
- `onBye`: a BYE gets 200; the SIP participant leaves (`participant_left`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from livekit import api
from livekit.lk_double import LiveKitDouble, guid
from livekit.protocol import agent_dispatch, models, room

from trunkline.sip.fields import header_tag, uri_user
from trunkline.sip.message import SipRequest, SipResponse, parse_message

log = logging.getLogger("lk_sip_standin")

SIP = models.ParticipantInfo.Kind.SIP
AGENT = models.ParticipantInfo.Kind.AGENT


@dataclass
class Rule:
    """A dispatch rule (protocol `SIPDispatchRule`): `kind` individual,
    callee or direct; `numbers` the called-number prefixes it serves."""

    numbers: tuple[str, ...]
    kind: str = "individual"
    room_prefix: str = "call"
    room_name: str = ""
    agents: tuple[agent_dispatch.RoomAgentDispatch, ...] = ()
    id: str = field(default_factory=lambda: guid("SDR_"))

    def room_for(self, caller: str, callee: str) -> str:
        """`EvaluateDispatchRule`'s room name."""
        if self.kind == "direct":
            return self.room_name
        if self.kind == "callee":
            return f"{self.room_prefix}_{callee}"
        return f"{self.room_prefix}_{caller}_{secrets.token_hex(6)}"


@dataclass
class Trunk:
    """An inbound trunk (protocol `SIPInboundTrunkInfo`)."""

    allowed_addresses: tuple[str, ...] = ("127.0.0.1",)
    headers_to_attributes: dict[str, str] = field(default_factory=dict)
    include_x_headers: bool = False
    id: str = field(default_factory=lambda: guid("ST_"))


@dataclass
class Call:
    """One inbound call, as `inboundCall` keeps it."""

    call_id: str
    invite: SipRequest
    source: tuple[str, int]
    tag: str
    room: str = ""
    identity: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    state: str = "ringing"  # ringing, answered, cancelled, ended, timeout, dropped
    last: bytes = b""
    ringer: asyncio.Task[None] | None = None
    events: list[str] = field(default_factory=list)  # what happened, in order


class LkSipStandin(asyncio.DatagramProtocol):
    """See the module docstring. `await start()` returns (SIP port, /join URL)."""

    def __init__(
        self,
        double: LiveKitDouble,
        trunk: Trunk,
        rules: list[Rule],
        *,
        ringing_interval_s: float = 1.0,
        ringing_timeout_s: float = 180.0,
    ) -> None:
        self.double = double
        self.trunk = trunk
        self.rules = rules
        self.ringing_interval_s = ringing_interval_s
        self.ringing_timeout_s = ringing_timeout_s
        self.calls: dict[str, Call] = {}
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.join_url = ""
        self.agents_changed = asyncio.Event()  # an agent joined through /join
        self.joins: dict[str, list[str]] = {}  # room -> identities that joined by /join

    async def start(self) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        assert self.transport is not None
        self.port = int(self.transport.get_extra_info("sockname")[1])
        app = web.Application()
        app.router.add_post("/join", self._join)
        app.router.add_post("/leave", self._leave)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.join_url = f"http://127.0.0.1:{http_port}"
        return self.port, self.join_url

    async def close(self) -> None:
        for c in self.calls.values():
            if c.ringer is not None:
                c.ringer.cancel()
        if self.transport is not None:
            self.transport.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        source = (str(addr[0]), int(addr[1]))
        try:
            msg = parse_message(data)
        except Exception:
            return
        if isinstance(msg, SipResponse):
            return  # we send no requests
        try:
            self._request(msg, source)
        except Exception:
            log.exception("stand-in failed on a request")

    def _send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    # ------------------------------------------------------------ requests

    def _request(self, req: SipRequest, source: tuple[str, int]) -> None:
        call_id = req.headers.get("Call-ID") or ""
        call = self.calls.get(call_id)
        if req.method == "INVITE" and header_tag(req.headers.get("To") or "") is None:
            if call is not None:  # a retransmission: the last response again
                if call.last:
                    self._send(call.last, source)
                return
            self._invite(req, source)
        elif req.method == "CANCEL" and call is not None and call.state == "dropped":
            call.events.append("cancel")
            self._send(_response(req, 481, "Call/Transaction Does Not Exist", call.tag), source)
        elif req.method == "CANCEL" and call is not None:
            self._send(_response(req, 200, "OK", call.tag), source)
            if call.state == "ringing":
                call.events.append("cancel")
                self._finish(call, "cancelled", 487, "Request Terminated")
        elif req.method == "BYE" and call is not None:
            self._send(_response(req, 200, "OK", call.tag), source)
            call.events.append("bye")
            if call.state == "answered":
                call.state = "ended"
                self._leave_room(call)
        elif req.method == "ACK" and call is not None:
            call.events.append("ack")

    def _invite(self, req: SipRequest, source: tuple[str, int]) -> None:
        """`processInvite` + `handleInvite`."""
        if source[0] not in self.trunk.allowed_addresses:
            self.dropped += 1  # no trunk for this source: DROP
            return
        call = Call(req.headers.get("Call-ID") or "", req, source, "lk" + secrets.token_hex(4))
        self.calls[call.call_id] = call
        call.events.append("invite")
        self._send(_response(req, 100, "Processing", None), source)
        self._ring(call)
        caller = uri_user(req.headers.get("From") or "") or ""
        callee = uri_user(req.headers.get("To") or "") or ""
        rule = next((r for r in self.rules if any(callee.startswith(n) for n in r.numbers)), None)
        if rule is None:
            call.events.append("no_rule")
            call.state = "dropped"  # DispatchNoRuleDrop: silent from now on, no room
            return
        call.ringer = asyncio.get_running_loop().create_task(self._keep_ringing(call))
        call.room = rule.room_for(caller, callee)
        call.identity = f"sip_{caller}"
        call.attributes = self._attributes(req, call, rule, caller, callee)
        config = room.RoomConfiguration(agents=list(rule.agents)) if rule.agents else None
        self.double.join(
            call.room, call.identity, kind=SIP, attributes=call.attributes, room_config=config
        )
        call.events.append("joined")
        asyncio.get_running_loop().create_task(self._wait_subscribe(call))

    def _attributes(
        self, req: SipRequest, call: Call, rule: Rule, caller: str, callee: str
    ) -> dict[str, str]:
        """`HeadersToAttrs` plus the built-in SIP attributes."""
        attrs = {
            "sip.callID": guid("SCL_"),
            "sip.trunkID": self.trunk.id,
            "sip.ruleID": rule.id,
            "sip.phoneNumber": caller,
            "sip.hostName": _from_host(req.headers.get("From") or ""),
            "sip.trunkPhoneNumber": callee,
            "sip.callStatus": "ringing",
        }
        if self.trunk.include_x_headers:
            for name, value in req.headers:
                if name.lower().startswith("x-"):
                    attrs["sip.h." + name.lower()] = value
        for header, attr in self.trunk.headers_to_attributes.items():
            value = req.headers.get(header)  # case-insensitive, as GetHeader
            if value is not None:
                attrs[attr] = value
        attrs["sip.callTag"] = call.tag
        attrs["sip.callIDFull"] = call.call_id
        return attrs

    def _ring(self, call: Call) -> None:
        call.last = _response(call.invite, 180, "Ringing", call.tag)
        self._send(call.last, call.source)

    async def _keep_ringing(self, call: Call) -> None:
        while call.state == "ringing":
            await asyncio.sleep(self.ringing_interval_s)
            if call.state == "ringing":
                self._ring(call)

    async def _wait_subscribe(self, call: Call) -> None:
        """Answer once an agent is in the call's room (or give up at the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ringing_timeout_s
        while call.state == "ringing":
            r = self.double.rooms.get(call.room)
            if r is not None and any(p.kind == AGENT for p in r.participants.values()):
                call.state = "answered"
                call.events.append("answered")
                self._stop_ringing(call)
                call.last = _response(call.invite, 200, "OK", call.tag, sdp=True, port=self.port)
                self._send(call.last, call.source)
                return
            if loop.time() >= deadline:
                call.events.append("ringing_timeout")
                self._finish(call, "timeout", 408, "Request Timeout")
                return
            self.agents_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.agents_changed.wait(), deadline - loop.time())

    def _finish(self, call: Call, state: str, status: int, reason: str) -> None:
        call.state = state
        self.agents_changed.set()  # wakes its _wait_subscribe, which sees the state
        self._stop_ringing(call)
        call.last = _response(call.invite, status, reason, call.tag)
        self._send(call.last, call.source)
        self._leave_room(call)

    def _stop_ringing(self, call: Call) -> None:
        if call.ringer is not None:
            call.ringer.cancel()
            call.ringer = None

    def _leave_room(self, call: Call) -> None:
        r = self.double.rooms.get(call.room)
        if r is not None and call.identity in r.participants:
            self.double.leave(call.room, call.identity)

    # ------------------------------------------------------------ agents

    def _claims(self, body: dict[str, Any]) -> api.Claims | None:
        try:
            return api.TokenVerifier(self.double.api_key, self.double.api_secret).verify(
                str(body.get("token", ""))
            )
        except Exception:
            return None

    async def _join(self, request: web.Request) -> web.Response:
        """An agent connects with its token (the LiveKit server's join check)."""
        claims = self._claims(await request.json())
        if claims is None or not claims.video.room_join or not claims.video.room:
            return web.json_response({"error": "invalid token"}, status=401)
        kind = AGENT if claims.kind == "agent" else models.ParticipantInfo.Kind.STANDARD
        self.joins.setdefault(claims.video.room, []).append(claims.identity)
        self.double.join(
            claims.video.room, claims.identity, kind=kind, attributes=dict(claims.attributes or {})
        )
        self.agents_changed.set()
        return web.json_response({"room": claims.video.room, "identity": claims.identity})

    async def _leave(self, request: web.Request) -> web.Response:
        claims = self._claims(await request.json())
        if claims is None:
            return web.json_response({"error": "invalid token"}, status=401)
        r = self.double.rooms.get(claims.video.room)
        if r is not None and claims.identity in r.participants:
            self.double.leave(claims.video.room, claims.identity)
        return web.json_response({"ok": True})


def _from_host(value: str) -> str:
    """The host of a From URI (`call.From.Host` in `EvaluateDispatchRule`)."""
    uri = value.partition("<")[2].partition(">")[0] or value
    return uri.partition("@")[2].partition(";")[0].partition(":")[0]


def _response(
    req: SipRequest, status: int, reason: str, tag: str | None, *, sdp: bool = False, port: int = 0
) -> bytes:
    """A response to `req` (Via, Record-Route, From, To with our tag, Call-ID, CSeq)."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in req.headers.get_all("Via")]
    if 100 < status < 300:
        lines += [f"Record-Route: {v}" for v in req.headers.get_all("Record-Route")]
    to = req.headers.get("To") or ""
    if tag is not None and status > 100 and ";tag=" not in to:
        to += f";tag={tag}"
    body = b""
    if sdp:
        body = (
            b"v=0\r\no=livekit 1 1 IN IP4 127.0.0.1\r\ns=LiveKit\r\nc=IN IP4 127.0.0.1\r\n"
            b"t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
    lines += [
        f"From: {req.headers.get('From')}",
        f"To: {to}",
        f"Call-ID: {req.headers.get('Call-ID')}",
        f"CSeq: {req.headers.get('CSeq')}",
        f"Contact: <sip:livekit@127.0.0.1:{port}>",
        "Server: LiveKit",
    ]
    if sdp:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
