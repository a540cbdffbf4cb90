"""The replica-provider contract: the rules every provider keeps, as checks.

Each check is an `async def check_*(b: Backend) -> None` that raises
`AssertionError` when the provider breaks the rule its docstring states.
A provider's test supplies a `Backend`: how to make a provider (each call is
a new server run on the same backend: same run dir, same cluster), commands
that behave like replicas, and a way to end a replica behind every
provider's back. `test_contract.py` runs every check on every provider;
`test_contract_catches_broken.py` shows each check failing on a fake that
breaks its rule.

Replica behaviours a backend's `command(behaviour)` must provide:

- "graceful": ready after start; on a stop request it exits with code 0;
- "stubborn": ready after start; ignores the stop request (forced after grace);
- "exit3": exits by itself with code 3 soon after starting.

The checks never sleep: they wait on callbacks and conditions, with
`b.timeout_s` as the bound that turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Literal

from trunkline.providers import ExitCallback, Launch, Provider, ProviderError, ReplicaHandle

Behaviour = Literal["graceful", "stubborn", "exit3"]


@dataclasses.dataclass
class Backend:
    """What a provider's test module supplies to run the contract."""

    name: str  # the provider's `name`
    new_provider: Callable[[], Provider]  # a new server run on the same backend
    command: Callable[[Behaviour], tuple[str, ...]]
    # A launch the provider must refuse in `start` (local: an executable that
    # does not exist; Kubernetes: a pod the API server rejects as invalid).
    unstartable: Callable[[Launch], Launch]
    ready: Callable[[str], Awaitable[None]]  # replica id -> returns once it can take a stop
    kill_unwatched: Callable[[ReplicaHandle], Awaitable[None]]  # end it; return once gone
    forced_exit_codes: tuple[int | None, ...]  # what a forced stop may report
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    short_grace_s: float = 0.5
    timeout_s: float = 30.0


_ids = itertools.count(1)


def launch(b: Backend, behaviour: Behaviour, pool: str = "support") -> Launch:
    """A launch with a fresh replica id and token."""
    n = next(_ids)
    rid = f"{pool}-c{n}"
    env = {**b.env, "TRUNKLINE_REPLICA_ID": rid}
    return Launch(rid, pool, b.command(behaviour), env, f"tlr_token{n}", version=f"ver{n:09d}")


class Exits:
    """Records every `on_exit` call, per replica, and what was going on then."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int | None, str]]] = {}
        self.violations: list[str] = []
        self._started: set[str] = set()
        self._events: dict[str, asyncio.Event] = {}
        self._inside: str | None = None
        self._caller: asyncio.Task[object] | None = None

    def callback(self, rid: str) -> ExitCallback:
        def on_exit(code: int | None, detail: str) -> None:
            # Called by the task that is inside start/stop/adopt: synchronously
            # from that call, which the contract forbids (the loop must do it).
            if self._inside is not None and asyncio.current_task() is self._caller:
                self.violations.append(f"{rid}: on_exit called inside {self._inside}()")
            if rid not in self._started:
                self.violations.append(f"{rid}: on_exit called before start() returned")
            self.calls.setdefault(rid, []).append((code, detail))
            self._event(rid).set()

        return on_exit

    def _event(self, rid: str) -> asyncio.Event:
        return self._events.setdefault(rid, asyncio.Event())

    @contextlib.contextmanager
    def _during(self, what: str) -> Iterator[None]:
        self._inside, self._caller = what, asyncio.current_task()
        try:
            yield
        finally:
            self._inside = self._caller = None

    async def start(self, p: Provider, la: Launch) -> ReplicaHandle:
        """`p.start(la, …)` with this recorder as its `on_exit`."""
        with self._during("start"):
            h = await p.start(la, self.callback(la.replica_id))
        self._started.add(la.replica_id)
        return h

    def adopt(self, p: Provider, h: ReplicaHandle) -> None:
        self._started.add(h.replica_id)
        with self._during("adopt"):
            p.adopt(h, self.callback(h.replica_id))

    async def stop(self, p: Provider, h: ReplicaHandle, grace_s: float) -> None:
        """`p.stop(h, grace_s)`, which must not raise."""
        with self._during("stop"):
            try:
                await p.stop(h, grace_s)
            except ProviderError as exc:
                raise AssertionError(f"stop of {h.replica_id} raised: {exc}") from exc

    async def wait(self, b: Backend, rid: str, what: str) -> tuple[int | None, str]:
        """The first exit reported for `rid`; AssertionError if none in time."""
        return await self.wait_for_exit(rid, b.timeout_s, what)

    async def wait_for_exit(
        self, rid: str, timeout_s: float, what: str = "replica"
    ) -> tuple[int | None, str]:
        try:
            await asyncio.wait_for(self._event(rid).wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{what}: no exit reported for {rid} in {timeout_s} s") from None
        return self.calls[rid][0]

    def count(self, rid: str) -> int:
        return len(self.calls.get(rid, []))

    def assert_clean(self) -> None:
        assert not self.violations, self.violations


@contextlib.asynccontextmanager
async def providers(b: Backend) -> AsyncIterator[Callable[[], Provider]]:
    """Yields `new()`, making providers; closes them all at the end."""
    made: list[Provider] = []

    def new() -> Provider:
        p = b.new_provider()
        made.append(p)
        return p

    try:
        yield new
    finally:
        for p in reversed(made):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.aclose(b.short_grace_s), b.timeout_s)


# ---------------------------------------------------------------------- checks


async def check_handle_describes_itself(b: Backend) -> None:
    """A handle carries the launch's replica id, pool and token, a non-empty
    `location`, and `describe()` with a "kind", the launch's "version" and
    only str/int/None values; the provider's `name` is the one its pools use."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        assert p.name == b.name, (p.name, b.name)
        la = launch(b, "graceful")
        h = await ex.start(p, la)
        assert (h.replica_id, h.pool, h.token) == (la.replica_id, la.pool, la.token)
        assert isinstance(h.location, str), h.location
        assert h.location, "empty location"
        d = h.describe()
        assert isinstance(d.get("kind"), str), d
        assert d["kind"], d
        assert d.get("version") == la.version, d
        assert all(isinstance(v, str | int | type(None)) for v in d.values()), d
        await b.ready(la.replica_id)
        await p.stop(h, b.timeout_s)
        await ex.wait(b, la.replica_id, "stopped replica")
    ex.assert_clean()


async def check_exit_reported_once(b: Backend) -> None:
    """A replica that exits by itself is reported once, after `start`
    returned, with its code and a detail that names it."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        la = launch(b, "exit3")
        await ex.start(p, la)
        code, detail = await ex.wait(b, la.replica_id, "replica exiting with 3")
        assert code == 3, (code, detail)
        assert "3" in detail, detail
    assert ex.count(la.replica_id) == 1, ex.calls
    ex.assert_clean()


async def check_stop_ends_within_grace(b: Backend) -> None:
    """A stop request ends a graceful replica with code 0 before the grace runs out."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        la = launch(b, "graceful")
        h = await ex.start(p, la)
        await b.ready(la.replica_id)
        await ex.stop(p, h, b.timeout_s * 4)
        code, detail = await ex.wait(b, la.replica_id, "graceful replica asked to stop")
        assert code == 0, (code, detail)
    assert ex.count(la.replica_id) == 1, ex.calls
    ex.assert_clean()


async def check_stop_forces_after_grace(b: Backend) -> None:
    """A replica that ignores the stop request is forced once the grace is
    over, not before, and reported with the forced exit code."""
    ex = Exits()
    loop = asyncio.get_running_loop()
    async with providers(b) as new:
        p = new()
        la = launch(b, "stubborn")
        h = await ex.start(p, la)
        await b.ready(la.replica_id)
        t0 = loop.time()
        await ex.stop(p, h, b.short_grace_s)
        code, detail = await ex.wait(b, la.replica_id, "stubborn replica after its grace")
        elapsed = loop.time() - t0
        assert elapsed >= b.short_grace_s - 0.05, f"forced after {elapsed:.3f} s"
        assert code in b.forced_exit_codes, (code, detail)
        assert detail, detail
    assert ex.count(la.replica_id) == 1, ex.calls
    ex.assert_clean()


async def check_stop_is_idempotent(b: Backend) -> None:
    """Stopping twice, or after the end, is harmless and reports one exit; a
    second stop can bring the forced end forward, never postpone it."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        graceful, early, late = (
            launch(b, "graceful"),
            launch(b, "stubborn"),
            launch(b, "stubborn"),
        )
        hg = await ex.start(p, graceful)
        he = await ex.start(p, early)
        hl = await ex.start(p, late)
        for la in (graceful, early, late):
            await b.ready(la.replica_id)
        await ex.stop(p, hg, b.timeout_s * 4)
        await ex.stop(p, hg, b.timeout_s * 4)
        # `early`: a long grace, then a short one: forced after the short one.
        await ex.stop(p, he, b.timeout_s * 100)
        await ex.stop(p, he, b.short_grace_s)
        # `late`: a short grace, then a long one: still forced after the short one.
        await ex.stop(p, hl, b.short_grace_s)
        await ex.stop(p, hl, b.timeout_s * 100)
        assert (await ex.wait(b, graceful.replica_id, "stopped twice"))[0] == 0
        await ex.wait(b, early.replica_id, "long grace, then a short one")
        await ex.wait(b, late.replica_id, "short grace, then a long one")
        await ex.stop(p, hg, b.short_grace_s)  # after the end: a no-op
        await ex.stop(p, he, 0)
    for la in (graceful, early, late):
        assert ex.count(la.replica_id) == 1, ex.calls
    ex.assert_clean()


async def check_failed_start_raises_and_never_exits(b: Backend) -> None:
    """A start the provider refuses (no such executable, an invalid pod) raises
    `ProviderError`, never calls its `on_exit`, and leaves nothing for a later
    run to adopt."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        la = b.unstartable(launch(b, "graceful"))
        refusal = ""
        try:
            await p.start(la, ex.callback(la.replica_id))
        except ProviderError as exc:
            refusal = str(exc) or "(empty)"
        else:
            raise AssertionError("an unstartable launch did not raise ProviderError")
        assert refusal != "(empty)", "ProviderError without a message"
        assert await new().list_existing() == [], "a failed start left a replica behind"
    assert ex.count(la.replica_id) == 0, ex.calls


async def check_start_refuses_a_live_id(b: Backend) -> None:
    """Starting a replica under the id of a live one raises `ProviderError`
    and leaves the live one alone."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        la = launch(b, "graceful")
        h = await ex.start(p, la)
        await b.ready(la.replica_id)
        second = Exits()
        try:
            await p.start(la, second.callback(la.replica_id))
        except ProviderError:
            pass
        else:
            raise AssertionError("a second replica started under a live one's id")
        assert ex.count(la.replica_id) == 0, "the live replica was reported gone"
        await ex.stop(p, h, b.timeout_s * 4)
        assert (await ex.wait(b, la.replica_id, "the live replica, stopped"))[0] == 0
        assert second.count(la.replica_id) == 0, second.calls
    assert ex.count(la.replica_id) == 1, ex.calls
    ex.assert_clean()


async def check_restart_lists_and_adopts_live_replicas(b: Backend) -> None:
    """After a restart (the old provider detached, a new one on the same
    backend) `list_existing` returns the live replicas with their pool, id,
    token and version, not one that died while no server ran; the adopted one's end is
    reported once to the new run and never to the old one."""
    old_ex, ex = Exits(), Exits()
    async with providers(b) as new:
        old = new()
        a, gone, other = (
            launch(b, "graceful"),
            launch(b, "graceful"),
            launch(b, "graceful", "sales"),
        )
        await old_ex.start(old, a)
        hgone = await old_ex.start(old, gone)
        await old_ex.start(old, other)
        for la in (a, gone, other):
            await b.ready(la.replica_id)
        old.detach()
        await b.kill_unwatched(hgone)
        p = new()
        listed = {h.replica_id: h for h in await p.list_existing("support")}
        assert set(listed) == {a.replica_id}, sorted(listed)
        h = listed[a.replica_id]
        assert (h.pool, h.token) == (a.pool, a.token), (h.pool, h.token)
        assert h.describe().get("version") == a.version, h.describe()
        everything = {h.replica_id for h in await p.list_existing()}
        assert everything == {a.replica_id, other.replica_id}, sorted(everything)
        ex.adopt(p, h)
        try:
            ex.adopt(p, h)
        except ProviderError:
            pass
        else:
            raise AssertionError("adopting a watched replica twice did not raise ProviderError")
        assert a.replica_id not in {x.replica_id for x in await p.list_existing()}
        await ex.stop(p, h, b.timeout_s * 4)
        code, _ = await ex.wait(b, a.replica_id, "adopted replica, stopped")
        assert code in (0, None), code
        # A third run adopts `other` (and stops it when closed).
        third = new()
        [ho] = await third.list_existing("sales")
        ex.adopt(third, ho)
        await third.aclose(b.short_grace_s)
        assert ex.count(other.replica_id) == 1, ex.calls
        assert await new().list_existing() == [], "replicas left after every run closed"
    assert ex.count(a.replica_id) == 1, ex.calls
    assert old_ex.calls == {}, f"the detached run heard exits: {old_ex.calls}"
    ex.assert_clean()


async def check_adopting_a_replica_that_went_reports_it(b: Backend) -> None:
    """A listed replica that ends before `adopt` is reported once, from the
    loop (not inside `adopt`)."""
    old_ex, ex = Exits(), Exits()
    async with providers(b) as new:
        old = new()
        la = launch(b, "graceful")
        h_old = await old_ex.start(old, la)
        await b.ready(la.replica_id)
        old.detach()
        p = new()
        [h] = await p.list_existing()
        await b.kill_unwatched(h_old)
        ex.adopt(p, h)
        await ex.wait(b, la.replica_id, "replica that went before adopt")
    assert ex.count(la.replica_id) == 1, ex.calls
    assert old_ex.calls == {}, f"the detached run heard exits: {old_ex.calls}"
    ex.assert_clean()


async def check_aclose_stops_every_replica(b: Backend) -> None:
    """`aclose` stops every watched replica (forcing the stubborn after the
    grace), returns once each exit is reported, and then refuses to start."""
    ex = Exits()
    async with providers(b) as new:
        p = new()
        g, s = launch(b, "graceful"), launch(b, "stubborn")
        await ex.start(p, g)
        await ex.start(p, s)
        await b.ready(g.replica_id)
        await b.ready(s.replica_id)
        try:
            await asyncio.wait_for(p.aclose(b.short_grace_s), b.timeout_s)
        except TimeoutError:
            raise AssertionError(f"aclose took more than {b.timeout_s} s") from None
        assert ex.count(g.replica_id) == 1, ex.calls
        assert ex.count(s.replica_id) == 1, ex.calls
        assert ex.calls[g.replica_id][0][0] == 0, ex.calls
        assert ex.calls[s.replica_id][0][0] in b.forced_exit_codes, ex.calls
        try:
            await p.start(launch(b, "graceful"), ex.callback("after-close"))
        except ProviderError:
            pass
        else:
            raise AssertionError("start after aclose did not raise ProviderError")
        assert await new().list_existing() == [], "aclose left replicas running"
    ex.assert_clean()


ALL_CHECKS: list[Callable[[Backend], Awaitable[None]]] = [
    check_handle_describes_itself,
    check_exit_reported_once,
    check_stop_ends_within_grace,
    check_stop_forces_after_grace,
    check_stop_is_idempotent,
    check_failed_start_raises_and_never_exits,
    check_start_refuses_a_live_id,
    check_restart_lists_and_adopts_live_replicas,
    check_adopting_a_replica_that_went_reports_it,
    check_aclose_stops_every_replica,
]
