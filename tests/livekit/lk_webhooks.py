"""The LiveKit server's webhook sender, as a test double.

Follows livekit/protocol `webhook/resource_url_notifier.go` (per-room queue,
one request at a time, dropped after 30 s in the queue or beyond a depth of
200) and `webhook/url_notifier.go` / `auth` (body = protojson of the
`WebhookEvent`; header `Authorization` = a JWT signed with the API secret,
valid 5 minutes, whose `sha256` claim is base64(SHA-256(body)); content type
`application/webhook+json`). livekit-api's `WebhookReceiver` verifies exactly
this. Events are queued per room so a room's `room_started`,
`participant_joined`, `participant_left`, `room_finished` arrive in order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.protocol import webhook

log = logging.getLogger("lk_double.webhooks")

QUEUE_MAX_AGE_S = 30.0  # resource_url_notifier.go: dropped after 30 s in the queue
QUEUE_MAX_DEPTH = 200  # and beyond a depth of 200


def sign(body: str, api_key: str, api_secret: str) -> str:
    """The `Authorization` value LiveKit puts on a webhook (a bare JWT)."""
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return (
        api.AccessToken(api_key, api_secret)
        .with_sha256(digest)
        .with_ttl(datetime.timedelta(minutes=5))
        .to_jwt()
    )


@dataclass
class _RoomQueue:
    items: list[tuple[float, webhook.WebhookEvent]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class WebhookSender:
    """Sends each room's events in order to `url`. `drop` (a set of event names)
    lets a test lose events on purpose, as a full queue would."""

    def __init__(self, url: str, api_key: str, api_secret: str) -> None:
        self.url = url
        self.api_key = api_key
        self.api_secret = api_secret
        self.drop: set[str] = set()
        self.sent: list[tuple[str, int]] = []  # (event name, HTTP status)
        self.dropped = 0
        self._queues: dict[str, _RoomQueue] = {}
        self._session: aiohttp.ClientSession | None = None
        self._seq = 0

    def notify(self, event: webhook.WebhookEvent) -> None:
        """Queue `event` on its room's queue (a name in `drop` is lost)."""
        self._seq += 1
        event.id = event.id or f"EV_{self._seq}"
        event.created_at = event.created_at or int(time.time())
        if event.event in self.drop:
            self.dropped += 1
            return
        room = event.room.name
        q = self._queues.get(room)
        if q is None:
            q = self._queues[room] = _RoomQueue()
            q.task = asyncio.get_running_loop().create_task(self._run(q))
        if len(q.items) >= QUEUE_MAX_DEPTH:
            self.dropped += 1
            return
        q.items.append((time.monotonic(), event))
        q.wake.set()

    async def _run(self, q: _RoomQueue) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        while True:
            await q.wake.wait()
            q.wake.clear()
            while q.items:
                queued_at, event = q.items.pop(0)
                if time.monotonic() - queued_at > QUEUE_MAX_AGE_S:
                    self.dropped += 1
                    continue
                await self._post(event)

    async def _post(self, event: webhook.WebhookEvent) -> None:
        body = MessageToJson(event, indent=0)
        headers = {
            "Authorization": sign(body, self.api_key, self.api_secret),
            "Content-Type": "application/webhook+json",
        }
        assert self._session is not None
        try:
            async with self._session.post(self.url, data=body, headers=headers) as r:
                self.sent.append((event.event, r.status))
        except aiohttp.ClientError as exc:
            log.warning("webhook failed", extra={"error": str(exc)})
            self.sent.append((event.event, 0))

    async def close(self) -> None:
        for q in self._queues.values():
            if q.task is not None:
                q.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await q.task
        if self._session is not None:
            await self._session.close()
