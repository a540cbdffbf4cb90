"""Binding the held job of a SIP call to the room LiveKit SIP makes for it.

Theory of operation
-------------------
When a trunk's downstream is LiveKit SIP, the call's room is chosen by a
LiveKit dispatch rule only after the INVITE got there (livekit/protocol
`sip/sip.go EvaluateDispatchRule`; an individual rule adds a random
suffix), and a livekit-agents worker runs its job in the room its *offer*
names. So the edge's job is requested with `hold=True`: placing it reserves
a slot on a worker and sends nothing (`Scheduler.request`), the INVITE goes
downstream with `X-Trunkline-Job: <job id>`, and LiveKit SIP puts that
header on the call's SIP participant as an attribute (the trunk's
`headers_to_attributes`, livekit/sip `pkg/sip/types.go HeadersToAttrs`).

Each participant the adapters see (the upstream's participant offer through
the bridge, a `participant_joined` webhook, a poll of RoomService
`ListParticipants`) goes through `Binder.sighted` with ``now``:

- a SIP participant naming a waiting hold **binds** it (`Verdict.BIND`):
  the adapter calls `Dispatcher.bind_held` with the room, and the worker is
  offered the job there;
- one naming a hold already bound is a **duplicate** (`Verdict.DUPLICATE`):
  nothing happens, and an upstream offer for it is answered
  ``terminate=true`` so the LiveKit server neither tries another worker nor
  starts a second agent;
- anything else is **not ours** (`Verdict.NOT_OURS`).

A hold still waiting at its deadline **expires**: `on_timer` returns it and
the adapter cancels its job (the edge then CANCELs the downstream leg and
answers 480; the slot is freed). A poll is due once a hold has waited
`poll_after_s` and again every `poll_interval_s` while any hold waits
(`take_poll`): webhooks can be late or lost (LiveKit drops them after 30 s
in its queue), a poll cannot.

Which attribute names the call: `JOB_ATTRIBUTE` (``trunkline.job``, the
documented `headers_to_attributes` target), else ``sip.h.x-trunkline-job``
(a trunk with `include_headers: SIP_X_HEADERS`), else the Call-ID that
LiveKit SIP always copies into ``sip.callIDFull`` (a proxy keeps the
Call-ID; matched only against the Call-ID of a waiting hold).

Only participants of kind SIP count: any participant may be allowed to set
its own attributes, but only LiveKit SIP creates SIP participants.

Holds move through `HoldState` by `HOLD_TABLE` only. Pure: no clock, no I/O.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

from trunkline.common.fsm import EventTable

__all__ = [
    "CALL_ID_ATTRIBUTE",
    "HEADER_ATTRIBUTE",
    "HOLD_TABLE",
    "JOB_ATTRIBUTE",
    "JOB_HEADER",
    "Binder",
    "Hold",
    "HoldEvent",
    "HoldState",
    "Sighting",
    "Verdict",
]

JOB_HEADER = "X-Trunkline-Job"
JOB_ATTRIBUTE = "trunkline.job"
HEADER_ATTRIBUTE = "sip.h.x-trunkline-job"  # livekit.AttrSIPHeaderPrefix + lower-cased name
CALL_ID_ATTRIBUTE = "sip.callIDFull"  # livekit/sip pkg/sip/participant.go AttrSIPCallIDFull


class HoldState(enum.Enum):
    WAITING = "slot held, waiting for the call's room"
    BOUND = "bound to its room; the job was offered there"
    EXPIRED = "no room by the deadline"
    RELEASED = "its job ended or the call ended"


class HoldEvent(enum.Enum):
    BIND = "a SIP participant named it"
    EXPIRE = "the deadline passed"
    RELEASE = "its job ended"


H, HE = HoldState, HoldEvent
HOLD_TABLE: EventTable[HoldState, HoldEvent] = EventTable(
    H.WAITING,
    {
        (H.WAITING, HE.BIND): H.BOUND,
        (H.WAITING, HE.EXPIRE): H.EXPIRED,
        (H.WAITING, HE.RELEASE): H.RELEASED,
        (H.BOUND, HE.RELEASE): H.RELEASED,
    },
)


class Verdict(enum.Enum):
    BIND = "bind the hold to this room now"
    DUPLICATE = "the call's hold is bound already"
    NOT_OURS = "names no hold"


@dataclass(frozen=True, slots=True)
class Sighting:
    """A participant seen in a LiveKit room, and by what (`source`: bridge,
    webhook or poll)."""

    room: str
    identity: str
    is_sip: bool
    attributes: Mapping[str, str]
    source: str
    room_sid: str = ""


@dataclass(slots=True)
class Hold:
    """One held job: its SIP Call-ID, when it began waiting, its deadline, and
    once bound the room, participant and source that bound it."""

    job_id: str
    call_id: str
    since: float
    deadline: float
    state: HoldState = HoldState.WAITING
    room: str = ""
    identity: str = ""
    source: str = ""
    bound_at: float | None = None


@dataclass(slots=True)
class Binder:
    """The holds of one server. Bounds: at most `max_holds` holds (a new one
    past that is refused by `hold`, which returns False); sightings never
    create entries."""

    poll_after_s: float = 1.0
    poll_interval_s: float = 1.0
    max_holds: int = 10_000
    holds: dict[str, Hold] = field(default_factory=dict)
    _by_call: dict[str, str] = field(default_factory=dict)
    _deadlines: list[tuple[float, str]] = field(default_factory=list)
    _next_poll: float | None = None

    def hold(self, job_id: str, call_id: str, now: float, timeout_s: float) -> bool:
        """Start waiting for the room of `job_id` (its slot was just held),
        until `now + timeout_s`. Idempotent for a job already held (a held job
        re-placed on another worker keeps its deadline). False if full."""
        if job_id in self.holds:
            return True
        if len(self.holds) >= self.max_holds:
            return False
        h = Hold(job_id, call_id, now, now + timeout_s)
        self.holds[job_id] = h
        if call_id:
            self._by_call[call_id] = job_id
        heapq.heappush(self._deadlines, (h.deadline, job_id))
        first_poll = now + self.poll_after_s
        if self._next_poll is None or first_poll < self._next_poll:
            self._next_poll = first_poll
        return True

    def match(self, s: Sighting) -> Hold | None:
        """The hold `s` names, if it is a SIP participant naming one."""
        if not s.is_sip:
            return None
        attrs = s.attributes
        job_id = attrs.get(JOB_ATTRIBUTE) or attrs.get(HEADER_ATTRIBUTE)
        if job_id:
            return self.holds.get(job_id)
        call_id = attrs.get(CALL_ID_ATTRIBUTE)
        if call_id:
            found = self._by_call.get(call_id)
            h = self.holds.get(found) if found is not None else None
            if h is not None and h.state is HoldState.WAITING:
                return h
        return None

    def sighted(self, s: Sighting, now: float) -> tuple[Verdict, Hold | None]:
        """What `s` means (see the module docstring); a BIND moves the hold to
        BOUND with `s`'s room, so every later sighting is a DUPLICATE."""
        h = self.match(s)
        if h is None or h.state in (HoldState.EXPIRED, HoldState.RELEASED):
            return Verdict.NOT_OURS, None
        if h.state is HoldState.BOUND:
            return Verdict.DUPLICATE, h
        h.state = HOLD_TABLE.step(f"hold {h.job_id}", h.state, HoldEvent.BIND)
        h.room, h.identity, h.source, h.bound_at = s.room, s.identity, s.source, now
        return Verdict.BIND, h

    def release(self, job_id: str) -> Hold | None:
        """The hold's job ended (or its call did): forget it."""
        h = self.holds.pop(job_id, None)
        if h is None:
            return None
        if (h.state, HoldEvent.RELEASE) in HOLD_TABLE:
            h.state = HOLD_TABLE.step(f"hold {h.job_id}", h.state, HoldEvent.RELEASE)
        if self._by_call.get(h.call_id) == job_id:
            del self._by_call[h.call_id]
        return h

    def bound_in(self, room: str) -> Hold | None:
        """A hold bound to `room`, if any (a room job offered upstream for a
        call's room is a second agent for that call)."""
        for h in self.holds.values():
            if h.state is HoldState.BOUND and h.room == room:
                return h
        return None

    def waiting(self) -> int:
        return sum(1 for h in self.holds.values() if h.state is HoldState.WAITING)

    def next_deadline(self) -> float | None:
        """When `on_timer` (or `take_poll`) next has something to do."""
        candidates = []
        if self._deadlines:
            candidates.append(self._deadlines[0][0])
        if self._next_poll is not None:
            candidates.append(self._next_poll)
        return min(candidates) if candidates else None

    def on_timer(self, now: float) -> list[Hold]:
        """The holds whose deadline passed unbound: EXPIRED and forgotten;
        the adapter cancels their jobs."""
        expired: list[Hold] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            h = self.holds.get(job_id)
            if h is None or h.state is not HoldState.WAITING:
                continue
            h.state = HOLD_TABLE.step(f"hold {h.job_id}", h.state, HoldEvent.EXPIRE)
            del self.holds[job_id]
            if self._by_call.get(h.call_id) == job_id:
                del self._by_call[h.call_id]
            expired.append(h)
        return expired

    def take_poll(self, now: float) -> float | None:
        """If a poll is due: the earliest `since` of the holds waiting long
        enough (rooms created before it cannot be theirs), and the next poll
        is scheduled; else None."""
        if self._next_poll is None or now < self._next_poll:
            return None
        waiting = [h for h in self.holds.values() if h.state is HoldState.WAITING]
        if not waiting:
            self._next_poll = None
            return None
        due = [h.since for h in waiting if now - h.since >= self.poll_after_s]
        self._next_poll = now + self.poll_interval_s
        if not due:
            self._next_poll = min(h.since for h in waiting) + self.poll_after_s
            return None
        return min(due)
