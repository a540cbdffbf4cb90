"""The fake API server's storage: objects, opaque resource versions, an event log.

Like etcd behind a real API server, one revision counter orders every change;
each stored object carries the revision of its last change as
`metadata.resourceVersion`, but encoded so that a client cannot compare or do
arithmetic on it (the API conventions say resource versions are opaque). The
event log keeps the changes after `compacted`; a watch from an older version
is answered 410 Gone, as after an etcd compaction.

Stored objects are never changed in place: every write stores a new dict, so
list snapshots and queued watch events can hold references safely.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

Obj = dict[str, Any]
_MASK = (1 << 64) - 1
_MUL = 0x9E3779B97F4A7C15  # odd: a bijection on 64-bit integers


def now_rfc3339(delta_s: float = 0.0) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delta_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Event:
    revision: int
    resource: str  # "pods", "deployments"
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj


class Expired(Exception):
    """The resource version asked for is older than the compacted history."""


class Store:
    """Objects by (resource, namespace, name) and the change log."""

    def __init__(self, history: int = 10_000) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.revision = 1
        self.log: deque[Event] = deque(maxlen=history)
        self.compacted = 0  # versions older than this are gone
        self._subscribers: set[Callable[[Event], None]] = set()
        self._versions: dict[str, int] = {}
        self.changed = asyncio.Event()

    # ------------------------------------------------------------- versions

    def encode(self, revision: int) -> str:
        token = f"{(revision * _MUL) & _MASK:016x}"
        self._versions[token] = revision
        return token

    def decode(self, token: str) -> int:
        """The revision behind an opaque version; `Expired` if unknown or compacted."""
        revision = self._versions.get(token)
        if revision is None or revision < self.compacted:
            raise Expired(token)
        return revision

    @property
    def version(self) -> str:
        return self.encode(self.revision)

    def compact(self) -> None:
        """Forget the history before now: older versions answer 410 (the
        current one still works, as after an etcd compaction at it)."""
        self.compacted = self.revision
        self.log.clear()

    # ------------------------------------------------------------- objects

    def get(self, resource: str, ns: str, name: str) -> Obj | None:
        return self.objects.get((resource, ns, name))

    def items(self, resource: str, ns: str) -> list[Obj]:
        return sorted(
            (o for (r, n, _), o in self.objects.items() if r == resource and n == ns),
            key=lambda o: o["metadata"]["name"],
        )

    def _commit(self, resource: str, ns: str, kind: str, obj: Obj) -> Obj:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = self.encode(self.revision)
        ev = Event(self.revision, resource, ns, kind, obj)
        if len(self.log) == self.log.maxlen:
            self.compacted = self.log[0].revision
        self.log.append(ev)
        for sub in list(self._subscribers):
            sub(ev)
        self.changed.set()
        self.changed = asyncio.Event()
        return obj

    def create(self, resource: str, ns: str, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta.setdefault("generation", 1)
        self.objects[(resource, ns, meta["name"])] = obj
        return self._commit(resource, ns, "ADDED", obj)

    def update(self, resource: str, ns: str, obj: Obj) -> Obj:
        """Store a new version of an existing object (the caller made `obj` a copy)."""
        self.objects[(resource, ns, obj["metadata"]["name"])] = obj
        return self._commit(resource, ns, "MODIFIED", obj)

    def remove(self, resource: str, ns: str, name: str) -> Obj | None:
        old = self.objects.pop((resource, ns, name), None)
        if old is None:
            return None
        gone = copy.deepcopy(old)
        return self._commit(resource, ns, "DELETED", gone)

    # --------------------------------------------------------------- events

    def since(self, revision: int) -> Iterable[Event]:
        if revision < self.compacted:
            raise Expired(str(revision))
        return [ev for ev in self.log if ev.revision > revision]

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        self._subscribers.add(fn)
        return lambda: self._subscribers.discard(fn)
