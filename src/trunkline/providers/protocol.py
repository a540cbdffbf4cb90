"""What the autoscaler needs from a replica provider.

A provider turns "start a replica with this command and environment" into a
running replica somewhere (a child process of the server, a Kubernetes pod) and
reports, exactly once, when that replica is gone. It also finds the replicas an
earlier server run left behind, so that a restarted server adopts them instead
of starting duplicates or killing live ones.

Lifecycle of one replica, as a provider sees it::

    start(launch, on_exit) ──> watched ──(it ends, however)──> on_exit(code, detail)
                                  │
    list_existing() ─> adopt(h, on_exit) ─> watched           (exactly once per replica)
                                  │
                   detach() ──> left running, unwatched: no on_exit, a later
                                provider on the same backend lists it again

Rules every provider keeps (tests/providers/contract.py checks them):

- `on_exit` is called exactly once per started or adopted replica, from the
  event loop, never from inside `start`, `stop` or `adopt`; never for a start
  that raised; never after `detach()`; and for every watched replica before
  `aclose()` returns.
- `stop` is idempotent: it asks once (SIGTERM, pod deletion with a grace
  period) and forces the end after the grace; a later call can only bring the
  forced end forward.
- Handles describe themselves (`describe()`, `location`) so the server never
  looks inside one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

# Called once when a replica is gone: (exit code, or None when it cannot be
# known, e.g. for an adopted process that is not our child; a short human
# description such as "exited with code 1", "killed by SIGKILL", "OOMKilled").
ExitCallback = Callable[[int | None, str], None]

# What a handle tells `/v1/pools` and the dashboard about itself: flat, JSON-ready.
Description = dict[str, str | int | None]


class ProviderError(Exception):
    """The provider could not do what was asked (create the provider, start or
    adopt a replica); the message says why and, where it can, what to do."""


def check_adoptable(replica_id: str, *, closed: bool, watched: bool) -> None:
    """The one rule every provider's `adopt` keeps: not after `aclose`, not a
    replica already watched. Raises `ProviderError` naming which."""
    if closed:
        raise ProviderError(f"cannot adopt replica {replica_id!r}: the provider is closed")
    if watched:
        raise ProviderError(f"replica {replica_id!r} is already watched")


@dataclasses.dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one replica.

    `token` is the replica's registration token (its worker presents it when it
    connects); the provider keeps it with the replica so that an adopted replica
    can be tied back to its worker after a server restart.
    """

    replica_id: str
    pool: str
    command: tuple[str, ...]
    env: Mapping[str, str]  # added to (and overriding) the provider's own environment
    token: str
    # The pool's version this replica runs (a digest, see config.replica_version):
    # kept with the replica and shown in `describe()["version"]`, so a restarted
    # server knows which version each adopted replica runs.
    version: str = ""
    # Kubernetes: the pod template this version is made from ("" = the pool's own).
    pod_template: str = ""


class ReplicaHandle(Protocol):
    """One replica, started or found by a provider. Pass it back to the provider
    that returned it (or, for a listed one, to that provider's `adopt`)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def pool(self) -> str: ...

    @property
    def token(self) -> str: ...

    @property
    def location(self) -> str:
        """Where it runs, in a few words for people: "pid 1234", "pod support-3"."""
        ...

    def describe(self) -> Description:
        """Facts for `/v1/pools` and the dashboard; always has a `"kind"` key
        (e.g. `{"kind": "process", "pid": 1234, "log": "/run/x/support-1.log"}`,
        `{"kind": "pod", "pod": "support-1", "node": "n1"}`), and `"version"`
        (the launch's version, "" when it had none)."""
        ...


class Provider(Protocol):
    """Starts, stops, finds and watches replicas; see the module docstring."""

    @property
    def name(self) -> str:
        """The name a replica pool's `provider` key uses for it ("local")."""
        ...

    async def start(self, launch: Launch, on_exit: ExitCallback) -> ReplicaHandle:
        """Start the replica and watch it; raises `ProviderError` if it cannot be
        started (then `on_exit` is never called), also when `launch.replica_id`
        names a replica that is still live or the provider is closed. A failure
        learnt after `start` returned (an image that cannot be pulled, a pod
        that cannot be scheduled) is that replica's end: `on_exit(code or None,
        reason)`, once, like any other."""
        ...

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Ask the replica to stop (a worker drains, then exits) and force it
        after `grace_s` (at once if `grace_s <= 0`). Returns once the request is
        issued, not when the replica is gone: `on_exit` says that. Idempotent,
        also for a replica that is already gone."""
        ...

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        """Live replicas on this provider's backend that it does not watch (left
        by an earlier server run), of `pool` or of every pool. Replicas that
        ended meanwhile are not listed (and their records are cleaned up)."""
        ...

    def adopt(self, handle: ReplicaHandle, on_exit: ExitCallback) -> None:
        """Watch a replica returned by `list_existing`: `on_exit` fires exactly
        once when it goes (at once, from the loop, if it went since it was
        listed). Raises `ProviderError` if it is already watched."""
        ...

    def detach(self) -> None:
        """Stop watching every replica without stopping any (a server handing
        over to its successor): no `on_exit` fires afterwards, and a later
        provider on the same backend lists them. The provider is then closed;
        call `aclose` to release what it holds (it stops nothing)."""
        ...

    async def aclose(self, grace_s: float) -> None:
        """Stop every watched replica (forcing them after `grace_s`) and return
        once each one's `on_exit` has fired. Later starts raise `ProviderError`."""
        ...
