"""The fake provider's test knobs behave as the controller's tests will rely on."""

from __future__ import annotations

import asyncio

import pytest
from providers.contract import Exits

from trunkline.providers import Launch, ProviderError
from trunkline.providers.fake import FakeBackend, FakeProvider


def launch(rid: str, command: tuple[str, ...] = ("agent",)) -> Launch:
    return Launch(rid, "support", command, {}, f"tok-{rid}")


async def test_a_start_gate_holds_starts_until_set() -> None:
    """With `start_gate` set, a start is recorded at once and returns only once the gate opens."""
    p = FakeProvider()
    p.backend.start_gate = asyncio.Event()
    task = asyncio.create_task(p.start(launch("support-1"), lambda c, d: None))
    await asyncio.sleep(0)  # ok-sleep: one loop turn (no waiting), the start reaches the gate
    assert [la.replica_id for la in p.launches] == ["support-1"]
    assert not task.done()
    p.backend.start_gate.set()
    h = await asyncio.wait_for(task, 5)
    assert h.replica_id == "support-1"
    assert "support-1" in p.backend.live
    await p.aclose(0)


async def test_start_errors_fail_the_next_starts_only() -> None:
    """Each queued start error fails one start with that message and no exit report."""
    p = FakeProvider()
    ex = Exits()
    p.backend.start_errors.append("image not found")
    with pytest.raises(ProviderError, match="image not found"):
        await p.start(launch("support-1"), ex.callback("support-1"))
    await ex.start(p, launch("support-2"))
    assert sorted(p.backend.live) == ["support-2"]
    await p.aclose(0)
    assert list(ex.calls) == ["support-2"]


async def test_exit_reports_at_once_and_only_once() -> None:
    """`exit(id, code)` calls that replica's on_exit inside the call; a second exit is a no-op."""
    p = FakeProvider()
    ex = Exits()
    await ex.start(p, launch("support-1"))
    p.exit("support-1", 1)
    assert ex.calls == {"support-1": [(1, "exited with code 1")]}
    p.exit("support-1", 2)
    p.exit("no-such-replica", 2)
    assert ex.count("support-1") == 1
    await p.aclose(0)


async def test_replicas_added_as_existing_are_listed_and_adopted() -> None:
    """`add_existing` plays a replica left by an earlier run: listed, adoptable, then reported."""
    world = FakeBackend()
    world.add_existing("support-7", "support", "tok-7")
    p = FakeProvider(world)
    [h] = await p.list_existing("support")
    assert (h.replica_id, h.token) == ("support-7", "tok-7")
    assert await p.list_existing("sales") == []
    ex = Exits()
    ex.adopt(p, h)
    world.exit("support-7", 0)
    assert ex.calls == {"support-7": [(0, "exited with code 0")]}


async def test_stops_are_recorded_and_crashing_commands_exit_by_themselves() -> None:
    """`stops` records each stop with its grace; an `exit_codes` command exits right after start."""
    p = FakeProvider()
    p.backend.exit_codes["crasher"] = 2
    ex = Exits()
    h = await ex.start(p, launch("support-1"))
    await ex.start(p, launch("support-2", ("crasher",)))
    assert await ex.wait_for_exit("support-2", 5) == (2, "exited with code 2")
    await p.stop(h, 3.0)
    await p.stop(h, 1.0)
    assert await ex.wait_for_exit("support-1", 5) == (0, "exited with code 0")
    assert p.backend.stops == [("support-1", 3.0), ("support-1", 1.0)]
    await p.aclose(0)
    ex.assert_clean()
