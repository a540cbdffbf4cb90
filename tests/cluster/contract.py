"""The coordination store contract: every `Coordinator` backend must pass
these checks (run by test_contract.py over the in-memory double and a real
redis-server). Each check gets a fresh, empty store on a real clock; expiry
is awaited as a condition, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time

from trunkline.cluster import ClusterUnavailable, Coordinator


async def _until_gone(fn: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while await fn():  # type: ignore[operator]
        assert time.monotonic() < deadline, "record did not expire"
        await asyncio.sleep(0.01)


async def acquire_once_then_none(c: Coordinator) -> None:
    """A free lease is taken with epoch 1; while held, nobody (not even the holder) takes it."""
    assert await c.acquire("p", "a", 10_000) == 1
    assert await c.acquire("p", "b", 10_000) is None
    assert await c.acquire("p", "a", 10_000) is None
    assert await c.acquire("q", "b", 10_000) == 1  # pools are independent


async def epochs_grow_across_holders(c: Coordinator) -> None:
    """Every take-over gets a greater epoch, and never one below the floor given."""
    assert await c.acquire("p", "a", 10_000) == 1
    assert await c.release("p", "a", 1)
    assert await c.acquire("p", "b", 10_000) == 2
    assert await c.release("p", "b", 2)
    assert await c.acquire("p", "a", 10_000, floor=41) == 42
    assert await c.release("p", "a", 42)
    assert await c.acquire("p", "a", 10_000, floor=5) == 43


async def renew_only_by_holder_at_epoch(c: Coordinator) -> None:
    """Renew succeeds for the holder at its epoch only; others and stale epochs change nothing."""
    e = await c.acquire("p", "a", 10_000)
    assert e == 1
    assert await c.renew("p", "a", 1, 10_000)
    assert not await c.renew("p", "b", 1, 10_000)
    assert not await c.renew("p", "a", 2, 10_000)
    assert not await c.release("p", "b", 1)
    assert not await c.release("p", "a", 0)
    [lease] = await c.leases()
    assert (lease.pool, lease.member, lease.epoch) == ("p", "a", 1)
    assert 0 < lease.ttl_ms <= 10_000


async def lease_expires_then_taken_with_new_epoch(c: Coordinator) -> None:
    """An unrenewed lease expires; the next taker gets epoch+1 and the old holder cannot renew."""
    assert await c.acquire("p", "a", 60) == 1
    await _until_gone(c.leases)
    assert not await c.renew("p", "a", 1, 10_000)
    assert await c.acquire("p", "b", 10_000) == 2
    assert not await c.renew("p", "a", 1, 10_000)
    assert [(x.member, x.epoch) for x in await c.leases()] == [("b", 2)]


async def renew_extends(c: Coordinator) -> None:
    """A renewed lease outlives its first ttl."""
    assert await c.acquire("p", "a", 300) == 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        assert await c.renew("p", "a", 1, 300)
        await asyncio.sleep(0.05)
    assert [x.epoch for x in await c.leases()] == [1]


async def fenced_writes_need_the_current_lease(c: Coordinator) -> None:
    """Only the lease holder at its epoch writes or deletes records; stale epochs are refused."""
    assert await c.put_fenced("p", "a", 1, "j1", "v") is False  # no lease at all
    assert await c.acquire("p", "a", 10_000) == 1
    assert await c.put_fenced("p", "a", 1, "j1", "v1")
    assert not await c.put_fenced("p", "b", 1, "j2", "x")
    assert not await c.put_fenced("p", "a", 2, "j2", "x")
    assert await c.records("p") == {"j1": "v1"}
    assert await c.release("p", "a", 1)
    assert await c.acquire("p", "b", 10_000) == 2
    assert not await c.put_fenced("p", "a", 1, "j1", "stale")
    assert not await c.delete_fenced("p", "a", 1, "j1")
    assert await c.records("p") == {"j1": "v1"}  # the new holder sees what the old one wrote
    assert await c.put_fenced("p", "b", 2, "j1", "v2")
    assert await c.delete_fenced("p", "b", 2, "j1")
    assert await c.records("p") == {}
    assert await c.records("other") == {}


async def batched_fenced_writes_all_or_none(c: Coordinator) -> None:
    """A batch of puts and deletes lands whole for the holder at its epoch, not at all otherwise."""
    assert not await c.write_fenced("p", "a", 1, {"j1": "v1"})  # no lease at all
    assert await c.acquire("p", "a", 10_000) == 1
    assert await c.write_fenced("p", "a", 1, {"j1": "v1", "j2": "v2", "j3": "v3"})
    assert await c.write_fenced("p", "a", 1, {"j4": "v4"}, ["j1", "j2", "never"])
    assert await c.write_fenced("p", "a", 1, {}, ["j3"])
    assert await c.write_fenced("p", "a", 1, {}, [])
    assert await c.records("p") == {"j4": "v4"}
    assert not await c.write_fenced("p", "a", 2, {"j5": "x"}, ["j4"])
    assert not await c.write_fenced("p", "b", 1, {"j5": "x"}, ["j4"])
    assert await c.records("p") == {"j4": "v4"}
    many = {f"k{i}": str(i) for i in range(300)}
    assert await c.write_fenced("p", "a", 1, many, ["j4"])
    assert await c.records("p") == many


async def fenced_write_refused_after_expiry(c: Coordinator) -> None:
    """Once the lease ran out, its holder's writes are refused even if nobody took it."""
    assert await c.acquire("p", "a", 60) == 1
    await _until_gone(c.leases)
    assert not await c.put_fenced("p", "a", 1, "j", "late")
    assert not await c.write_fenced("p", "a", 1, {"j": "late"})
    assert await c.records("p") == {}


async def members_heartbeat_and_expire(c: Coordinator) -> None:
    """Members are listed with their info while their heartbeat lives; leave removes at once."""
    await c.heartbeat("m1", {"url": "http://a"}, 10_000)
    await c.heartbeat("m2", {"url": "http://b"}, 60)
    got = await c.members()
    assert [(m.member, dict(m.info)) for m in got] == [
        ("m1", {"url": "http://a"}),
        ("m2", {"url": "http://b"}),
    ]

    async def two() -> bool:
        return len(await c.members()) == 2

    await _until_gone(two)
    assert [m.member for m in await c.members()] == ["m1"]
    await c.leave("m1")
    assert await c.members() == []


async def claim_binds_first_value(c: Coordinator) -> None:
    """A claim binds its key to the first value; later claims get that value until it expires."""
    assert await c.claim("k", "job-1", 10_000) == "job-1"
    assert await c.claim("k", "job-2", 10_000) == "job-1"
    assert await c.claim("short", "a", 60) == "a"

    async def bound() -> bool:
        return await c.claim("short", "b", 60) == "a"

    await _until_gone(bound)


async def unclaim_only_with_the_bound_value(c: Coordinator) -> None:
    """unclaim frees a key only for the value it is bound to; then a new claim binds."""
    assert await c.claim("u", "job-1", 10_000) == "job-1"
    assert await c.unclaim("u", "job-2") is False
    assert await c.claim("u", "job-2", 10_000) == "job-1"
    assert await c.unclaim("u", "job-1") is True
    assert await c.unclaim("u", "job-1") is False
    assert await c.claim("u", "job-3", 10_000) == "job-3"
    assert await c.unclaim("never", "x") is False


async def concurrent_acquires_one_winner(c: Coordinator) -> None:
    """Of 20 members racing for one free lease, exactly one wins."""
    got = await asyncio.gather(*(c.acquire("p", f"m{i}", 10_000) for i in range(20)))
    assert sorted(got, key=lambda e: e or 0)[-1] == 1
    assert sum(1 for e in got if e is not None) == 1


async def ping_answers(c: Coordinator) -> None:
    """ping returns when the store is up."""
    await c.ping()


CHECKS = [
    acquire_once_then_none,
    epochs_grow_across_holders,
    renew_only_by_holder_at_epoch,
    lease_expires_then_taken_with_new_epoch,
    renew_extends,
    fenced_writes_need_the_current_lease,
    batched_fenced_writes_all_or_none,
    fenced_write_refused_after_expiry,
    members_heartbeat_and_expire,
    claim_binds_first_value,
    unclaim_only_with_the_bound_value,
    concurrent_acquires_one_winner,
    ping_answers,
]

__all__ = ["CHECKS", "ClusterUnavailable"]
