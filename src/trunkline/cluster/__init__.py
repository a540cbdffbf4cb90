"""Cluster coordination: several trunkline servers sharing one service.

`Coordinator` is the protocol of the shared store (leases with epochs,
member heartbeats, fenced records, claims); `MemoryCoordinator` keeps it in
one process (tests), `RedisCoordinator` on Redis (the `trunkline[cluster]`
extra, imported only when `[cluster] redis_url` is set: single-process mode
never imports redis). `create_coordinator(url)` picks one. Every backend
passes `tests/cluster/contract.py`.
"""

from __future__ import annotations

from trunkline.cluster.memory import MemoryCoordinator
from trunkline.cluster.protocol import ClusterUnavailable, Coordinator, LeaseInfo, MemberInfo

__all__ = [
    "ClusterUnavailable",
    "Coordinator",
    "LeaseInfo",
    "MemberInfo",
    "MemoryCoordinator",
    "create_coordinator",
]


def create_coordinator(
    url: str, *, namespace: str, timeout_s: float, single_connection: bool = False
) -> Coordinator:
    """The coordinator for a redis:// URL (imports redis-py here, lazily);
    `single_connection`: one connection, its calls serialised."""
    from trunkline.cluster.redis import RedisCoordinator

    return RedisCoordinator(
        url, namespace=namespace, timeout_s=timeout_s, single_connection=single_connection
    )
