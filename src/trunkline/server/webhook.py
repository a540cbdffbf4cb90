"""`POST /v1/livekit/webhook`: the LiveKit server's webhooks in.

Verified as livekit-api's `WebhookReceiver` does: the `Authorization` header
(a bare JWT, or `Bearer <JWT>`) must be signed with `[livekit]`'s key and
secret and carry a `sha256` claim equal to base64(SHA-256(body)); anything
else is refused 401 and changes nothing. The body is a protojson
`WebhookEvent`.

What it acts on (other events are accepted and ignored):

- `participant_left` (or `participant_connection_aborted`) of an agent
  participant: the live job in that room whose worker accepted with that
  identity ends after `[livekit] webhook_grace_s` (cancelled, with the reason),
  unless a `participant_joined` of the same identity comes first. A job
  adopted after a restart has no room here: it is found by the default
  identity `agent-<job id>` in any room. So a worker
  that never reports job status (Node `@livekit/agents` reports none) does
  not hold its slot forever: the cancel asks the worker to terminate and the
  pool's `terminate_timeout_s` frees the slot if it never confirms.
- `room_finished`: every live job in that room ends at once.
- `participant_joined` of a SIP participant, when a trunk's downstream is
  LiveKit SIP: handed to the room binder (runtime/room_binding.py), which
  binds the held job of the call it names to that room.

Webhooks can be late or lost (LiveKit drops them after 30 s in its queue):
nothing here is needed for correctness, only to end jobs sooner and to bind
SIP calls sooner (the binder polls the room service when no webhook came).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from livekit import api
from livekit.protocol import models

from trunkline.config import MediaServer
from trunkline.core import Job
from trunkline.core.binding import Sighting
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.room_binding import RoomBinding
from trunkline.server.keys import DISPATCHER
from trunkline.server.rest import error_response

log = logging.getLogger("trunkline.webhook")

PATH = "/v1/livekit/webhook"
_LEFT = ("participant_left", "participant_connection_aborted")


class WebhookIntake:
    """The webhook receiver and the grace timers of departed agents."""

    def __init__(
        self, dispatcher: Dispatcher, media: MediaServer, binding: RoomBinding | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.binding = binding
        self.grace_s = media.webhook_grace_s
        self.receiver = api.WebhookReceiver(api.TokenVerifier(media.api_key, media.api_secret))
        self._leaving: dict[tuple[str, str], asyncio.TimerHandle] = {}  # (room, identity)

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else auth
        body = await request.text()
        try:
            event = self.receiver.receive(body, token)
        except Exception as exc:  # livekit-api raises plain Exceptions
            return error_response(
                401,
                "unauthenticated",
                "webhook not verified: sign it with the [livekit] api_key/api_secret "
                f"({type(exc).__name__}: {str(exc)[:80]})",
            )
        room, p = event.room.name, event.participant
        if event.event in _LEFT and p.kind == models.ParticipantInfo.Kind.AGENT:
            self._agent_left(room, p.identity)
        elif event.event == "participant_joined":
            handle = self._leaving.pop((room, p.identity), None)
            if handle is not None:
                handle.cancel()
            if self.binding is not None and p.kind == models.ParticipantInfo.Kind.SIP:
                sighting = Sighting(
                    room, p.identity, True, dict(p.attributes), "webhook", event.room.sid
                )
                self.binding.seen(sighting)
        elif event.event == "room_finished":
            for job in self.dispatcher.live_jobs_in_room(room):
                self.dispatcher.cancel(job.id, f"room {room} finished (LiveKit webhook)")
        return web.json_response({"ok": True})

    def _agent_left(self, room: str, identity: str) -> None:
        key = (room, identity)
        if key in self._leaving:
            return
        loop = asyncio.get_running_loop()
        self._leaving[key] = loop.call_later(self.grace_s, self._grace_over, room, identity)

    def _grace_over(self, room: str, identity: str) -> None:
        self._leaving.pop((room, identity), None)
        jobs = self.dispatcher.live_jobs_in_room(room)
        adopted = self.dispatcher.live_job(identity.removeprefix("agent-"))
        if adopted is not None and not adopted.room:
            # Adopted after a restart (a migrate names no room): known only by
            # the default identity a worker accepts with, `agent-<job id>`.
            jobs.append(adopted)
        for job in jobs:
            if _identity(job) == identity:
                self.dispatcher.cancel(
                    job.id,
                    f"agent participant {identity} left room {room} "
                    f"(LiveKit webhook; not back within {self.grace_s:g} s)",
                )

    def close(self) -> None:
        for handle in self._leaving.values():
            handle.cancel()
        self._leaving.clear()


def _identity(job: Job) -> str:
    accept = job.accept
    if accept is not None and accept.identity:
        return accept.identity
    return f"agent-{job.id}"  # what the dispatcher's own room tokens name


def setup_webhooks(
    app: web.Application, media: MediaServer, binding: RoomBinding | None = None
) -> WebhookIntake:
    """Add the webhook route for `media`'s keys (SIP participants joining go to
    `binding`); its timers stop at shutdown."""
    intake = WebhookIntake(app[DISPATCHER], media, binding)
    app.router.add_post(PATH, intake.handle)

    async def _shutdown(app: web.Application) -> None:
        intake.close()

    app.on_shutdown.append(_shutdown)
    return intake
