"""The room binder's adapter: held SIP-call jobs meet the rooms LiveKit SIP makes.

Theory of operation
-------------------
The pure `trunkline.core.binding.Binder` decides; this module feeds it and
carries out what it says, through the Dispatcher's named commands only:

- `held(job, call_id, timeout_s)`: SIP admission placed a call's held job
  (its slot is reserved, the INVITE is being forwarded to LiveKit SIP);
  the hold waits until `timeout_s`.
- `seen(sighting)`: a participant was seen, by the `participant_joined`
  webhook (server/webhook.py), by a poll (below) or by the bridge
  (`claim`). A BIND calls `Dispatcher.bind_held(job, room)`: the worker is
  offered the job in the call's room, and its assignment carries a room
  token minted with `[livekit]`'s key.
- `claim(job_pb)`: the Dispatcher's upstream claim. An upstream offer whose
  participant is the call's SIP participant binds the hold (or finds it
  bound), and a room job for a room whose call is bound already is a
  duplicate;
  either way the bridge answers it `terminate=true`, so the LiveKit server
  records it ended and neither retries another worker nor runs a second
  agent for the call.
- One asyncio timer at the binder's next deadline: expired holds are
  cancelled (`Dispatcher.cancel`; the SIP edge then CANCELs the downstream
  leg, answers 480 and frees the slot), and a due poll lists the rooms
  created since the oldest waiting hold (RoomService `ListRooms`, then
  `ListParticipants` per room, Twirp via livekit-api) and feeds every SIP
  participant to `seen` with source "poll". One poll at a time; a failed
  poll is logged and retried at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from livekit import api
from livekit.protocol import agent, models

from trunkline.config import MediaServer
from trunkline.core.binding import Binder, Hold, Sighting, Verdict
from trunkline.runtime.dispatcher import Dispatcher

log = logging.getLogger("trunkline.room_binding")

SIP_KIND = models.ParticipantInfo.Kind.SIP
MAX_ROOMS_PER_POLL = 100  # newest first: rooms older than the oldest hold are skipped
CLOCK_SLACK_S = 2.0  # rooms are dated by the LiveKit server's clock, not ours
POLL_TIMEOUT_S = 5.0


class RoomBinding:
    """See the module docstring. `start()` inside the loop, `close()` at shutdown."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        media: MediaServer,
        *,
        poll_after_s: float = 1.0,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.media = media
        self.binder = Binder(poll_after_s=poll_after_s, poll_interval_s=poll_interval_s)
        self.polls = 0  # completed polls (tests and /metrics read it)
        self.bound_by: dict[str, int] = {"bridge": 0, "webhook": 0, "poll": 0}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._poll_task: asyncio.Task[None] | None = None
        self._api: api.LiveKitAPI | None = None

    async def start(self) -> None:
        self.dispatcher.add_upstream_claim(self.claim)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if self._api is not None:
            await self._api.aclose()

    # ------------------------------------------------------------- commands

    def held(self, job_id: str, call_id: str, timeout_s: float) -> bool:
        """Wait for the room of the held job `job_id` (SIP Call-ID `call_id`)
        until `timeout_s` from now. False (the caller cancels the job) when
        the binder is full."""
        ok = self.binder.hold(job_id, call_id, self.dispatcher.now(), timeout_s)
        self._arm()
        return ok

    def released(self, job_id: str) -> None:
        """The held job ended (bound or not): forget its hold."""
        self.binder.release(job_id)

    def seen(self, s: Sighting) -> tuple[Verdict, Hold | None]:
        """A participant was seen: bind the hold it names, if it is waiting."""
        verdict, h = self.binder.sighted(s, self.dispatcher.now())
        if verdict is Verdict.BIND and h is not None:
            self.bound_by[s.source] = self.bound_by.get(s.source, 0) + 1
            detail = f"room {s.room} (SIP participant {s.identity}, seen by {s.source})"
            if not self.dispatcher.bind_held(h.job_id, s.room, detail):
                self.binder.release(h.job_id)  # ended meanwhile
            log.info(
                "sip call bound to its room",
                extra={"job_id": h.job_id, "room": s.room, "source": s.source},
            )
        self._arm()
        return verdict, h

    def claim(self, job_pb: agent.Job) -> str | None:
        """The Dispatcher's upstream claim (see the module docstring)."""
        p = job_pb.participant
        room = job_pb.room.name
        if job_pb.HasField("participant") and p.identity:
            s = Sighting(
                room, p.identity, p.kind == SIP_KIND, dict(p.attributes), "bridge", job_pb.room.sid
            )
            verdict, h = self.seen(s)
            if verdict is Verdict.BIND and h is not None:
                return f"the SIP call's held job {h.job_id} was bound to room {room} instead"
            if verdict is Verdict.DUPLICATE and h is not None:
                return f"the SIP call's job {h.job_id} is bound to room {h.room} already"
        # A room job for a call's room (a dispatch rule naming the agent with
        # the pool bridged for room jobs) would be a second agent for the call.
        h = self.binder.bound_in(room) if job_pb.type == agent.JobType.JT_ROOM else None
        if h is not None:
            return f"room {room} is the room of SIP call job {h.job_id}, which has its agent"
        return None

    # ---------------------------------------------------------------- timer

    def _arm(self) -> None:
        when = self.binder.next_deadline()
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_at(when + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        d = self.dispatcher
        now = d.now()
        for h in self.binder.on_timer(now):
            waited = now - h.since
            d.annotate(h.job_id, "room_bind_timeout", f"no room named the call in {waited:.1f} s")
            d.cancel(
                h.job_id,
                f"LiveKit SIP made no room with this call's participant within "
                f"{h.deadline - h.since:g} s (no participant_joined webhook, bridge offer "
                f"or poll found it); the call gets 480",
            )
        since = self.binder.take_poll(now)
        if since is not None and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(since))
        self._arm()

    # ----------------------------------------------------------------- poll

    async def _poll(self, since: float) -> None:
        """List the rooms created since `since` (scheduler time) and feed their
        SIP participants to `seen`."""
        if self._api is None:
            self._api = api.LiveKitAPI(
                self.media.url, self.media.api_key, self.media.api_secret, failover=False
            )
        lk = self._api
        since_ms = ((self.dispatcher.wall(since) or 0.0) - CLOCK_SLACK_S) * 1000
        try:
            async with asyncio.timeout(POLL_TIMEOUT_S):
                rooms = (await lk.room.list_rooms(api.ListRoomsRequest())).rooms
                fresh = sorted(
                    (r for r in rooms if _created_ms(r) >= since_ms),
                    key=_created_ms,
                    reverse=True,
                )[:MAX_ROOMS_PER_POLL]
                for r in fresh:
                    if not self.binder.waiting():
                        break
                    resp = await lk.room.list_participants(api.ListParticipantsRequest(room=r.name))
                    for p in resp.participants:
                        if p.kind == SIP_KIND:
                            self.seen(
                                Sighting(
                                    r.name, p.identity, True, dict(p.attributes), "poll", r.sid
                                )
                            )
        except Exception as exc:  # a timeout, aiohttp's errors, livekit-api's TwirpError
            log.warning("room poll failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            self.polls += 1
            self._arm()


def _created_ms(r: models.Room) -> float:
    return float(r.creation_time_ms or r.creation_time * 1000)
