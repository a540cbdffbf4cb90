"""An in-memory provider for tests: replicas that run nothing.

A `FakeBackend` is the world the fake replicas live in (the machine, the
cluster); each `FakeProvider` is one server run's view of it, so a server
restart is a new `FakeProvider` on the same backend. The test drives the world:

- `backend.exit(replica_id, code)` ends a replica (its watcher's `on_exit` runs
  at once, inside the call; an unwatched replica just disappears, as one that
  died while no server ran);
- `backend.add_existing(...)` puts a replica there that an earlier run left;
- `backend.start_errors` makes the next starts fail, `backend.missing` names
  executables that do not exist, `backend.start_gate` holds every start until
  the test sets it (a slow start, without sleeping);
- a replica whose executable is in `backend.stubborn` ignores the stop request
  and ends only when forced after the grace (code -9, like SIGKILL); any other
  ends with code 0 on the next loop iteration after its stop;
- a replica whose executable is in `backend.exit_codes` exits by itself with
  that code on the next loop iteration after its start (a crashing agent).

`backend.launches`, `backend.stops` and `backend.live` record what happened.
The fake passes the same contract suite as the real providers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

from trunkline.common.exits import describe_exit
from trunkline.providers.protocol import (
    Description,
    ExitCallback,
    Launch,
    Provider,
    ProviderError,
    ReplicaHandle,
)

log = logging.getLogger("trunkline.providers")

FORCED_EXIT_CODE = -9  # what a forced stop reports, as SIGKILL would


@dataclasses.dataclass(eq=False)
class FakeReplica:
    """A fake replica; `command` decides how it answers a stop."""

    replica_id: str
    pool: str
    token: str
    command: tuple[str, ...] = ()
    version: str = ""

    @property
    def location(self) -> str:
        return f"fake replica {self.replica_id}"

    def describe(self) -> Description:
        return {"kind": "fake", "replica": self.replica_id, "version": self.version}


class FakeBackend:
    """The world shared by the `FakeProvider`s of successive "server runs"."""

    def __init__(self) -> None:
        self.live: dict[str, FakeReplica] = {}
        self.launches: list[Launch] = []
        self.stops: list[tuple[str, float]] = []
        self.start_errors: collections.deque[str] = collections.deque()
        self.missing: set[str] = set()
        self.stubborn: set[str] = set()
        self.exit_codes: dict[str, int] = {}
        self.start_gate: asyncio.Event | None = None
        # Who watches each live replica: replica id -> (provider, its on_exit).
        self._watchers: dict[str, tuple[FakeProvider, ExitCallback]] = {}

    def add_existing(
        self,
        replica_id: str,
        pool: str,
        token: str,
        command: tuple[str, ...] = (),
        version: str = "",
    ) -> FakeReplica:
        """A live replica nobody watches (left by an earlier server run)."""
        r = FakeReplica(replica_id, pool, token, command, version)
        self.live[replica_id] = r
        return r

    def exit(self, replica_id: str, code: int | None) -> None:
        """End a live replica now; its watcher (if any) hears `code` once."""
        r = self.live.get(replica_id)
        if r is not None:
            self._end(r, code)

    def _end(self, r: FakeReplica, code: int | None) -> None:
        replica_id = r.replica_id
        if self.live.get(replica_id) is not r:
            return  # already ended (the id may be a newer replica's by now)
        del self.live[replica_id]
        watcher = self._watchers.pop(replica_id, None)
        if watcher is None:
            return
        provider, on_exit = watcher
        provider._forget(replica_id)
        on_exit(code, describe_exit(code))

    def _stubborn(self, r: FakeReplica) -> bool:
        return bool(r.command) and r.command[0] in self.stubborn


class FakeProvider:
    """One server run's provider over a `FakeBackend` (a fresh one if not given)."""

    name = "fake"

    def __init__(self, backend: FakeBackend | None = None) -> None:
        self.backend = backend if backend is not None else FakeBackend()
        self._watched: dict[str, FakeReplica] = {}
        self._kill_at: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._all_gone = asyncio.Event()
        self._closed = False

    @property
    def launches(self) -> list[Launch]:
        return self.backend.launches

    def exit(self, replica_id: str, code: int | None) -> None:
        """End a live replica now (see `FakeBackend.exit`)."""
        self.backend.exit(replica_id, code)

    async def start(self, launch: Launch, on_exit: ExitCallback) -> FakeReplica:
        b = self.backend
        rid = launch.replica_id
        b.launches.append(launch)
        if b.start_gate is not None and not self._closed:
            await b.start_gate.wait()
        if self._closed:
            raise ProviderError(f"cannot start replica {rid!r}: the fake provider is closed")
        if b.start_errors:
            raise ProviderError(b.start_errors.popleft())
        if not launch.command:
            raise ProviderError(f"cannot start replica {rid!r}: its command is empty")
        if launch.command[0] in b.missing:
            raise ProviderError(f"cannot run {launch.command[0]!r}: No such file or directory")
        if rid in b.live:
            raise ProviderError(f"replica {rid!r} is still running; adopt it or use another id")
        r = FakeReplica(rid, launch.pool, launch.token, launch.command, launch.version)
        b.live[rid] = r
        self._watch(r, on_exit)
        code = b.exit_codes.get(launch.command[0])
        if code is not None:
            asyncio.get_running_loop().call_soon(b._end, r, code)
        return r

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        r = self._own(handle)
        self.backend.stops.append((r.replica_id, grace_s))
        if self.backend.live.get(r.replica_id) is not r:
            return
        loop = asyncio.get_running_loop()
        kill_at = loop.time() + max(grace_s, 0.0)
        first = r.replica_id not in self._kill_at
        if not first and self._kill_at[r.replica_id] <= kill_at:
            return
        self._kill_at[r.replica_id] = kill_at
        old = self._timers.pop(r.replica_id, None)
        if old is not None:
            old.cancel()
        if grace_s > 0 and first and not self.backend._stubborn(r):
            loop.call_soon(self.backend._end, r, 0)  # it drains and exits
        self._timers[r.replica_id] = loop.call_at(kill_at, self.backend._end, r, FORCED_EXIT_CODE)

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        return [
            r
            for rid, r in sorted(self.backend.live.items())
            if rid not in self.backend._watchers and (pool is None or r.pool == pool)
        ]

    def adopt(self, handle: ReplicaHandle, on_exit: ExitCallback) -> None:
        r = self._own(handle)
        if self._closed:
            raise ProviderError(f"cannot adopt replica {r.replica_id!r}: the provider is closed")
        if r.replica_id in self.backend._watchers or r.replica_id in self._watched:
            raise ProviderError(f"replica {r.replica_id!r} is already watched")
        if self.backend.live.get(r.replica_id) is not r:
            # It went since it was listed: report that now, from the loop.
            self._watched[r.replica_id] = r
            asyncio.get_running_loop().call_soon(self._gone_unseen, r, on_exit)
            return
        self._watch(r, on_exit)

    def _gone_unseen(self, r: FakeReplica, on_exit: ExitCallback) -> None:
        if self._watched.get(r.replica_id) is not r:
            return  # detached meanwhile
        self._forget(r.replica_id)
        on_exit(None, describe_exit(None))

    def detach(self) -> None:
        self._closed = True
        for rid in self._watched:
            self.backend._watchers.pop(rid, None)
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self._watched.clear()

    async def aclose(self, grace_s: float) -> None:
        self._closed = True
        for r in list(self._watched.values()):
            await self.stop(r, grace_s)
        if self._watched:
            self._all_gone.clear()
            await self._all_gone.wait()  # the forced ends above bound this wait

    # ------------------------------------------------------------ internals

    def _watch(self, r: FakeReplica, on_exit: ExitCallback) -> None:
        self._watched[r.replica_id] = r
        self.backend._watchers[r.replica_id] = (self, on_exit)

    def _forget(self, replica_id: str) -> None:
        self._watched.pop(replica_id, None)
        self._kill_at.pop(replica_id, None)
        timer = self._timers.pop(replica_id, None)
        if timer is not None:
            timer.cancel()
        if not self._watched:
            self._all_gone.set()

    def _own(self, handle: ReplicaHandle) -> FakeReplica:
        if not isinstance(handle, FakeReplica):
            raise ProviderError(f"{handle!r} is not a fake replica")
        return handle


def _is_a_provider(p: FakeProvider) -> Provider:
    return p  # mypy checks here that the fake keeps the protocol's shape
