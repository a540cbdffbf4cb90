"""`RedisCoordinator`: the coordination store on Redis (redis-py's asyncio
client; `pip install 'trunkline[cluster]'`).

Keys, all under `<namespace>:` so several deployments can share one Redis
(LiveKit's #4772 was environments misrouting each other on a shared one):

- `lease:<pool>` = "<epoch>|<member>" with PX expiry; `epoch:<pool>` the
  counter; `pools` the set of pool names ever leased (for listing).
- `member:<id>` = JSON info with PX expiry; `members` the set of ids.
- `jobs:<pool>` a hash of fenced records.
- `claim:<key>` = value with PX expiry.

Every check-then-write is one Lua script, so Redis runs it atomically: the
lease compare-and-extend, compare-and-delete, and the fenced writes (the
lease is read and the record written in one step; measured in
../shared/KUBERNETES.md: read-then-write overshot a cap of 4 to 11, one Lua
check-and-reserve held it). Calls time out after `timeout_s` and are not
retried by the client: the caller's lease logic decides what a failure
means, and a retry could land after the lease it relied on has gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from trunkline.cluster.protocol import ClusterUnavailable, LeaseInfo, MemberInfo

__all__ = ["RedisCoordinator"]

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[3])
if cur < floor then redis.call('SET', KEYS[2], floor) end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], e .. '|' .. ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
return e
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""
_PUT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""
# ARGV: the holder, the number of puts n, n key/value pairs, then the keys to delete.
_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if n > 0 then redis.call('HSET', KEYS[2], unpack(ARGV, 3, 2 + 2 * n)) end
if #ARGV > 2 + 2 * n then redis.call('HDEL', KEYS[2], unpack(ARGV, 3 + 2 * n)) end
return 1
"""
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
_UNCLAIM = _RELEASE  # compare-and-delete


def _held(epoch: int, member: str) -> str:
    return f"{epoch}|{member}"


class RedisCoordinator:
    """See the module docstring. `url` is a redis:// or rediss:// URL."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "trunkline",
        timeout_s: float = 0.5,
        single_connection: bool = False,
    ) -> None:
        self._ns = namespace
        # single_connection: one connection, calls one after another (no pool
        # lookup per call: a third of a call's client CPU in a profile). For
        # the record writer, whose calls are serial anyway; the lease loop's
        # calls must not queue behind each other, so it keeps a pool.
        self._r: aioredis.Redis = aioredis.Redis.from_url(
            url,
            single_connection_client=single_connection,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._acquire = self._r.register_script(_ACQUIRE)
        self._renew = self._r.register_script(_RENEW)
        self._release = self._r.register_script(_RELEASE)
        self._put = self._r.register_script(_PUT)
        self._delete = self._r.register_script(_DELETE)
        self._write = self._r.register_script(_WRITE)
        self._claim = self._r.register_script(_CLAIM)
        self._unclaim = self._r.register_script(_UNCLAIM)

    def _k(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    async def _call(self, aw: Any) -> Any:
        try:
            return await aw
        except (RedisError, OSError) as exc:
            raise ClusterUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    async def acquire(self, pool: str, member: str, ttl_ms: int, floor: int = 0) -> int | None:
        keys = [self._k("lease", pool), self._k("epoch", pool), self._k("pools")]
        got = await self._call(self._acquire(keys=keys, args=[member, ttl_ms, floor, pool]))
        return None if got is None else int(got)

    async def renew(self, pool: str, member: str, epoch: int, ttl_ms: int) -> bool:
        keys = [self._k("lease", pool)]
        return bool(await self._call(self._renew(keys=keys, args=[_held(epoch, member), ttl_ms])))

    async def release(self, pool: str, member: str, epoch: int) -> bool:
        keys = [self._k("lease", pool)]
        return bool(await self._call(self._release(keys=keys, args=[_held(epoch, member)])))

    async def leases(self) -> list[LeaseInfo]:
        pools = sorted(await self._call(self._r.smembers(self._k("pools"))))
        if not pools:
            return []
        pipe = self._r.pipeline(transaction=False)
        for pool in pools:
            pipe.get(self._k("lease", pool))
            pipe.pttl(self._k("lease", pool))
        got = await self._call(pipe.execute())
        out = []
        for i, pool in enumerate(pools):
            value, ttl = got[2 * i], got[2 * i + 1]
            if value is None or ttl is None or int(ttl) < 0:
                continue
            epoch, _, member = str(value).partition("|")
            out.append(LeaseInfo(pool, member, int(epoch), int(ttl)))
        return out

    async def heartbeat(self, member: str, info: Mapping[str, str], ttl_ms: int) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k("member", member), json.dumps(dict(info)), px=ttl_ms)
        pipe.sadd(self._k("members"), member)
        await self._call(pipe.execute())

    async def leave(self, member: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k("member", member))
        pipe.srem(self._k("members"), member)
        await self._call(pipe.execute())

    async def members(self) -> list[MemberInfo]:
        ids = sorted(await self._call(self._r.smembers(self._k("members"))))
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for m in ids:
            pipe.get(self._k("member", m))
            pipe.pttl(self._k("member", m))
        got = await self._call(pipe.execute())
        out, gone = [], []
        for i, m in enumerate(ids):
            raw, ttl = got[2 * i], got[2 * i + 1]
            if raw is None or ttl is None or int(ttl) < 0:
                gone.append(m)
                continue
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            fields = {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {}
            out.append(MemberInfo(m, fields, int(ttl)))
        if gone:
            await self._call(self._r.srem(self._k("members"), *gone))
        return out

    async def put_fenced(self, pool: str, member: str, epoch: int, key: str, value: str) -> bool:
        keys = [self._k("lease", pool), self._k("jobs", pool)]
        args = [_held(epoch, member), key, value]
        return bool(await self._call(self._put(keys=keys, args=args)))

    async def delete_fenced(self, pool: str, member: str, epoch: int, key: str) -> bool:
        keys = [self._k("lease", pool), self._k("jobs", pool)]
        return bool(await self._call(self._delete(keys=keys, args=[_held(epoch, member), key])))

    async def write_fenced(
        self,
        pool: str,
        member: str,
        epoch: int,
        puts: Mapping[str, str],
        deletes: Iterable[str] = (),
    ) -> bool:
        keys = [self._k("lease", pool), self._k("jobs", pool)]
        args: list[str | int] = [_held(epoch, member), len(puts)]
        for key, value in puts.items():
            args += (key, value)
        args += deletes
        return bool(await self._call(self._write(keys=keys, args=args)))

    async def records(self, pool: str) -> dict[str, str]:
        got = await self._call(self._r.hgetall(self._k("jobs", pool)))
        return {str(k): str(v) for k, v in got.items()}

    async def claim(self, key: str, value: str, ttl_ms: int) -> str:
        got = await self._call(self._claim(keys=[self._k("claim", key)], args=[value, ttl_ms]))
        return str(got)

    async def unclaim(self, key: str, value: str) -> bool:
        keys = [self._k("claim", key)]
        return bool(await self._call(self._unclaim(keys=keys, args=[value])))

    async def ping(self) -> None:
        await self._call(self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()
