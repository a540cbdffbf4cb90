"""The coordination store several trunkline servers share: its protocol.

A `Coordinator` holds three kinds of record, each with the atomicity the
cluster's guarantees rest on (docs/cluster.md):

- **Leases**, one per pool: taken only when absent, stamped with an epoch
  the store increments on every take (never below a `floor` the caller has
  seen, so a store that lost its data cannot hand out an old epoch again),
  extended or released only by the holder of that exact epoch, gone when
  their time runs out.
- **Members**: each server's heartbeat (what it serves, where) with a time
  to live; an entry whose time ran out is not listed.
- **Fenced records**: per pool, job id -> value, written or deleted only
  while the lease of that pool is held by the writer with that epoch, in
  one atomic step (the check and the write cannot be separated by a
  take-over). This is the fence at the side effect: a paused holder that
  comes back with an old epoch has every write refused.
- **Claims**: a key bound to the first value claimed for it, for a while
  (idempotency keys -> job ids), given up only by a caller naming that
  value (a claim whose job was never made).

Every method raises `ClusterUnavailable` when the store cannot be reached
or does not answer in time; nothing is half-done by a failed call except
what the store did before the connection went (each call is one atomic
script or command).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Protocol

__all__ = ["ClusterUnavailable", "Coordinator", "LeaseInfo", "MemberInfo"]


class ClusterUnavailable(Exception):
    """The coordination store cannot be reached or did not answer in time."""


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A pool's lease as the store holds it: who, which epoch, ms left."""

    pool: str
    member: str
    epoch: int
    ttl_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class MemberInfo:
    """A member's heartbeat: its fields (url, started, ...) and ms left."""

    member: str
    info: Mapping[str, str]
    ttl_ms: int


class Coordinator(Protocol):
    """See the module docstring. Names (pools, members, keys) are opaque
    strings; the backend namespaces them."""

    async def acquire(self, pool: str, member: str, ttl_ms: int, floor: int = 0) -> int | None:
        """Take the pool's lease if nobody holds it: the new epoch (greater
        than every epoch handed out before and than `floor`), else None."""

    async def renew(self, pool: str, member: str, epoch: int, ttl_ms: int) -> bool:
        """Extend the lease to `ttl_ms` from now if `member` holds it at
        `epoch`; False (nothing changed) otherwise."""

    async def release(self, pool: str, member: str, epoch: int) -> bool:
        """Give the lease up if `member` holds it at `epoch`."""

    async def leases(self) -> list[LeaseInfo]:
        """Every lease currently held, by pool name."""

    async def heartbeat(self, member: str, info: Mapping[str, str], ttl_ms: int) -> None:
        """Announce (or refresh) `member` with `info` for `ttl_ms`."""

    async def leave(self, member: str) -> None:
        """Remove `member`'s heartbeat at once (clean shutdown)."""

    async def members(self) -> list[MemberInfo]:
        """Every member whose heartbeat has not run out, by id."""

    async def put_fenced(self, pool: str, member: str, epoch: int, key: str, value: str) -> bool:
        """Set the pool's record `key` if `member` holds the pool's lease at
        `epoch` right now (atomically); False, nothing written, otherwise."""

    async def delete_fenced(self, pool: str, member: str, epoch: int, key: str) -> bool:
        """Delete the pool's record `key` under the same condition."""

    async def write_fenced(
        self,
        pool: str,
        member: str,
        epoch: int,
        puts: Mapping[str, str],
        deletes: Iterable[str] = (),
    ) -> bool:
        """Set every record of `puts` and delete every key of `deletes` (puts
        first), all or none, under the same condition as `put_fenced`: one
        round trip for a batch of writes."""

    async def records(self, pool: str) -> dict[str, str]:
        """The pool's records (anyone may read)."""

    async def claim(self, key: str, value: str, ttl_ms: int) -> str:
        """Bind `key` to `value` for `ttl_ms` unless it is bound: the value
        `key` is bound to now (ours, or the earlier claimant's)."""

    async def unclaim(self, key: str, value: str) -> bool:
        """Unbind `key` if it is bound to `value` (atomically); False,
        nothing changed, otherwise."""

    async def ping(self) -> None:
        """Return if the store answers (raises `ClusterUnavailable`)."""

    async def close(self) -> None:
        """Release connections; idempotent."""
