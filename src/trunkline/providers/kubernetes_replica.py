"""The Kubernetes provider's replica handle and per-pool settings.

`KubernetesReplica` is what `KubernetesProvider.start` and `list_existing`
hand out: the pod a replica runs in and what the provider last saw of it
(phase, node, why it waits), plus the provider's bookkeeping for its end.
`PodPool` is one pool's pod template file and the drain limit its pods'
termination grace covers.
"""

from __future__ import annotations

import asyncio
import dataclasses

from trunkline.providers.protocol import Description, ExitCallback

__all__ = ["KubernetesReplica", "PodPool"]


@dataclasses.dataclass(frozen=True, slots=True)
class PodPool:
    """One pool's pods: its template file and the drain limit their grace covers."""

    template: str
    min_grace_s: float = 0.0


@dataclasses.dataclass(eq=False)
class KubernetesReplica:
    """A replica's pod, as this provider knows it."""

    replica_id: str
    pool: str
    token: str
    pod: str
    namespace: str
    uid: str = ""
    node: str = ""
    phase: str = "Pending"
    waiting: str = ""
    version: str = ""
    done: bool = False
    # Provider bookkeeping.
    _on_exit: ExitCallback | None = dataclasses.field(default=None, repr=False)
    _known_epoch: int = dataclasses.field(default=0, repr=False)
    _deadline: float | None = dataclasses.field(default=None, repr=False)
    _detached: bool = dataclasses.field(default=False, repr=False)
    _timer: asyncio.TimerHandle | None = dataclasses.field(default=None, repr=False)
    _gone: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)

    @property
    def location(self) -> str:
        return f"pod {self.pod}"

    def describe(self) -> Description:
        return {
            "kind": "pod",
            "pod": self.pod,
            "namespace": self.namespace,
            "node": self.node or None,
            "phase": self.phase,
            "waiting": self.waiting or None,
            "version": self.version,
        }
