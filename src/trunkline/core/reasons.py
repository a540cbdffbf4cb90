"""Why a request was turned away, worded for whoever asked.

Each reason names the pool, the cause and the fix or the numbers that show it
(STYLE 12); the scheduler puts them in the ended job's `reason`.
"""

from __future__ import annotations

from trunkline.core.entities import Job
from trunkline.core.pool import Pool


def no_capacity(pool: Pool, job: Job, now: float) -> str:
    """The job waited its max wait (or could not wait) and got no slot."""
    since = job.queued_since
    waited = job.queue_wait_s + (now - since if since is not None else 0.0)
    if pool.quota_full():
        cause = f"pool '{pool.name}' is at its quota of {pool.config.max_concurrent_jobs} jobs"
    elif not pool.workers:
        cause = f"pool '{pool.name}' has no worker registered"
    else:
        cause = f"pool '{pool.name}' has no worker with a free slot ({len(pool.workers)} workers)"
    others = pool.queued - (1 if job.queued_since is not None else 0)
    return (
        f"{cause}; {others} other jobs queued; waited {waited:.2f} s, max wait {job.max_wait_s:g} s"
    )


def queue_full(pool: Pool, queued_total: int, max_total: int) -> str:
    """Why a new request may not join `pool`'s queue ("" if it may)."""
    limit = pool.config.max_queued
    if pool.queued >= limit:
        return (
            f"pool '{pool.name}' has {pool.queued} jobs queued, its limit "
            f"(max_queued = {limit}); retry later, or raise the pool's max_queued"
        )
    if queued_total >= max_total:
        return (
            f"the server has {queued_total} jobs queued, its limit "
            f"([server] max_queued = {max_total}); retry later, or raise it"
        )
    return ""
