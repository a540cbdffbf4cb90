"""Per-pool scheduling settings, as the core sees them.

Plain values with defaults; the TOML loader in `trunkline.config` validates user
input and builds these. The core trusts them.
"""

from __future__ import annotations

import dataclasses
import enum


class Placement(enum.Enum):
    PACK = "pack"  # fullest worker that fits: whole replicas empty out for scale-down
    SPREAD = "spread"  # emptiest worker: lowest per-call load


@dataclasses.dataclass(frozen=True, slots=True)
class PoolConfig:
    """Scheduling policy for one agent name (one pool of worker replicas)."""

    agent_name: str
    # Slot cap per worker when the worker does not declare one. None: unknown,
    # one outstanding offer at a time and the worker's status/load decide.
    max_jobs_per_worker: int | None = None
    # Plan ceiling on concurrent jobs across the pool (None: no ceiling).
    max_concurrent_jobs: int | None = None
    # How long a job may wait for a slot before it ends `no_capacity`.
    queue_max_wait_s: float = 10.0
    # An offer unanswered this long is withdrawn and the worker takes a strike.
    availability_timeout_s: float = 3.0
    placement: Placement = Placement.PACK
    # A worker reporting load >= this gets no offers.
    load_threshold: float = 1.0
    # A soft refusal (terminate=false) benches the worker this long at most.
    refusal_backoff_s: float = 1.0
    # Consecutive unanswered offers after which a worker gets no offers until
    # it answers again.
    max_strikes: int = 2
    # A disconnected worker's jobs wait this long for it to reconnect and migrate.
    reconnect_grace_s: float = 10.0
    # After the grace: re-queue the job (True) or end it `worker_lost` (False).
    redispatch_on_worker_loss: bool = False
