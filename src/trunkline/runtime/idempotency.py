"""Idempotency keys for dispatch creation: a retry gets the same job, never a second.

Theory of operation
-------------------
A caller that sends `Idempotency-Key: K` with `POST /v1/dispatches` (or
Twirp `CreateDispatch`) and retries after a lost answer gets the job the
first attempt made, as it is now, not a second job. `K` is *scoped*: the
binding is `hash(API key, token identity, token room scope, K) -> job id`,
so one tenant's keys never address another's jobs, whatever they guess.
With the job id the binding keeps a fingerprint of what makes the job
(agent name, room, metadata, attributes, max wait; per field): the same key
with a different request is refused `IdempotencyMismatch`, naming the
fields that differ (`wait` is not among them: it only says how to answer).

`IdempotencyKeys` (one process) binds keys in a bounded in-memory map:
`KEY_TTL_S` per binding, at most `MAX_LOCAL_KEYS` (the oldest go first; a
key evicted early is then a new key). A request's job id is chosen, bound,
then the job is made with it (`Dispatcher.request(job_id=...)`), all
without an await in between, so two concurrent attempts cannot both make a
job. An attempt that made no job (refused `queue_full`, or raised) unbinds
its key: a retry tries again.

`ClusterKeys` (cluster mode) adds the coordination store's `claim` in
front: the pool's owner claims `scoped key -> job id|fingerprint` (one
round trip), then makes the job. A retry at another member after the owner
died reaches the new owner (the request is forwarded to the owner like any
other), whose claim answers the first job id: the job is looked up there
(carried over from the old owner's records, adopted from a migrating
worker, or ended); while the new owner's take-over has not yet re-filed it
(`settle_s` after the take-over) the answer waits for it. A claimed job
that no member here can find (it ended at a member whose history is not
shared, or was never made) is `IdempotencyUnresolved`: a new key is needed.

Answers after the record (cluster mode): a request handler runs inside
`RecordWaits.collecting()`; the owner's fence (`AnsweringFence`) notes each
job it admits there with the awaitable of its record write
(`ClusterFence.recorded`), and the answer goes out once those writes landed
(`RecordWaits.settle`), so a job that got its 201 is in the pool's records
and survives its owner. A write refused (this member lost the pool) undoes
the job's key claim and the request is answered 503. Costs one Redis round
trip per creating request (or a share of one, batched); nothing in one
process (no collector is set, the fence is not there).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator

from trunkline.cluster import ClusterUnavailable, Coordinator
from trunkline.core import TERMINAL, Job
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.cluster_jobs import ClusterFence
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.stores import JobRecord

__all__ = [
    "HEADER",
    "KEY_TTL_S",
    "MAX_KEY_CHARS",
    "MAX_LOCAL_KEYS",
    "AnsweringFence",
    "ClusterKeys",
    "DispatchSpec",
    "IdempotencyKeys",
    "IdempotencyMismatch",
    "IdempotencyUnresolved",
    "Outcome",
    "RecordWaits",
    "key_problem",
    "scoped_key",
]

HEADER = "Idempotency-Key"
KEY_TTL_S = 900.0  # a retry within 15 minutes gets the same job
MAX_LOCAL_KEYS = 100_000
MAX_KEY_CHARS = 255
_FIELDS = ("agent_name", "room", "metadata", "attributes", "max_wait_s")


class IdempotencyMismatch(Exception):
    """The key was used before with a different request; `fields` differ."""

    def __init__(self, key: str, job_id: str, fields: list[str]) -> None:
        self.job_id = job_id
        self.fields = fields
        self.message = (
            f"Idempotency-Key {key!r} was first used for job {job_id} with a different "
            f"request ({', '.join(fields)} differ); send the same request to get that job, "
            "or use a new key for a new one"
        )
        super().__init__(self.message)


class IdempotencyUnresolved(Exception):
    """The key is bound to a job this server cannot find any more."""

    def __init__(self, key: str, job_id: str) -> None:
        self.job_id = job_id
        self.message = (
            f"Idempotency-Key {key!r} is bound to job {job_id}, which this server cannot "
            "find (it ended at a cluster member whose history is not shared, or it was "
            "never made); no second job is made for the key: use a new key to dispatch again"
        )
        super().__init__(self.message)


def key_problem(key: str) -> str | None:
    """Why `key` is not a usable Idempotency-Key, or None."""
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        return f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters"
    return None


def scoped_key(api_key: str, identity: str, room: str, key: str) -> str:
    """The binding's name: the key within its caller's scope (API key, token
    identity, token room scope), hashed so no caller text reaches the store."""
    raw = "\x00".join((api_key, identity, room, key)).encode()
    return hashlib.blake2b(raw, digest_size=20).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class DispatchSpec:
    """What makes the job of a dispatch (the fingerprinted fields)."""

    agent_name: str
    room: str
    metadata: str
    attributes: dict[str, str]
    max_wait_s: float | None

    def fingerprint(self) -> str:
        """One short hash per field, in `_FIELDS` order, dot-separated."""
        parts = (
            self.agent_name,
            self.room,
            self.metadata,
            json.dumps(self.attributes, sort_keys=True, separators=(",", ":")),
            "" if self.max_wait_s is None else repr(float(self.max_wait_s)),
        )
        return ".".join(hashlib.blake2b(p.encode(), digest_size=4).hexdigest() for p in parts)


def _differ(a: str, b: str) -> list[str]:
    pa, pb = a.split("."), b.split(".")
    if len(pa) != len(_FIELDS) or len(pb) != len(_FIELDS):
        return list(_FIELDS)
    return [f for f, x, y in zip(_FIELDS, pa, pb, strict=True) if x != y]


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """The job of a keyed request: live (`job`) or ended (`record`); `replayed`
    when an earlier attempt made it."""

    job: Job | None
    record: JobRecord | None
    replayed: bool


def _new_job_id() -> str:
    return "AJ_" + secrets.token_urlsafe(9)


class IdempotencyKeys:
    """Single process (see the module docstring). `clock()` gives seconds."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        ttl_s: float = KEY_TTL_S,
        max_keys: int = MAX_LOCAL_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._d = dispatcher
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        # scoped key -> (job id, fingerprint, expiry), oldest binding first
        self._map: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def get(self, scoped: str) -> tuple[str, str] | None:
        """The (job id, fingerprint) bound to `scoped`, if its time has not run out."""
        held = self._map.get(scoped)
        if held is None:
            return None
        if held[2] <= self._clock():
            del self._map[scoped]
            return None
        return held[0], held[1]

    def bind(self, scoped: str, job_id: str, fingerprint: str) -> None:
        self._map.pop(scoped, None)
        self._map[scoped] = (job_id, fingerprint, self._clock() + self.ttl_s)
        now = self._clock()
        while self._map:  # expired ones first (oldest first), then beyond the bound
            oldest = next(iter(self._map.values()))
            if oldest[2] > now and len(self._map) <= self.max_keys:
                break
            self._map.popitem(last=False)

    def unbind(self, scoped: str, job_id: str) -> None:
        held = self._map.get(scoped)
        if held is not None and held[0] == job_id:
            del self._map[scoped]

    async def dispatch(
        self, key: str, scoped: str, spec: DispatchSpec, make: Callable[[str], Job]
    ) -> Outcome:
        """The job for `key`: the one an earlier attempt made, else a new one
        made by `make(job_id)` (it calls `Dispatcher.request`)."""
        fp = spec.fingerprint()
        held = self.get(scoped)
        if held is not None:
            return await self._replay(key, held[0], held[1], fp)
        job_id = _new_job_id()
        self.bind(scoped, job_id, fp)
        try:
            job = make(job_id)
        except BaseException:
            self.unbind(scoped, job_id)
            raise
        if job.code == "queue_full":
            self.unbind(scoped, job_id)  # refused before it began: a retry tries again
        return Outcome(job, None, False)

    async def _replay(self, key: str, job_id: str, held_fp: str, fp: str) -> Outcome:
        if held_fp != fp:
            raise IdempotencyMismatch(key, job_id, _differ(held_fp, fp))
        found = await self.find(job_id)
        if found is None:
            raise IdempotencyUnresolved(key, job_id)
        return found

    async def find(self, job_id: str) -> Outcome | None:
        live = self._d.live_job(job_id)
        if live is not None:
            return Outcome(live, None, True)
        rec = await self._d.find_job(job_id)
        return Outcome(None, rec, True) if rec is not None else None


class ClusterKeys(IdempotencyKeys):
    """Cluster mode (see the module docstring): the local map is a cache of
    this member's own claims; the store's claim decides."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        node: ClusterNode,
        store: Coordinator,
        *,
        settle_s: float,
        ttl_s: float = KEY_TTL_S,
        max_keys: int = MAX_LOCAL_KEYS,
    ) -> None:
        super().__init__(dispatcher, ttl_s=ttl_s, max_keys=max_keys)
        self._node = node
        self._store = store
        self.settle_s = settle_s
        # keyed requests of this member still between their claim and their job
        self._making: dict[str, asyncio.Future[None]] = {}

    async def dispatch(
        self, key: str, scoped: str, spec: DispatchSpec, make: Callable[[str], Job]
    ) -> Outcome:
        pool = spec.agent_name
        node = self._node
        if not node.may_act(pool):
            raise node.refusal(pool)  # forwarded to the owner, which claims there
        fp = spec.fingerprint()
        making = self._making.get(scoped)
        if making is not None:
            await asyncio.shield(making)  # an attempt of ours is claiming: its answer first
        held = self.get(scoped)
        if held is not None:
            return await self._replay_cluster(key, pool, held[0], held[1], fp)
        job_id = _new_job_id()
        value = f"{job_id}|{fp}"
        done = self._making[scoped] = asyncio.get_running_loop().create_future()
        try:
            try:
                got = await self._store.claim(scoped, value, round(self.ttl_s * 1000))
            except ClusterUnavailable as exc:
                raise _unavailable(exc) from None
            if got != value:
                other, _, other_fp = got.partition("|")
                return await self._replay_cluster(key, pool, other, other_fp, fp)
            self.bind(scoped, job_id, fp)
            try:
                job = make(job_id)
            except BaseException:
                self.unbind(scoped, job_id)
                await self._unclaim(scoped, value)
                raise
            if job.code == "queue_full":
                self.unbind(scoped, job_id)
                await self._unclaim(scoped, value)
            else:
                waits = _WAITS.get()
                if waits is not None:

                    async def undo() -> None:
                        self.unbind(scoped, job_id)
                        await self._unclaim(scoped, value)

                    waits.undo[job_id] = undo
            return Outcome(job, None, False)
        finally:
            del self._making[scoped]
            done.set_result(None)

    async def _unclaim(self, scoped: str, value: str) -> None:
        with contextlib.suppress(ClusterUnavailable):
            await self._store.unclaim(scoped, value)  # else it runs out with its ttl

    async def _replay_cluster(
        self, key: str, pool: str, job_id: str, held_fp: str, fp: str
    ) -> Outcome:
        if held_fp != fp:
            raise IdempotencyMismatch(key, job_id, _differ(held_fp, fp))
        found = await self.find(job_id)
        if found is not None:
            return found
        # Claimed by an owner that is gone: its job is in the pool's records
        # until this member's take-over re-files it (settle_s after it took
        # the pool), or until it is adopted from a migrating worker.
        try:
            pending = job_id in await self._store.records(pool)
        except ClusterUnavailable as exc:
            raise _unavailable(exc) from None
        if pending:
            found = await self._until(job_id, pool, self.settle_s + 2 * self._node.ttl_s + 1.0)
            if found is not None:
                return found
            raise ClusterRefusal(
                "cluster_unavailable",
                f"job {job_id} of this Idempotency-Key is being carried over to this member; "
                "retry with the same key",
            )
        raise IdempotencyUnresolved(key, job_id)

    async def _until(self, job_id: str, pool: str, within: float) -> Outcome | None:
        """The job once this member has it, polled every lease tick (a rare
        path: a retry that came during a take-over)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self._node.may_act(pool):
                raise self._node.refusal(pool)
            found = await self.find(job_id)
            if found is not None:
                return found
            await asyncio.sleep(self._node.tick_s)
        return None


def _unavailable(exc: ClusterUnavailable) -> ClusterRefusal:
    return ClusterRefusal(
        "cluster_unavailable",
        f"the cluster's coordination store did not answer ({exc}); retry with the same "
        "Idempotency-Key",
    )


class RecordWaits:
    """The record writes of one request (cluster mode; see the module
    docstring). `undo[job_id]` runs when that job's write was refused."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Awaitable[bool]]] = []
        self.undo: dict[str, Callable[[], Awaitable[None]]] = {}

    @staticmethod
    @contextlib.contextmanager
    def collecting() -> Iterator[RecordWaits]:
        """Collect the record writes made in this context (this request)."""
        waits = RecordWaits()
        token = _WAITS.set(waits)
        try:
            yield waits
        finally:
            _WAITS.reset(token)

    async def settle(self) -> list[str]:
        """Wait for every write: the job ids whose record will not be written
        (this member lost the pool), after running their `undo`."""
        refused: list[str] = []
        for job_id, write in self.writes:
            if not await write:
                refused.append(job_id)
                undo = self.undo.get(job_id)
                if undo is not None:
                    await undo()
        return refused


_WAITS: contextvars.ContextVar[RecordWaits | None] = contextvars.ContextVar(
    "trunkline_record_waits", default=None
)


class AnsweringFence(ClusterFence):
    """The cluster fence that also notes each admitted job's record write in
    the current request's `RecordWaits` (its answer waits for it)."""

    def admitted(self, job: Job) -> None:
        super().admitted(job)
        waits = _WAITS.get()
        if waits is not None and job.state not in TERMINAL:
            waits.writes.append((job.id, self.recorded(job)))
