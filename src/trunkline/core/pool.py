"""A pool: the workers of one agent name, their placement index and the queue.

Placement index: `buckets[k]` holds the workers that may take an offer now and
have exactly k free slots (insertion-ordered dicts used as ordered sets); only
non-empty buckets exist, and `bucket_keys` lists their k in ascending order. A
worker is re-filed whenever its free slots or its eligibility change, so
picking a worker is a walk over the distinct free-slot counts present (a
handful in a real pool), not over every worker nor every possible slot: a
worker declaring 20,000,000 slots costs one dict entry, not a list of 20
million buckets. `pack` walks up from the smallest k (fullest that fits),
`spread` walks down. Ties break by the order workers entered the bucket, which
depends only on the event sequence: deterministic.

Route (a rollout, core/rollout.py): workers may carry a group (their replica's
version, `groups`); with `route_group` set, a job whose id hashes below
`route_share` (`share_point`) prefers workers of that group and any other job
prefers the rest. A preference only orders the eligible workers: with none on
its side, a job goes to any other that fits, so a route never queues or
refuses a job that a pool without one would have placed.

Eligibility: connected, not draining, last status not FULL, load below the
threshold, not benched after a soft refusal, not suspended for silence.
"""

from __future__ import annotations

import hashlib
from bisect import insort
from collections import deque

from trunkline.core.config import Placement, PoolConfig
from trunkline.core.entities import Job, Worker, WorkerStatus

# How long `Pool.refusals` remembers a refusal: longer than any sane window.
REFUSAL_MEMORY_S = 300.0


def share_point(job_id: str) -> float:
    """Where a job falls in [0, 1) for a route's share: a stable hash of its id,
    so a job keeps its side when re-placed and shares are binomial."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Pool:
    __slots__ = (
        "active",
        "bucket_keys",
        "buckets",
        "config",
        "groups",
        "name",
        "orphaned",
        "queue",
        "queued",
        "refusals",
        "route_group",
        "route_share",
        "workers",
    )

    def __init__(self, config: PoolConfig) -> None:
        self.config = config  # replaced on a reload, always for the same agent name
        self.name = config.agent_name
        self.workers: dict[str, Worker] = {}
        self.buckets: dict[int, dict[Worker, None]] = {}  # free slots -> workers (non-empty)
        self.bucket_keys: list[int] = []  # the keys of `buckets`, ascending
        self.queue: deque[Job] = deque()  # may hold stale (no longer queued) jobs
        self.queued = 0  # jobs really waiting in `queue`
        self.active = 0  # jobs in an ACTIVE state: what the quota counts
        self.orphaned = 0  # jobs waiting for their lost worker to come back
        # When demand was turned away (jobs ended no_capacity), oldest first:
        # the autoscaler counts recent ones as demand.
        self.refusals: deque[float] = deque()
        self.groups: dict[str, str] = {}  # worker id -> group (its version)
        self.route_group: str | None = None  # None: no preference
        self.route_share = 1.0

    def eligible(self, w: Worker) -> bool:
        return (
            not w.draining
            and w.status is WorkerStatus.AVAILABLE
            and w.load < self.config.load_threshold
            and not w.suspended
            and w.cooldown_until is None
        )

    def refile(self, w: Worker) -> None:
        """Move `w` to the bucket matching its free slots and eligibility."""
        key = w.free if self.eligible(w) else 0
        if key < 0:
            key = 0
        if key == w.bucket:
            return
        if w.bucket:
            self._take_out(w)
        if key:
            bucket = self.buckets.get(key)
            if bucket is None:
                self.buckets[key] = {w: None}
                insort(self.bucket_keys, key)
            else:
                bucket[w] = None
        w.bucket = key

    def unfile(self, w: Worker) -> None:
        if w.bucket:
            self._take_out(w)
            w.bucket = 0

    def _take_out(self, w: Worker) -> None:
        bucket = self.buckets[w.bucket]
        del bucket[w]
        if not bucket:
            del self.buckets[w.bucket]
            self.bucket_keys.remove(w.bucket)

    def quota_full(self) -> bool:
        cap = self.config.max_concurrent_jobs
        return cap is not None and self.active >= cap

    def pick(self, job: Job) -> Worker | None:
        """The worker the placement policy chooses for `job`, or None.

        Workers that refused this job (or let its offer time out) are passed
        over; one of them is chosen only when no other worker fits and its
        state has changed since (its version moved on).
        """
        keys = self.bucket_keys
        if not keys:
            return None
        if self.route_group is not None:
            return self._pick_routed(job, self.route_group)
        buckets = self.buckets
        refused = job.refused
        if refused is None:
            k = keys[0] if self.config.placement is Placement.PACK else keys[-1]
            return next(iter(buckets[k]))
        order = keys if self.config.placement is Placement.PACK else reversed(keys)
        fallback: Worker | None = None
        for k in order:
            for w in buckets[k]:
                v = refused.get(w.id)
                if v is None:
                    return w
                if fallback is None and v != w.version:
                    fallback = w
        return fallback

    def _pick_routed(self, job: Job, group: str) -> Worker | None:
        """`pick` with a route: the placement order within the job's side
        first, then the other side, then (as `pick`) a worker that refused it
        and changed since."""
        want = share_point(job.id) < self.route_share
        keys = self.bucket_keys
        order = keys if self.config.placement is Placement.PACK else reversed(keys)
        groups = self.groups
        refused = job.refused or {}
        other: Worker | None = None
        fallback: Worker | None = None
        for k in order:
            for w in self.buckets[k]:
                v = refused.get(w.id)
                if v is not None:
                    if fallback is None and v != w.version:
                        fallback = w
                elif (groups.get(w.id) == group) is want:
                    return w
                elif other is None:
                    other = w
        return other or fallback

    def note_refusal(self, now: float) -> None:
        """Remember that demand was turned away at `now` (kept `REFUSAL_MEMORY_S`)."""
        refusals = self.refusals
        refusals.append(now)
        cutoff = now - REFUSAL_MEMORY_S
        while refusals[0] < cutoff:
            refusals.popleft()

    def recently_refused(self, now: float, window_s: float) -> int:
        """Refusals in the last `window_s` seconds (at most `REFUSAL_MEMORY_S`)."""
        cutoff = now - window_s
        n = 0
        for t in reversed(self.refusals):
            if t < cutoff:
                break
            n += 1
        return n

    def free_slots(self) -> int:
        """Slots offerable right now, summed over eligible workers."""
        return sum(k * len(b) for k, b in self.buckets.items())
