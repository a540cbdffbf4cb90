"""What the autoscale controller needs from a replica provider.

A provider turns "start a replica with this command and environment" into a
running replica somewhere (a child process here; a Kubernetes pod later) and
reports, exactly once, when that replica is gone. The controller never looks
inside a handle beyond `pid` and `log_path`, which it shows in `/v1/pools`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

# Called once when a replica is gone: (exit code or None if unknown, a short
# human description such as "exited with code 1" or "killed by SIGKILL").
ExitCallback = Callable[[int | None, str], None]


class ProviderError(Exception):
    """The replica could not be started; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one replica."""

    replica_id: str
    pool: str
    command: tuple[str, ...]
    env: Mapping[str, str]  # added to (and overriding) the provider's own environment


class ReplicaHandle(Protocol):
    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> str: ...


class Provider(Protocol):
    async def start(self, launch: Launch, on_exit: ExitCallback) -> ReplicaHandle:
        """Start the replica; raises `ProviderError` if it cannot be started.
        `on_exit` is called once when the replica is gone, however it goes."""
        ...

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Ask the replica to stop (SIGTERM: a worker drains, then exits); force
        it (SIGKILL) if it is still there after `grace_s`. Idempotent."""
        ...

    async def aclose(self, grace_s: float) -> None:
        """Stop every replica, waiting at most `grace_s` before forcing them."""
        ...
