"""A pool's demand in slots, as the autoscale policy reads it.

Theory of operation: every caller is counted once, in the one place it is
now. A job holding a slot is `running` (running, orphaned, terminating) or
`reserved` (offered and unanswered, or accepted and not yet running); a job
waiting is `queued`; a caller turned away for lack of capacity (its job ended
`no_capacity`) within the window is `refused`. A soft refusal by a worker is
not a caller turned away: that job is re-placed or queued, so it is already
counted there (counting the refusal too is how a 13-call burst at cap 4 used
to ask for 5 replicas).
"""

from __future__ import annotations

from trunkline.core.autoscale import Demand
from trunkline.core.pool import Pool
from trunkline.core.states import JobState


def pool_demand(pool: Pool | None, now: float, refused_window_s: float) -> Demand:
    """The demand of `pool` at `now` (an empty Demand for an unknown pool)."""
    if pool is None:
        return Demand()
    reserved = 0
    for w in pool.workers.values():
        reserved += len(w.offers)
        for job in w.jobs.values():
            if job.state is JobState.ASSIGNED:
                reserved += 1
    return Demand(
        running=pool.active - reserved,
        reserved=reserved,
        queued=pool.queued,
        refused=pool.recently_refused(now, refused_window_s),
    )
