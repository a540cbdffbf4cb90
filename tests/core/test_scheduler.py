"""The dispatch contract (DESIGN.md, "Dispatch semantics" 1-8), one test per line and edge.

Plain synchronous tests: the clock is a float the test moves by hand, and
`Scheduler.advance(now)` runs whatever timers are due.
"""

from __future__ import annotations

import pytest

from trunkline.core import (
    AcceptInfo,
    Action,
    DuplicateJob,
    IllegalTransition,
    JobEnded,
    JobRunning,
    JobState,
    Placement,
    PoolConfig,
    Scheduler,
    SendAssignment,
    SendOffer,
    SendTermination,
    UnknownWorker,
)
from trunkline.core.pool import Pool
from trunkline.core.states import check_transition

S = JobState
AGENT = "support"


class Bench:
    """A scheduler, a fake clock and every action it has produced so far."""

    def __init__(self, **pool: object) -> None:
        self.cfg = PoolConfig(agent_name=AGENT, **pool)  # type: ignore[arg-type]
        self.s = Scheduler([self.cfg])
        self.now = 100.0
        self.log: list[Action] = []

    def take(self) -> list[Action]:
        actions = self.s.take_actions()
        self.log += actions
        return actions

    def at(self, now: float) -> list[Action]:
        """Move the clock to `now` and run due timers."""
        assert now >= self.now
        self.now = now
        self.s.advance(now)
        return self.take()

    def tick(self, dt: float) -> list[Action]:
        return self.at(self.now + dt)

    def join(self, wid: str, max_jobs: int | None = None) -> list[Action]:
        self.s.worker_joined(self.now, wid, AGENT, max_jobs)
        return self.take()

    def request(self, jid: str, max_wait_s: float | None = None) -> list[Action]:
        self.s.request(self.now, jid, AGENT, max_wait_s=max_wait_s)
        return self.take()

    def answer(
        self, wid: str, jid: str, *, available: bool, terminate: bool = False
    ) -> list[Action]:
        self.s.answer(self.now, wid, jid, available=available, terminate=terminate)
        return self.take()

    def accept(self, wid: str, jid: str) -> list[Action]:
        return self.answer(wid, jid, available=True)

    def status(self, wid: str, jid: str, state: JobState, error: str = "") -> list[Action]:
        self.s.job_status(self.now, wid, jid, state, error)
        return self.take()

    def run(self, wid: str, jid: str) -> list[Action]:
        """Accept the offer and report the job running."""
        return self.accept(wid, jid) + self.status(wid, jid, S.RUNNING)

    def report(self, wid: str, **kw: object) -> list[Action]:
        kw.setdefault("available", True)
        self.s.worker_status(self.now, wid, **kw)  # type: ignore[arg-type]
        return self.take()

    def used(self, wid: str) -> int:
        return self.s.workers[wid].used

    @property
    def pool(self) -> Pool:
        return self.s.pools[AGENT]

    def ended(self) -> dict[str, list[JobState]]:
        out: dict[str, list[JobState]] = {}
        for a in self.log:
            if isinstance(a, JobEnded):
                out.setdefault(a.job.id, []).append(a.job.state)
        return out

    def assert_idle(self) -> None:
        """No live job and both pool counters back at zero."""
        assert self.s.jobs == {}
        assert self.pool.queued == 0
        assert self.pool.active == 0


def offers(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.worker_id, a.job.id) for a in actions if isinstance(a, SendOffer)]


def assignments(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.worker_id, a.job.id) for a in actions if isinstance(a, SendAssignment)]


def terminations(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.worker_id, a.job_id) for a in actions if isinstance(a, SendTermination)]


def ends(actions: list[Action]) -> dict[str, JobState]:
    return {a.job.id: a.job.state for a in actions if isinstance(a, JobEnded)}


def events(b: Bench, jid: str) -> list[str]:
    job = b.s.jobs.get(jid)
    if job is None:
        job = next(a.job for a in b.log if isinstance(a, JobEnded) and a.job.id == jid)
    return [t.event for t in job.trace]


# ------------------------------------------------------------------ 1. slots


def test_unanswered_offers_take_slots() -> None:
    """Offers not yet answered count as used: a third request on a 2-slot worker queues."""
    b = Bench(max_jobs_per_worker=2)
    b.join("w1")
    assert offers(b.request("j1") + b.request("j2")) == [("w1", "j1"), ("w1", "j2")]
    assert b.used("w1") == 2
    assert offers(b.request("j3")) == []
    assert b.s.jobs["j3"].state is S.QUEUED


def test_accepted_not_running_jobs_take_slots() -> None:
    """Accepted jobs hold their slot before JS_RUNNING; only a job end frees it."""
    b = Bench(max_jobs_per_worker=2)
    b.join("w1")
    b.request("j1")
    b.request("j2")
    b.request("j3")
    assert assignments(b.accept("w1", "j1") + b.accept("w1", "j2")) == [
        ("w1", "j1"),
        ("w1", "j2"),
    ]
    assert b.s.jobs["j1"].state is S.ASSIGNED
    assert b.used("w1") == 2
    assert offers(b.status("w1", "j1", S.RUNNING)) == []
    assert offers(b.status("w1", "j1", S.SUCCEEDED)) == [("w1", "j3")]


def test_burst_of_13_on_capacity_4_offers_4_and_queues_9() -> None:
    """13 simultaneous requests on one 4-slot worker: exactly 4 offers, 9 queued, FIFO as
    jobs end, never more than 4 slots used, all 13 succeed."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    sent: list[tuple[str, str]] = []
    for i in range(13):
        sent += offers(b.request(f"j{i:02d}"))
    assert sent == [("w1", f"j{i:02d}") for i in range(4)]
    assert b.pool.queued == 9
    assert b.pool.active == 4
    running = [jid for _, jid in sent]
    for jid in running:
        b.run("w1", jid)
    order: list[str] = []
    while running:
        jid = running.pop(0)
        order.append(jid)
        b.tick(1.0)
        new = offers(b.status("w1", jid, S.SUCCEEDED))
        assert len(new) <= 1
        for _, nxt in new:
            b.run("w1", nxt)
            running.append(nxt)
        assert b.used("w1") <= 4
    assert order == [f"j{i:02d}" for i in range(13)]
    assert b.ended() == {f"j{i:02d}": [S.SUCCEEDED] for i in range(13)}
    b.assert_idle()


def test_direct_placement_keeps_queue_counter_at_zero() -> None:
    """A request placed at once never counts as queued, so the next one is placed at once too."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.request("j1")
    assert b.pool.queued == 0
    assert offers(b.request("j2")) == [("w1", "j2")]


def test_unknown_capacity_allows_one_outstanding_offer() -> None:
    """No declared cap and no pool cap: one unanswered offer at a time; the worker's own
    status decides the rest."""
    b = Bench()
    b.join("w1")
    assert b.s.workers["w1"].capacity is None
    assert offers(b.request("j1") + b.request("j2") + b.request("j3")) == [("w1", "j1")]
    assert offers(b.accept("w1", "j1")) == [("w1", "j2")]
    assert offers(b.report("w1", available=False)) == []
    assert offers(b.accept("w1", "j2")) == []
    assert offers(b.report("w1", available=True)) == [("w1", "j3")]


@pytest.mark.parametrize(
    ("declared", "pool_cap", "expected"),
    [(8, 4, 4), (2, 4, 2), (3, None, 3), (None, 5, 5), (None, None, None)],
)
def test_capacity_is_min_of_declared_and_pool_cap(
    declared: int | None, pool_cap: int | None, expected: int | None
) -> None:
    """A worker's capacity is the smaller of its declared max_jobs and the pool's cap."""
    b = Bench(max_jobs_per_worker=pool_cap)
    b.join("w1", max_jobs=declared)
    assert b.s.workers["w1"].capacity == expected
    for i in range(10):
        b.request(f"j{i}")
    assert b.used("w1") == (expected if expected is not None else 1)


@pytest.mark.parametrize(
    "report",
    [
        {"available": False},
        {"available": True, "load": 1.0},
        {"available": True, "load": 0.95},
        {"available": False, "load": 0.0, "draining": True},
    ],
    ids=["ws_full", "load_at_threshold", "load_above_threshold", "draining"],
)
def test_full_loaded_or_draining_worker_gets_no_offer(report: dict[str, object]) -> None:
    """A worker reporting WS_FULL, load >= threshold, or draining is passed over."""
    b = Bench(max_jobs_per_worker=4, load_threshold=0.9)
    b.join("w1")
    b.report("w1", **report)
    assert offers(b.request("j1")) == []
    assert b.s.jobs["j1"].state is S.QUEUED


def test_recovered_worker_takes_the_queue() -> None:
    """A worker that reports WS_AVAILABLE again is offered the queued jobs at once."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.report("w1", available=False)
    b.request("j1")
    assert offers(b.report("w1", available=True, load=0.2)) == [("w1", "j1")]


def test_draining_is_sticky() -> None:
    """Once draining (by report or by the server), later AVAILABLE reports do not undo it."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.join("w2")
    b.s.drain_worker(b.now, "w1")
    b.report("w2", draining=True)
    b.report("w1", available=True)
    b.report("w2", available=True)
    assert offers(b.request("j1")) == []


# -------------------------------------------------------------- 2. placement


def _fill(b: Bench) -> None:
    """w1 has 2 of 4 slots used, w2 has 1, w3 has 0 (pack order of joining)."""
    for wid in ("w1", "w2", "w3"):
        b.join(wid)
    b.report("w2", available=False)
    b.report("w3", available=False)
    b.request("a")
    b.request("b")
    b.report("w1", available=False)
    b.report("w2", available=True)
    b.request("c")
    b.report("w1", available=True)
    b.report("w3", available=True)
    assert (b.used("w1"), b.used("w2"), b.used("w3")) == (2, 1, 0)


def test_pack_picks_the_fullest_worker_that_fits() -> None:
    """`pack` offers to the worker with the fewest free slots that still has one."""
    b = Bench(max_jobs_per_worker=4, placement=Placement.PACK)
    _fill(b)
    assert offers(b.request("d")) == [("w1", "d")]


def test_spread_picks_the_emptiest_worker() -> None:
    """`spread` offers to the worker with the most free slots."""
    b = Bench(max_jobs_per_worker=4, placement=Placement.SPREAD)
    _fill(b)
    assert offers(b.request("d")) == [("w3", "d")]


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        (Placement.PACK, ["w1", "w1", "w1", "w2", "w2", "w2", "w3"]),
        (Placement.SPREAD, ["w1", "w2", "w3", "w1", "w2", "w3", "w1"]),
    ],
)
def test_ties_break_deterministically(placement: Placement, expected: list[str]) -> None:
    """Equal candidates are chosen in a fixed order that depends only on the event sequence."""
    runs = []
    for _ in range(2):
        b = Bench(max_jobs_per_worker=3, placement=placement)
        for wid in ("w1", "w2", "w3"):
            b.join(wid)
        runs.append([w for i in range(7) for w, _ in offers(b.request(f"j{i}"))])
    assert runs[0] == runs[1] == expected


# ----------------------------------------------------------------- 3. reject


def test_hard_reject_ends_the_job_rejected() -> None:
    """terminate=true ends the job `rejected` with a reason naming the worker, freeing the slot."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    b.request("j2")
    b.request("j3")
    actions = b.answer("w1", "j1", available=False, terminate=True)
    assert ends(actions) == {"j1": S.REJECTED}
    job = actions[0].job if isinstance(actions[0], JobEnded) else None
    assert job is not None
    assert "w1" in job.reason
    assert "terminate=true" in job.reason
    assert offers(actions) == [("w1", "j3")]
    assert b.ended() == {"j1": [S.REJECTED]}


def test_soft_refusal_replaces_on_another_worker_first() -> None:
    """terminate=false re-offers the job at once to a worker that has not refused it."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.join("w2")
    assert offers(b.request("j1")) == [("w1", "j1")]
    assert offers(b.answer("w1", "j1", available=False)) == [("w2", "j1")]
    assert events(b, "j1") == ["requested", "offered", "refused", "offered"]


def test_soft_refusal_prefers_non_refusers_over_changed_refusers() -> None:
    """A refuser whose state changed is still passed over while a non-refuser has a slot."""
    b = Bench(max_jobs_per_worker=4, placement=Placement.PACK)
    for wid in ("w1", "w2", "w3"):
        b.join(wid)
    b.request("j1")
    b.answer("w1", "j1", available=False)  # -> w2
    b.report("w1")  # w1's state changed, and pack would rank it first
    assert offers(b.answer("w2", "j1", available=False)) == [("w3", "j1")]


def test_refuser_is_benched_until_a_status_report() -> None:
    """After a soft refusal the worker gets no offers (not this job, not others) until it
    reports status; then the job returns to it."""
    b = Bench(max_jobs_per_worker=4, refusal_backoff_s=5.0)
    b.join("w1")
    b.request("j1")
    assert offers(b.answer("w1", "j1", available=False)) == []
    assert b.s.jobs["j1"].state is S.QUEUED
    assert offers(b.request("j2")) == []
    assert offers(b.tick(1.0)) == []
    assert offers(b.report("w1")) == [("w1", "j1"), ("w1", "j2")]


def test_refuser_is_unbenched_by_one_of_its_jobs_ending() -> None:
    """A job ending on the refusing worker changes its state: the refused job may return."""
    b = Bench(max_jobs_per_worker=4, refusal_backoff_s=5.0)
    b.join("w1")
    b.request("j0")
    b.run("w1", "j0")
    b.request("j1")
    assert offers(b.answer("w1", "j1", available=False)) == []
    assert offers(b.status("w1", "j0", S.SUCCEEDED)) == [("w1", "j1")]


def test_refuser_is_unbenched_by_the_backoff_timer() -> None:
    """With no other change, the refusal backoff alone puts the worker back in play."""
    b = Bench(max_jobs_per_worker=4, refusal_backoff_s=2.0)
    b.join("w1")
    b.request("j1")
    b.answer("w1", "j1", available=False)
    assert b.s.next_deadline() == pytest.approx(b.now + 2.0)
    assert offers(b.tick(1.999)) == []
    assert offers(b.tick(0.001)) == [("w1", "j1")]


def test_soft_refused_job_goes_to_the_front_of_the_queue() -> None:
    """A refused job that cannot be re-placed waits ahead of jobs queued before it."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.request("j2")
    b.answer("w1", "j1", available=False)
    assert offers(b.report("w1")) == [("w1", "j1")]


def test_refusal_outcomes_are_traced() -> None:
    """Every offer and answer a job went through is in its trace, with the worker."""
    b = Bench(max_jobs_per_worker=4, refusal_backoff_s=1.0)
    b.join("w1")
    b.request("j1")
    b.answer("w1", "j1", available=False)
    b.tick(1.0)
    b.run("w1", "j1")
    trace = b.s.jobs["j1"].trace
    assert [(t.event, t.worker_id) for t in trace] == [
        ("requested", None),
        ("offered", "w1"),
        ("refused", "w1"),
        ("queued", None),
        ("offered", "w1"),
        ("accepted", "w1"),
        ("running", "w1"),
    ]


# ---------------------------------------------------------------- 4. silence


def test_offer_timeout_withdraws_replaces_and_strikes() -> None:
    """An unanswered offer is withdrawn after the availability timeout, the job is offered
    elsewhere, and the silent worker takes a strike."""
    b = Bench(max_jobs_per_worker=4, availability_timeout_s=3.0)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    assert offers(b.tick(2.9)) == []
    assert offers(b.tick(0.1)) == [("w2", "j1")]
    w1 = b.s.workers["w1"]
    assert w1.strikes == 1
    assert w1.used == 0
    assert "offer_timeout" in events(b, "j1")


def test_late_accept_gets_no_assignment() -> None:
    """An accept after the offer was withdrawn sends nothing and leaves the job where it is."""
    b = Bench(max_jobs_per_worker=4, availability_timeout_s=3.0)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    b.tick(3.0)
    assert b.accept("w1", "j1") == []
    job = b.s.jobs["j1"]
    assert (job.state, job.worker_id) == (S.OFFERED, "w2")
    assert b.used("w1") == 0
    assert events(b, "j1")[-1] == "late_answer_ignored"


def test_silent_worker_is_re_offered_only_after_its_state_changes() -> None:
    """A lone silent worker gets the job back after the backoff, not at once."""
    b = Bench(max_jobs_per_worker=4, availability_timeout_s=3.0, refusal_backoff_s=1.0)
    b.join("w1")
    b.request("j1")
    assert offers(b.tick(3.0)) == []
    assert offers(b.tick(1.0)) == [("w1", "j1")]


def test_repeated_strikes_suspend_until_an_answer() -> None:
    """After max_strikes unanswered offers a worker gets nothing, not even after backoffs or
    status reports, until it answers again (here: a late answer), which puts it back at once."""
    b = Bench(
        max_jobs_per_worker=4,
        availability_timeout_s=3.0,
        refusal_backoff_s=1.0,
        max_strikes=2,
        queue_max_wait_s=100.0,
    )
    b.join("w1")
    b.request("j1")
    b.tick(3.0)  # strike 1
    assert offers(b.tick(1.0)) == [("w1", "j1")]
    b.tick(3.0)  # strike 2: suspended
    assert b.s.workers["w1"].suspended
    assert offers(b.tick(10.0)) == []
    assert offers(b.report("w1")) == []
    assert offers(b.answer("w1", "j1", available=False)) == [("w1", "j1")]
    assert b.s.workers["w1"].strikes == 0


def test_an_answer_resets_strikes() -> None:
    """Strikes count consecutive silences: one answer in between starts the count over."""
    b = Bench(max_jobs_per_worker=4, availability_timeout_s=3.0, max_strikes=2)
    b.join("w1")
    b.request("j1")
    b.tick(3.0)
    b.tick(1.0)  # backoff over: j1 offered again
    b.accept("w1", "j1")
    b.request("j2")
    b.tick(3.0)
    assert not b.s.workers["w1"].suspended


# ------------------------------------------------------------------ 5. queue


def test_queue_is_fifo() -> None:
    """Queued jobs are offered in request order as slots free."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    for i in range(5):
        b.request(f"j{i}")
    order = []
    for i in range(5):
        jid = f"j{i}"
        order.append(jid)
        b.run("w1", jid)
        b.status("w1", jid, S.SUCCEEDED)
    assert order == [jid for _, jid in offers(b.log)]


def test_worker_join_drains_the_queue() -> None:
    """A worker joining takes queued jobs up to its capacity, oldest first."""
    b = Bench(max_jobs_per_worker=2)
    for i in range(3):
        b.request(f"j{i}")
    assert offers(b.join("w1")) == [("w1", "j0"), ("w1", "j1")]
    assert b.pool.queued == 1


def test_queue_deadline_ends_no_capacity_with_a_reason() -> None:
    """A job that waits past its max wait ends `no_capacity`; the reason names the pool, the
    cause and how long it waited."""
    b = Bench(max_jobs_per_worker=1)
    b.now = 0.0  # a clock that starts at zero must still report the wait
    b.join("w1")
    b.request("j0")
    b.run("w1", "j0")
    b.request("j1", max_wait_s=5.0)
    assert ends(b.at(4.99)) == {}
    actions = b.at(5.0)
    assert ends(actions) == {"j1": S.NO_CAPACITY}
    reason = next(a.job.reason for a in actions if isinstance(a, JobEnded))
    assert "pool 'support'" in reason
    assert "no worker with a free slot" in reason
    assert "waited 5.00 s" in reason
    assert "max wait 5 s" in reason
    assert b.pool.queued == 0


def test_no_worker_at_all_is_named_in_the_reason() -> None:
    """With no worker registered the no_capacity reason says so."""
    b = Bench()
    b.request("j1", max_wait_s=1.0)
    actions = b.tick(1.0)
    job = next(a.job for a in actions if isinstance(a, JobEnded))
    assert "has no worker registered" in job.reason


def test_max_wait_zero_decides_at_once() -> None:
    """max_wait_s=0 with no free slot ends the job `no_capacity` inside the request call."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j0")
    actions = b.request("j1", max_wait_s=0)
    assert ends(actions) == {"j1": S.NO_CAPACITY}
    assert b.pool.queued == 0
    assert "j1" not in b.s.jobs


def test_max_wait_zero_is_placed_when_a_slot_is_free() -> None:
    """max_wait_s=0 only refuses waiting: a free slot still gets the job."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    assert offers(b.request("j0", max_wait_s=0)) == [("w1", "j0")]


def test_default_max_wait_comes_from_the_pool() -> None:
    """Without max_wait_s the pool's queue_max_wait_s applies."""
    b = Bench(queue_max_wait_s=7.0)
    b.request("j1")
    assert ends(b.tick(6.9)) == {}
    assert ends(b.tick(0.1)) == {"j1": S.NO_CAPACITY}


def test_refused_job_past_its_deadline_ends_no_capacity() -> None:
    """A job whose deadline passed while it was offered ends at once if the refusal leaves
    it nowhere to go."""
    b = Bench(max_jobs_per_worker=1, availability_timeout_s=3.0)
    b.join("w1")
    b.request("j1", max_wait_s=1.0)
    b.tick(2.0)
    assert ends(b.answer("w1", "j1", available=False)) == {"j1": S.NO_CAPACITY}


# ------------------------------------------------------------------ 6. quota


def test_pool_quota_caps_concurrent_jobs() -> None:
    """max_concurrent_jobs holds the pool below the ceiling even with free worker slots."""
    b = Bench(max_jobs_per_worker=4, max_concurrent_jobs=3, queue_max_wait_s=5.0)
    b.join("w1")
    b.join("w2")
    sent = []
    for i in range(5):
        sent += offers(b.request(f"j{i}"))
    assert len(sent) == 3
    assert b.pool.queued == 2
    assert b.s.jobs["j3"].trace[-1].detail == "pool quota reached"
    b.run("w1", "j0")
    assert offers(b.status("w1", "j0", S.FAILED, "boom")) == [("w1", "j3")]
    actions = b.tick(5.0)
    reason = next(a.job.reason for a in actions if isinstance(a, JobEnded))
    assert "quota of 3 jobs" in reason


def test_quota_counts_orphaned_jobs() -> None:
    """A job waiting for its worker to reconnect still counts against the quota."""
    b = Bench(max_jobs_per_worker=4, max_concurrent_jobs=1)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.worker_left(b.now, "w1")
    b.join("w2")
    assert offers(b.request("j2")) == []


# ------------------------------------------------------------------- 7. loss


def test_worker_loss_orphans_and_migrate_resumes_on_the_new_connection() -> None:
    """A running job of a lost worker is ORPHANED; a migrate within the grace makes it RUNNING
    on the new connection, and the grace timer then does nothing."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=10.0)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.worker_left(b.now, "w1")
    assert b.s.jobs["j1"].state is S.ORPHANED
    b.tick(5.0)
    b.join("w1b")
    b.s.migrate(b.now, "w1b", ["j1"])
    assert b.take() == []
    job = b.s.jobs["j1"]
    assert (job.state, job.worker_id) == (S.RUNNING, "w1b")
    assert b.used("w1b") == 1
    assert ends(b.tick(20.0)) == {}
    assert ends(b.status("w1b", "j1", S.SUCCEEDED)) == {"j1": S.SUCCEEDED}
    b.assert_idle()


def test_grace_expiry_ends_worker_lost() -> None:
    """Without a migrate in time the job ends `worker_lost`, with the grace in the reason."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=10.0)
    b.join("w1")
    b.request("j1")
    b.accept("w1", "j1")  # ASSIGNED, not yet running: lost too
    b.s.worker_left(b.now, "w1")
    assert ends(b.tick(9.9)) == {}
    actions = b.tick(0.1)
    assert ends(actions) == {"j1": S.WORKER_LOST}
    job = next(a.job for a in actions if isinstance(a, JobEnded))
    assert "10 s" in job.reason
    b.assert_idle()


def test_grace_expiry_redispatches_when_configured() -> None:
    """With redispatch_on_worker_loss the orphan is offered to another worker after the grace."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=10.0, redispatch_on_worker_loss=True)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    b.run("w1", "j1")
    b.s.worker_left(b.now, "w1")
    assert offers(b.tick(10.0)) == [("w2", "j1")]
    assert "redispatched" in events(b, "j1")
    b.run("w2", "j1")
    b.status("w2", "j1", S.SUCCEEDED)
    b.assert_idle()


def test_redispatch_still_prefers_workers_that_did_not_refuse() -> None:
    """A re-dispatched job keeps its refusal history: a worker that refused it earlier gets
    it only if no other worker can take it, even if `pack` would rank it first."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=1.0, redispatch_on_worker_loss=True)
    for wid in ("w1", "w2", "w3"):
        b.join(wid)
    b.request("filler")
    b.run("w1", "filler")  # w1 is the fullest: pack ranks it first
    b.request("j1")
    b.answer("w1", "j1", available=False)  # -> w2
    b.run("w2", "j1")
    b.report("w1")  # w1 is off the bench
    b.s.worker_left(b.now, "w2")
    assert offers(b.tick(1.0)) == [("w3", "j1")]


def test_zero_grace_decides_at_disconnect() -> None:
    """reconnect_grace_s=0 ends (or re-dispatches) the orphan inside worker_left."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=0.0)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.worker_left(b.now, "w1")
    assert ends(b.take() + b.log) == {"j1": S.WORKER_LOST}


def test_lost_worker_offers_are_replaced_at_once() -> None:
    """Unanswered offers of a disconnected worker go to another worker immediately."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    b.s.worker_left(b.now, "w1")
    assert offers(b.take()) == [("w2", "j1")]


def test_migrate_of_ended_or_elsewhere_job_is_terminated() -> None:
    """A migrate naming a job known to have ended, or live on another worker, gets a
    termination, so it never runs twice."""
    b = Bench(max_jobs_per_worker=4, reconnect_grace_s=1.0, redispatch_on_worker_loss=True)
    b.join("w1")
    b.join("w2")
    b.request("done")
    b.run("w1", "done")
    b.status("w1", "done", S.SUCCEEDED)
    b.request("moved")
    b.run("w1", "moved")
    b.s.worker_left(b.now, "w1")
    b.tick(1.0)  # grace over: "moved" goes to w2
    b.run("w2", "moved")
    b.join("w1b")
    b.s.migrate(b.now, "w1b", ["done", "moved"], ended={"done"})
    assert terminations(b.take()) == [("w1b", "done"), ("w1b", "moved")]
    assert b.s.jobs["moved"].worker_id == "w2"
    assert b.used("w1b") == 0


def test_migrate_of_a_job_never_seen_adopts_it() -> None:
    """After a server restart a worker's live jobs are unknown: they are adopted as running
    on it (slot counted, end recorded) instead of being cut off."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.s.migrate(b.now, "w1", ["from-before-restart"])
    assert terminations(b.take()) == []
    job = b.s.jobs["from-before-restart"]
    assert job.state is S.RUNNING
    assert job.worker_id == "w1"
    assert b.used("w1") == 1
    assert "adopted" in events(b, "from-before-restart")
    assert ends(b.status("w1", "from-before-restart", S.SUCCEEDED)) == {
        "from-before-restart": S.SUCCEEDED
    }
    assert b.s.pools[AGENT].active == 0


def test_reconnecting_worker_gets_no_offer_before_its_migrate() -> None:
    """A worker that joins while the pool has orphaned jobs gets no offer until it migrates
    (or reports status): offering first could overfill it once its jobs re-attach."""
    b = Bench(max_jobs_per_worker=2, reconnect_grace_s=5.0)
    b.join("w1")
    b.request("a")
    b.run("w1", "a")
    b.request("b")
    b.run("w1", "b")
    b.s.worker_left(b.now, "w1")
    b.request("c")  # queued: nobody has a free slot
    assert b.join("w1b") == []  # no offer to the newcomer yet
    b.s.migrate(b.now, "w1b", ["a", "b"])
    assert offers(b.take()) == []  # its two jobs came back: it is full
    assert b.used("w1b") == 2
    assert offers(b.status("w1b", "a", S.SUCCEEDED)) == [("w1b", "c")]


def test_joining_worker_is_offered_at_once_when_nothing_is_orphaned() -> None:
    """With no orphaned jobs in the pool, a new worker takes queued jobs the moment it joins."""
    b = Bench(max_jobs_per_worker=2)
    b.request("c")
    assert offers(b.join("w1")) == [("w1", "c")]


def test_migrate_of_a_job_already_on_the_worker_is_a_no_op() -> None:
    """Repeating a migrate for a job the worker already holds changes nothing."""
    b = Bench(max_jobs_per_worker=4)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.migrate(b.now, "w1", ["j1"])
    assert b.take() == []
    assert b.s.jobs["j1"].state is S.RUNNING


# ----------------------------------------------------------------- cancel


def test_cancel_queued_job() -> None:
    """Cancelling a queued job ends it `cancelled` at once and it leaves the queue counter."""
    b = Bench()
    b.request("j1")
    assert b.s.cancel(b.now, "j1", "caller hung up")
    assert ends(b.take()) == {"j1": S.CANCELLED}
    b.assert_idle()
    b.join("w1")
    assert offers(b.take()) == []


def test_cancel_offered_job_frees_the_slot_and_ignores_a_late_accept() -> None:
    """Cancelling an offered job ends it, frees the slot for the queue, and a later accept
    gets no assignment."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.request("j2")
    b.s.cancel(b.now, "j1")
    actions = b.take()
    assert ends(actions) == {"j1": S.CANCELLED}
    assert offers(actions) == [("w1", "j2")]
    assert assignments(b.accept("w1", "j1")) == []


@pytest.mark.parametrize("running", [False, True], ids=["assigned", "running"])
def test_cancel_placed_job_keeps_the_slot_until_the_worker_confirms(running: bool) -> None:
    """Cancelling an assigned or running job sends a termination; the slot stays used until
    the worker reports the job's end, which ends it `cancelled` with the cancel reason."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.accept("w1", "j1")
    if running:
        b.status("w1", "j1", S.RUNNING)
    b.request("j2")
    b.s.cancel(b.now, "j1", "DELETE /v1/jobs/j1")
    actions = b.take()
    assert terminations(actions) == [("w1", "j1")]
    assert b.s.jobs["j1"].state is S.TERMINATING
    assert offers(actions) == []
    assert b.used("w1") == 1
    assert b.s.cancel(b.now, "j1")  # repeated: still live, nothing new
    assert b.take() == []
    b.status("w1", "j1", S.RUNNING)  # a stale running report changes nothing
    actions = b.status("w1", "j1", S.SUCCEEDED)
    assert ends(actions) == {"j1": S.CANCELLED}
    assert offers(actions) == [("w1", "j2")]
    assert b.ended()["j1"] == [S.CANCELLED]
    job = next(a.job for a in actions if isinstance(a, JobEnded))
    assert job.reason == "DELETE /v1/jobs/j1"


def test_terminating_job_of_a_lost_worker_ends_cancelled() -> None:
    """If the worker disconnects before confirming a termination, the job ends `cancelled`."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.cancel(b.now, "j1")
    b.s.worker_left(b.now, "w1")
    assert ends(b.take()) == {"j1": S.CANCELLED}
    b.assert_idle()


def test_cancel_orphaned_job() -> None:
    """Cancelling an orphan ends it at once; a later migrate of it is answered with a
    termination."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    b.s.worker_left(b.now, "w1")
    b.s.cancel(b.now, "j1")
    assert ends(b.take()) == {"j1": S.CANCELLED}
    b.join("w1b")
    b.s.migrate(b.now, "w1b", ["j1"], ended={"j1"})  # the adapter's history knows it ended
    assert terminations(b.take()) == [("w1b", "j1")]
    b.assert_idle()


def test_cancel_unknown_job_returns_false() -> None:
    """Cancelling a job that is not live reports False and does nothing."""
    b = Bench()
    assert not b.s.cancel(b.now, "nope")
    assert b.take() == []


# -------------------------------------------------------- 8. one outcome


def test_every_job_ends_exactly_once_and_counters_return_to_zero() -> None:
    """A mixed run (success, failure, reject, refusal, timeout, cancel, deadline, loss) gives
    each job exactly one JobEnded and leaves pool.queued and pool.active at zero."""
    b = Bench(max_jobs_per_worker=2, queue_max_wait_s=30.0, reconnect_grace_s=5.0)
    b.join("w1")
    b.join("w2")
    for i in range(8):
        b.request(f"j{i}")
    # w1: j0, j1; w2: j2, j3; j4..j7 queued
    b.run("w1", "j0")
    b.status("w1", "j0", S.SUCCEEDED)  # -> j4 to w1
    b.answer("w1", "j1", available=False, terminate=True)  # rejected; -> j5 to w1
    b.run("w2", "j2")
    b.status("w2", "j2", S.FAILED, "exit code 1")  # -> j6 to w2
    b.answer("w2", "j3", available=False)  # refused; w2 benched, j3 queued at front
    b.s.cancel(b.now, "j7")
    b.run("w1", "j4")
    b.tick(3.0)  # j5 and j6 offers time out
    b.s.worker_left(b.now, "w1")  # j4 orphaned
    b.tick(60.0)  # grace and every deadline pass
    b.s.worker_left(b.now, "w2")
    b.tick(60.0)
    ended = b.ended()
    assert sorted(ended) == [f"j{i}" for i in range(8)]
    assert all(len(states) == 1 for states in ended.values())
    assert ended["j0"] == [S.SUCCEEDED]
    assert ended["j1"] == [S.REJECTED]
    assert ended["j2"] == [S.FAILED]
    assert ended["j7"] == [S.CANCELLED]
    assert ended["j4"] == [S.WORKER_LOST]
    for job in (a.job for a in b.log if isinstance(a, JobEnded)):
        assert job.reason
        assert job.trace[-1].event == job.state.value
    b.assert_idle()


def test_job_running_is_announced_once() -> None:
    """JS_RUNNING produces one JobRunning action; repeats are ignored."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.accept("w1", "j1")
    first = b.status("w1", "j1", S.RUNNING)
    again = b.status("w1", "j1", S.RUNNING)
    assert [type(a) for a in first] == [JobRunning]
    assert again == []


# ---------------------------------------------------------------- edges


def test_accept_info_is_kept_for_the_assignment() -> None:
    """What the worker answered (participant identity and so on) is stored on the job."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    info = AcceptInfo("agent-1", "Agent", "{}", {"k": "v"})
    b.s.answer(b.now, "w1", "j1", available=True, accept=info)
    assert b.s.jobs["j1"].accept == info


def test_duplicate_live_job_id_is_refused_but_reuse_after_end_is_allowed() -> None:
    """Requesting a live job id again raises DuplicateJob; once it ended the id may be reused."""
    b = Bench()
    b.request("j1", max_wait_s=1.0)
    with pytest.raises(DuplicateJob):
        b.request("j1")
    b.tick(1.0)
    b.request("j1")
    assert b.s.jobs["j1"].state is S.QUEUED


def test_events_from_unknown_workers() -> None:
    """Answers, status and migrates from an unknown worker raise UnknownWorker; job status
    from one is ignored; a second join of a live worker id raises."""
    b = Bench()
    with pytest.raises(UnknownWorker):
        b.answer("ghost", "j1", available=True)
    with pytest.raises(UnknownWorker):
        b.report("ghost")
    with pytest.raises(UnknownWorker):
        b.s.migrate(b.now, "ghost", [])
    b.status("ghost", "j1", S.SUCCEEDED)
    b.s.worker_left(b.now, "ghost")
    b.join("w1")
    with pytest.raises(ValueError, match="already registered"):
        b.join("w1")


def test_job_status_for_a_job_not_on_that_worker_is_ignored() -> None:
    """A worker cannot end (or start) a job that is offered to or running on someone else."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.join("w2")
    b.request("j1")
    b.run("w1", "j1")
    assert b.status("w2", "j1", S.SUCCEEDED) == []
    assert b.s.jobs["j1"].state is S.RUNNING


def test_worker_cannot_report_a_server_side_state() -> None:
    """Only RUNNING, SUCCEEDED and FAILED are job statuses a worker may report."""
    b = Bench(max_jobs_per_worker=1)
    b.join("w1")
    b.request("j1")
    b.run("w1", "j1")
    with pytest.raises(ValueError, match="cannot report"):
        b.status("w1", "j1", S.CANCELLED)


def test_illegal_transition_raises() -> None:
    """The transition table refuses leaving a terminal state."""
    with pytest.raises(IllegalTransition):
        check_transition("j1", S.SUCCEEDED, S.RUNNING)
    check_transition("j1", S.QUEUED, S.OFFERED)


def test_unknown_agent_name_gets_a_default_pool() -> None:
    """A request for an agent name without configuration gets the scheduler's default pool."""
    s = Scheduler(
        default=PoolConfig(
            agent_name="", max_jobs_per_worker=2, queue_max_wait_s=3, availability_timeout_s=9
        )
    )
    s.worker_joined(0.0, "w1", "other")
    assert s.workers["w1"].capacity == 2
    s.request(0.0, "j1", "other")
    s.request(0.0, "j2", "other")
    s.request(0.0, "j3", "other")
    s.advance(3.0)
    assert {a.job.id for a in s.take_actions() if isinstance(a, JobEnded)} == {"j3"}
