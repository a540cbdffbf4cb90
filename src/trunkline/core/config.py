"""Per-pool scheduling settings and server-wide limits, as the core sees them.

Plain values with defaults; the TOML loader in `trunkline.config` validates user
input and builds these. The core trusts them. `agent_name_problem` is the one
rule for agent names, shared by every intake and the config loader.
"""

from __future__ import annotations

import dataclasses
import enum
import re

# Agent names: what LiveKit's examples and every test use (`support-agent`,
# `inbound_caller`, `voice.v2`), short enough to be a metrics label. "" is the
# default agent (automatic dispatch).
AGENT_NAME_MAX = 128
_AGENT_NAME = re.compile(r"[A-Za-z0-9._-]*")


def agent_name_problem(name: str) -> str | None:
    """Why `name` cannot be an agent name, or None if it can."""
    if not name:
        return None  # the default agent
    if len(name) > AGENT_NAME_MAX:
        return f"agent name is {len(name)} characters long; at most {AGENT_NAME_MAX} allowed"
    if _AGENT_NAME.fullmatch(name) is None:
        return (
            f"agent name {name[:40]!r} has characters outside A-Z a-z 0-9 . _ - "
            '(use only those, or "" for the default agent)'
        )
    return None


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
    # A new request that would wait behind this many queued jobs of the pool is
    # refused at once (`queue_full`). Re-queued jobs (refused offers, lost
    # workers) are never refused: they were already let in.
    max_queued: int = 1000
    # A job asked to terminate whose connected worker has not confirmed its
    # end within this long ends `cancelled`; its slot on that worker is freed.
    terminate_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Server-wide bounds the scheduler enforces (`[server]` in the config)."""

    # The largest capacity a worker may declare (`/agent?max_jobs=N`; the adapter
    # refuses more), and how many jobs a worker of unknown capacity may bring
    # back by migrate after a restart.
    max_worker_jobs: int = 1000
    # Trace events kept per job: the first half and the latest, with one
    # `trace_truncated` event counting what was dropped between them.
    max_trace_events: int = 200
    # Queued jobs across all pools beyond which new requests are refused.
    max_queued: int = 10_000
