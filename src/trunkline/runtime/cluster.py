"""Cluster membership and pool ownership for one server (docs/cluster.md).

Theory of operation
-------------------
Each server is a *member*: it announces itself in the coordination store
(`trunkline.cluster.Coordinator`: Redis) with a heartbeat, and holds a
`core.lease.LeaseHolder` per pool. The member holding a pool's lease is its
*owner*: it alone lets requests of that pool in, sends offers, assignments
and terminations to that pool's workers, and runs that pool's autoscaler.
Everything else about a job is unchanged: the owner's Dispatcher and
scheduler decide as in single-process mode, so caps, quotas and the rules
of docs/semantics.md hold within the owner exactly as they do there.

One task (`_run`) drives the leases: every `tick_s` it makes each due lease
call (acquire or renew, concurrently), answers the holders with the time
each call was sent, refreshes the heartbeat every `ttl / 3` and re-reads
the cluster's view (members, leases) for `status()` and `owner_url()`;
a follower's next acquire is set for the moment the lease it read runs
out (`LeaseHolder.held_elsewhere`), so a dead owner's pool is taken within
a tick of its expiry rather than at the next retry.

The Dispatcher asks `may_act(pool)` before it lets a request in and before
it sends any frame to a worker of that pool (its fence). `may_act` reads
only the holder's clock bound, no I/O: a member that was paused past its
lease, or has not reached the store for a lease's time, answers False from
its first instruction after the pause. `refusal(pool)` says why not, as the
error the API returns: `cluster_unavailable` (the store cannot be reached)
or `not_pool_owner` (another member owns the pool; its URL is named).

`LocalCoordination` is the single-process default: every pool is ours, no
store, no task; the Dispatcher skips the fence altogether without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from trunkline import __version__
from trunkline.cluster import ClusterUnavailable, Coordinator, LeaseInfo, MemberInfo
from trunkline.core.lease import EpochFence, LeaseCall, LeaseHolder, LeaseState

log = logging.getLogger("trunkline.cluster")

__all__ = ["ClusterNode", "ClusterRefusal", "ClusterStatus", "LocalCoordination"]


class ClusterRefusal(Exception):
    """A request this member may not let in: `code` is `cluster_unavailable`
    or `not_pool_owner`; `owner_url` names the owner when one is known."""

    def __init__(self, code: str, message: str, owner_url: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.owner_url = owner_url


class LocalCoordination:
    """Single process: every pool is ours (the embedded default)."""

    member = "local"

    def may_act(self, pool: str) -> bool:
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class PoolLease:
    """A pool's lease as this member sees it (for status and metrics)."""

    pool: str
    owner: str  # member id, "" if nobody holds it
    owner_url: str
    epoch: int
    ttl_ms: int  # left in the store at the last read
    ours: bool
    age_s: float  # how long we have held it (0 if not ours)


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterStatus:
    """`GET /v1/cluster`: this member, the store's health, members, leases."""

    member: str
    url: str
    store: str  # "ok" or why not
    store_down_s: float  # seconds since the store last answered (0 while it does)
    members: tuple[MemberInfo, ...]
    leases: tuple[PoolLease, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "member": self.member,
            "url": self.url,
            "store": self.store,
            "store_down_s": round(self.store_down_s, 3),
            "members": [
                {"member": m.member, **dict(m.info), "ttl_ms": m.ttl_ms} for m in self.members
            ],
            "pools": [dataclasses.asdict(pl) for pl in self.leases],
        }


def member_id() -> str:
    """A fresh id for this process: host name, pid and a random tail (a
    restarted server is a new member: it must not inherit old authority)."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterNode:
    """This server as a cluster member; see the module docstring. `clock`
    is the loop's monotonic time (the same clock the dispatcher uses)."""

    def __init__(
        self,
        coordinator: Coordinator,
        pools: Iterable[str],
        *,
        url: str,
        lease_ttl_s: float,
        clock: Callable[[], float],
        member: str = "",
    ) -> None:
        self.coordinator = coordinator
        self.member = member or member_id()
        self.url = url
        self.ttl_s = lease_ttl_s
        self.tick_s = min(0.05, lease_ttl_s / 20)
        self._clock = clock
        self.holders: dict[str, LeaseHolder] = {}
        for pool in pools:
            self.want(pool)
        self._members: tuple[MemberInfo, ...] = ()
        self._leases: dict[str, LeaseInfo] = {}
        self._urls: dict[str, str] = {}  # member -> url
        self._beat_at = -1e9
        self._view_at = -1e9
        self._ok_at = clock()
        self._error = ""
        self._task: asyncio.Task[None] | None = None
        self._gained: list[Callable[[str, int], None]] = []
        self._lost: list[Callable[[str], None]] = []
        self._seen = EpochFence()  # the highest epoch seen per pool
        self._led: dict[str, int] = {}  # pools we led at the last tick -> epoch
        self._started_wall = time.time()
        self._busy: set[str] = set()  # kinds of call in flight
        self._calls: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle

    def want(self, pool: str) -> LeaseHolder:
        """Contend for `pool`'s lease from now on (configured pools from the
        start; a pool first seen in a request or a register when it comes)."""
        h = self.holders.get(pool)
        if h is None:
            h = self.holders[pool] = LeaseHolder(pool, self.member, self.ttl_s)
        return h

    def on_gained(self, fn: Callable[[str, int], None]) -> None:
        """`fn(pool, epoch)` when this member becomes a pool's owner."""
        self._gained.append(fn)

    def on_lost(self, fn: Callable[[str], None]) -> None:
        """`fn(pool)` when it stops being one (lease lost, expired or given up)."""
        self._lost.append(fn)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the loop, give up every lease we hold and leave (best effort:
        with the store unreachable the leases simply run out)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.wait(self._calls)
        for h in self.holders.values():
            if h.state is LeaseState.LEADER:
                with contextlib.suppress(ClusterUnavailable):
                    await self.coordinator.release(h.pool, self.member, h.epoch)
                h.released()
        self._announce_changes()
        with contextlib.suppress(ClusterUnavailable):
            await self.coordinator.leave(self.member)
        await self.coordinator.close()

    # --------------------------------------------------------------- queries

    def clock(self) -> float:
        """The member's monotonic clock (the one its leases are timed by)."""
        return self._clock()

    def may_act(self, pool: str) -> bool:
        """True while this member owns `pool` (clock bound only, no I/O)."""
        h = self.holders.get(pool)
        return h is not None and h.may_act(self._clock())

    def epoch(self, pool: str) -> int:
        h = self.holders.get(pool)
        return h.epoch if h is not None and h.may_act(self._clock()) else 0

    @property
    def store_ok(self) -> bool:
        """True while the store answered the last call made to it."""
        return not self._error

    def lease_of(self, pool: str) -> LeaseInfo | None:
        """The pool's lease as last read from the store (None: nobody held it)."""
        return self._leases.get(pool)

    def owner_url(self, pool: str) -> str:
        lease = self._leases.get(pool)
        return self._urls.get(lease.member, "") if lease is not None else ""

    def refusal(self, pool: str) -> ClusterRefusal:
        """Why a request of `pool` is not let in here (call when `may_act` is False)."""
        if pool not in self.holders:
            self.want(pool)
        if self._error:
            return ClusterRefusal(
                "cluster_unavailable",
                f"the cluster's coordination store is unreachable ({self._error}); "
                "new requests are refused until it answers again (running calls go on)",
            )
        lease = self._leases.get(pool)
        if lease is None or lease.member == self.member:
            return ClusterRefusal(
                "cluster_unavailable",
                f"pool {pool!r} has no owner yet (its lease is being taken); retry shortly",
            )
        url = self._urls.get(lease.member, "")
        return ClusterRefusal(
            "not_pool_owner",
            f"pool {pool!r} is owned by cluster member {lease.member}"
            + (f" at {url}" if url else "")
            + "; send this request there",
            url,
        )

    def status(self) -> ClusterStatus:
        now = self._clock()
        pools = []
        for name in sorted(set(self.holders) | set(self._leases)):
            lease = self._leases.get(name)
            h = self.holders.get(name)
            ours = h is not None and h.may_act(now)
            pools.append(
                PoolLease(
                    pool=name,
                    owner=self.member if ours else (lease.member if lease else ""),
                    owner_url=self.url if ours else self.owner_url(name),
                    epoch=h.epoch if ours and h is not None else (lease.epoch if lease else 0),
                    ttl_ms=lease.ttl_ms if lease else 0,
                    ours=ours,
                    age_s=round(h.age(now), 3) if ours and h is not None else 0.0,
                )
            )
        return ClusterStatus(
            member=self.member,
            url=self.url,
            store="ok" if not self._error else self._error,
            store_down_s=max(0.0, now - self._ok_at) if self._error else 0.0,
            members=self._members,
            leases=tuple(pools),
        )

    # ------------------------------------------------------------------ loop

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster tick failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """One round: start the due lease calls, the heartbeat and the view,
        each as a task of its own: a slow view read (two round trips) must
        never hold a renewal back past its lease. One call of each kind is
        in flight at a time (`LeaseHolder.in_flight`, `_busy`)."""
        now = self._clock()
        for h in self.holders.values():
            call = h.due(now)
            if call is not None:
                self._start("lease:" + h.pool, self._lease_call(h, call, now))
        if now - self._beat_at >= self.ttl_s / 3 and "beat" not in self._busy:
            self._beat_at = now
            self._start("beat", self._beat())
        if now - self._view_at >= self.ttl_s / 4 and "view" not in self._busy:
            self._view_at = now
            self._start("view", self._view())
        self._announce_changes()

    def _start(self, kind: str, coro: Coroutine[Any, Any, None]) -> None:
        self._busy.add(kind)
        task = asyncio.get_running_loop().create_task(coro)
        self._calls.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._busy.discard(kind)
            self._calls.discard(t)
            self._announce_changes()

        task.add_done_callback(done)

    async def _lease_call(self, h: LeaseHolder, call: LeaseCall, sent: float) -> None:
        c = self.coordinator
        try:
            if call is LeaseCall.ACQUIRE:
                # The floor: the highest epoch we saw anyone hold, so a store
                # that lost its data cannot hand out an old epoch again.
                floor = max(h.epoch, self._seen.current(h.pool))
                epoch = await c.acquire(h.pool, self.member, h.ttl_ms, floor=floor)
                if h.acquired(sent, epoch, self._clock()):
                    log.info("pool lease taken", extra={"pool": h.pool, "epoch": h.epoch})
            else:
                ok = await c.renew(h.pool, self.member, h.epoch, h.ttl_ms)
                h.renewed(sent, ok, self._clock())
                if not ok:
                    log.warning("pool lease lost", extra={"pool": h.pool, "epoch": h.epoch})
            self._reached()
        except ClusterUnavailable as exc:
            h.failed(self._clock())
            self._unreachable(exc)

    async def _beat(self) -> None:
        info = {
            "url": self.url,
            "version": __version__,
            "started": f"{self._started_wall:.3f}",
            "pid": str(os.getpid()),
        }
        try:
            await self.coordinator.heartbeat(self.member, info, round(self.ttl_s * 3000))
            self._reached()
        except ClusterUnavailable as exc:
            self._unreachable(exc)

    async def _view(self) -> None:
        try:
            members = await self.coordinator.members()
            leases = await self.coordinator.leases()
        except ClusterUnavailable as exc:
            self._unreachable(exc)
            return
        self._reached()
        now = self._clock()
        self._members = tuple(members)
        self._urls = {m.member: m.info.get("url", "") for m in members}
        self._leases = {x.pool: x for x in leases}
        for x in leases:
            self._seen.admit(x.pool, x.epoch)
            h = self.want(x.pool)  # a pool some member leads: ours to take over if it dies
            if x.member != self.member:
                # Read before `now`, so this is at or after its expiry in the
                # store: a dead owner's lease is tried for the tick it runs out.
                h.held_elsewhere(now, x.ttl_ms / 1000 + 0.001)

    def _reached(self) -> None:
        if self._error:
            log.info("cluster store reachable again", extra={"member": self.member})
        self._error = ""
        self._ok_at = self._clock()

    def _unreachable(self, exc: ClusterUnavailable) -> None:
        if not self._error:
            log.warning("cluster store unreachable", extra={"reason": str(exc)})
        self._error = str(exc)[:200] or "unreachable"

    def _announce_changes(self) -> None:
        now = self._clock()
        led = {p: h.epoch for p, h in self.holders.items() if h.may_act(now)}
        for pool, epoch in led.items():
            if self._led.get(pool) != epoch:
                for fn in list(self._gained):
                    _safe(fn, pool, epoch)
        for pool in self._led:
            if pool not in led:
                log.info("pool lease given up", extra={"pool": pool})
                for fn2 in list(self._lost):
                    _safe(fn2, pool)
        self._led = led


def _safe(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("cluster observer failed")
