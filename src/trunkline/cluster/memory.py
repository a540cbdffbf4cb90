"""`MemoryCoordinator`: the coordination store in one process, for tests and
for reasoning. It keeps Redis's semantics where they matter: keys expire by
the clock it is given (checked on every access, as Redis does lazily), each
method is atomic (no await inside one), epochs only grow. Several members
"sharing" it are several callers of one instance."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from trunkline.cluster.protocol import ClusterUnavailable, LeaseInfo, MemberInfo

__all__ = ["MemoryCoordinator"]


class MemoryCoordinator:
    """See the module docstring. `clock()` gives seconds; `down = True`
    makes every call raise `ClusterUnavailable` (an outage)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._leases: dict[str, tuple[str, int, float]] = {}  # pool -> member, epoch, expiry
        self._epochs: dict[str, int] = {}
        self._members: dict[str, tuple[dict[str, str], float]] = {}
        self._records: dict[str, dict[str, str]] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        self.down = False
        self.calls = 0

    def _now(self) -> float:
        self.calls += 1
        if self.down:
            raise ClusterUnavailable("coordination store down (test double)")
        return self._clock()

    def _lease(self, pool: str, now: float) -> tuple[str, int, float] | None:
        held = self._leases.get(pool)
        if held is not None and held[2] <= now:
            del self._leases[pool]
            return None
        return held

    def _holds(self, pool: str, member: str, epoch: int, now: float) -> bool:
        held = self._lease(pool, now)
        return held is not None and held[0] == member and held[1] == epoch

    async def acquire(self, pool: str, member: str, ttl_ms: int, floor: int = 0) -> int | None:
        now = self._now()
        if self._lease(pool, now) is not None:
            return None
        epoch = max(self._epochs.get(pool, 0), floor) + 1
        self._epochs[pool] = epoch
        self._leases[pool] = (member, epoch, now + ttl_ms / 1000)
        return epoch

    async def renew(self, pool: str, member: str, epoch: int, ttl_ms: int) -> bool:
        now = self._now()
        if not self._holds(pool, member, epoch, now):
            return False
        self._leases[pool] = (member, epoch, now + ttl_ms / 1000)
        return True

    async def release(self, pool: str, member: str, epoch: int) -> bool:
        now = self._now()
        if not self._holds(pool, member, epoch, now):
            return False
        del self._leases[pool]
        return True

    async def leases(self) -> list[LeaseInfo]:
        now = self._now()
        out = []
        for pool in sorted(self._leases):
            held = self._lease(pool, now)
            if held is not None:
                out.append(LeaseInfo(pool, held[0], held[1], max(0, round((held[2] - now) * 1000))))
        return out

    async def heartbeat(self, member: str, info: Mapping[str, str], ttl_ms: int) -> None:
        now = self._now()
        self._members[member] = (dict(info), now + ttl_ms / 1000)

    async def leave(self, member: str) -> None:
        self._now()
        self._members.pop(member, None)

    async def members(self) -> list[MemberInfo]:
        now = self._now()
        out = []
        for member in sorted(self._members):
            info, expiry = self._members[member]
            if expiry <= now:
                del self._members[member]
            else:
                out.append(MemberInfo(member, dict(info), max(0, round((expiry - now) * 1000))))
        return out

    async def put_fenced(self, pool: str, member: str, epoch: int, key: str, value: str) -> bool:
        now = self._now()
        if not self._holds(pool, member, epoch, now):
            return False
        self._records.setdefault(pool, {})[key] = value
        return True

    async def delete_fenced(self, pool: str, member: str, epoch: int, key: str) -> bool:
        now = self._now()
        if not self._holds(pool, member, epoch, now):
            return False
        self._records.get(pool, {}).pop(key, None)
        return True

    async def write_fenced(
        self,
        pool: str,
        member: str,
        epoch: int,
        puts: Mapping[str, str],
        deletes: Iterable[str] = (),
    ) -> bool:
        now = self._now()
        if not self._holds(pool, member, epoch, now):
            return False
        held = self._records.setdefault(pool, {})
        held.update(puts)
        for key in deletes:
            held.pop(key, None)
        return True

    async def records(self, pool: str) -> dict[str, str]:
        self._now()
        return dict(self._records.get(pool, {}))

    async def claim(self, key: str, value: str, ttl_ms: int) -> str:
        now = self._now()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._claims[key] = (value, now + ttl_ms / 1000)
        return value

    async def unclaim(self, key: str, value: str) -> bool:
        now = self._now()
        held = self._claims.get(key)
        if held is None or held[1] <= now or held[0] != value:
            return False
        del self._claims[key]
        return True

    async def ping(self) -> None:
        self._now()

    async def close(self) -> None:
        return None
