"""The provider contract has teeth: each check fails on a fake that breaks its rule.

Every broken provider below is the working `FakeProvider` with one rule
broken; it is run through the check that pins that rule, which must raise
`AssertionError` (with the message of that rule, not some other failure).
If a check were weakened so that it no longer sees the breakage, its case
here fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest
from providers import contract as c
from providers.backends import fake_backend

from trunkline.providers import ExitCallback, Launch, ProviderError, ReplicaHandle
from trunkline.providers.fake import FakeProvider, FakeReplica


class ReportsExitTwice(FakeProvider):
    """Calls every replica's on_exit twice."""

    def _watch(self, r: FakeReplica, on_exit: ExitCallback) -> None:
        def twice(code: int | None, detail: str) -> None:
            on_exit(code, detail)
            on_exit(code, detail)

        super()._watch(r, twice)


class DescribesNoKind(FakeProvider):
    """Its handles' describe() has no "kind"."""

    async def start(self, launch: Launch, on_exit: ExitCallback) -> FakeReplica:
        r = await super().start(launch, on_exit)
        r.describe = lambda: {"replica": r.replica_id}  # type: ignore[method-assign]
        return r


class IgnoresStopRequests(FakeProvider):
    """Never asks: every replica runs until forced at the end of its grace."""

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        self.backend.stubborn.add(self._own(handle).command[0])
        await super().stop(handle, grace_s)


class ForcesAtOnce(FakeProvider):
    """Ignores the grace: forces the end at once."""

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        await super().stop(handle, 0)


class StopNotIdempotent(FakeProvider):
    """A second stop of the same replica raises."""

    stopped: set[str]

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        stopped = self.__dict__.setdefault("stopped", set())
        if handle.replica_id in stopped:
            raise ProviderError(f"{handle.replica_id} is already stopping")
        stopped.add(handle.replica_id)
        await super().stop(handle, grace_s)


class PostponesTheForcedEnd(FakeProvider):
    """A later stop with a longer grace moves the forced end later."""

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        self._kill_at.pop(handle.replica_id, None)
        await super().stop(handle, grace_s)


class ReportsFailedStarts(FakeProvider):
    """Calls on_exit for a start that raised."""

    async def start(self, launch: Launch, on_exit: ExitCallback) -> FakeReplica:
        try:
            return await super().start(launch, on_exit)
        except ProviderError as exc:
            on_exit(None, str(exc))
            raise


class StartsDuplicates(FakeProvider):
    """Starts a second replica under a live one's id (the first one is lost)."""

    async def start(self, launch: Launch, on_exit: ExitCallback) -> FakeReplica:
        self.backend.live.pop(launch.replica_id, None)
        return await super().start(launch, on_exit)


class NeverListsExisting(FakeProvider):
    """A restarted server finds nothing: it would start duplicates."""

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        return []


class ListsTheDead(FakeProvider):
    """Lists every replica ever launched and not watched, dead or alive."""

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        listed = await super().list_existing(pool)
        seen = {h.replica_id for h in listed} | set(self.backend._watchers)
        for la in self.backend.launches:
            if la.replica_id not in seen and (pool is None or la.pool == pool):
                seen.add(la.replica_id)
                listed.append(FakeReplica(la.replica_id, la.pool, la.token, la.command))
        return listed


class ForgetsTheToken(FakeProvider):
    """Listed replicas come back without their registration token."""

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        return [
            dataclasses.replace(h, token="") if isinstance(h, FakeReplica) else h
            for h in await super().list_existing(pool)
        ]


class DetachKeepsWatching(FakeProvider):
    """detach() closes the provider but keeps its watchers."""

    def detach(self) -> None:
        self._closed = True


class ReportsInsideAdopt(FakeProvider):
    """Adopting a replica that has gone calls on_exit inside adopt()."""

    def adopt(self, handle: ReplicaHandle, on_exit: ExitCallback) -> None:
        if self.backend.live.get(handle.replica_id) is not handle:
            on_exit(None, "gone")
            return
        super().adopt(handle, on_exit)


class AcloseLeavesReplicas(FakeProvider):
    """aclose() refuses new starts but stops nothing."""

    async def aclose(self, grace_s: float) -> None:
        self._closed = True


Check = Callable[[c.Backend], Awaitable[None]]

# (broken provider, the check that must catch it, what its failure says)
CASES: list[tuple[type[FakeProvider], Check, str]] = [
    (ReportsExitTwice, c.check_exit_reported_once, r"\[\(3, 'exited with code 3'\), \(3"),
    (DescribesNoKind, c.check_handle_describes_itself, r"\{'replica'"),
    (IgnoresStopRequests, c.check_stop_ends_within_grace, "no exit reported"),
    (ForcesAtOnce, c.check_stop_forces_after_grace, "forced after 0.0"),
    (StopNotIdempotent, c.check_stop_is_idempotent, "stop of .* raised: .* already stopping"),
    (PostponesTheForcedEnd, c.check_stop_is_idempotent, "short grace, then a long one"),
    (ReportsFailedStarts, c.check_failed_start_raises_and_never_exits, "No such file"),
    (StartsDuplicates, c.check_start_refuses_a_live_id, "a second replica started"),
    (NeverListsExisting, c.check_restart_lists_and_adopts_live_replicas, r"^\[\]$"),
    (ListsTheDead, c.check_restart_lists_and_adopts_live_replicas, r"^\['support-c\d+', "),
    (ForgetsTheToken, c.check_restart_lists_and_adopts_live_replicas, r"^\('support', ''\)$"),
    (DetachKeepsWatching, c.check_restart_lists_and_adopts_live_replicas, r"^\[\]$"),
    (ReportsInsideAdopt, c.check_adopting_a_replica_that_went_reports_it, "inside adopt"),
    (AcloseLeavesReplicas, c.check_aclose_stops_every_replica, r"^\{\}$"),
]


@pytest.mark.parametrize(
    ("broken", "check", "message"), CASES, ids=[cls.__name__ for cls, _, _ in CASES]
)
async def test_check_fails_on_a_provider_breaking_its_rule(
    broken: type[FakeProvider], check: Check, message: str
) -> None:
    """The check raises AssertionError, naming the broken rule, on this broken fake."""
    with pytest.raises(AssertionError, match=message):
        await check(fake_backend(broken))


def test_every_check_is_shown_to_catch_a_breakage() -> None:
    """No contract check goes without a broken fake that it catches."""
    caught = {check for _, check, _ in CASES}
    assert [ch.__name__ for ch in c.ALL_CHECKS if ch not in caught] == []
