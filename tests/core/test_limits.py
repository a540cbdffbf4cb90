"""Bounds (issue 9): nothing a worker or a client sends grows the scheduler's tables
without limit, and every refusal says which limit and what to do.

Plain synchronous tests with a fake clock, like test_scheduler.py.
"""

from __future__ import annotations

from trunkline.core import (
    FORGOTTEN_POOL,
    Action,
    JobEnded,
    JobState,
    Limits,
    Placement,
    PoolConfig,
    PoolForgotten,
    Scheduler,
    SendOffer,
    SendTermination,
    agent_name_problem,
)
from trunkline.core.counters import FORGOTTEN_KEPT

S = JobState
AGENT = "support"


class Rig:
    """A scheduler with one configured pool and a fake clock."""

    def __init__(self, limits: Limits | None = None, **pool: object) -> None:
        self.s = Scheduler([PoolConfig(agent_name=AGENT, **pool)], limits=limits)  # type: ignore[arg-type]
        self.now = 100.0

    def take(self) -> list[Action]:
        return self.s.take_actions()

    def tick(self, dt: float) -> list[Action]:
        self.now += dt
        self.s.advance(self.now)
        return self.take()

    def run(self, wid: str, jid: str) -> None:
        self.s.answer(self.now, wid, jid, available=True)
        self.s.job_status(self.now, wid, jid, S.RUNNING)
        self.take()


def offers(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.worker_id, a.job.id) for a in actions if isinstance(a, SendOffer)]


def terminations(actions: list[Action]) -> list[str]:
    return [a.job_id for a in actions if isinstance(a, SendTermination)]


# ------------------------------------------------------------ placement index


def test_a_huge_declared_capacity_costs_one_index_entry_not_one_per_slot() -> None:
    """A worker declaring 20,000,000 slots is one bucket in the placement index (it was a
    list with an entry per possible free-slot count: 1.3 GB), and placement still works."""
    for placement in Placement:
        r = Rig(placement=placement)
        r.s.worker_joined(r.now, "big", AGENT, 20_000_000)
        r.s.worker_joined(r.now, "small", AGENT, 2)
        pool = r.s.pools[AGENT]
        assert len(pool.buckets) == 2
        assert pool.bucket_keys == [2, 20_000_000]
        r.s.request(r.now, "j1", AGENT)
        expected = "small" if placement is Placement.PACK else "big"
        assert offers(r.take()) == [(expected, "j1")]
        assert pool.free_slots() == 20_000_001


def test_the_index_drops_emptied_buckets() -> None:
    """A free-slot count no worker has any more leaves the index: it holds only what exists."""
    r = Rig(max_jobs_per_worker=3)
    r.s.worker_joined(r.now, "w1", AGENT)
    pool = r.s.pools[AGENT]
    for jid in ("a", "b", "c"):
        r.s.request(r.now, jid, AGENT)
    r.take()
    assert pool.buckets == {}
    assert pool.bucket_keys == []
    r.s.answer(r.now, "w1", "a", available=False, terminate=True)
    r.take()
    assert pool.bucket_keys == [1]


# -------------------------------------------------------------------- migrate


def test_an_orphan_goes_back_only_to_the_identity_that_lost_it() -> None:
    """Another worker's migrate of an orphaned job is refused with a termination and the job
    keeps waiting for its own worker, which can still migrate it back within the grace."""
    r = Rig(max_jobs_per_worker=2, reconnect_grace_s=30.0)
    r.s.worker_joined(r.now, "w1", AGENT, identity="replica-1")
    r.s.request(r.now, "j1", AGENT)
    r.take()
    r.run("w1", "j1")
    r.s.worker_left(r.now, "w1")
    r.s.worker_joined(r.now, "thief", AGENT, identity="replica-2")
    r.take()
    r.s.migrate(r.now, "thief", ["j1"])
    assert terminations(r.take()) == ["j1"]
    job = r.s.jobs["j1"]
    assert job.state is S.ORPHANED
    assert r.s.workers["thief"].used == 0
    assert "migrate_refused" in [e.event for e in job.trace]
    r.s.worker_joined(r.now, "w1b", AGENT, identity="replica-1")
    r.s.migrate(r.now, "w1b", ["j1"])
    assert terminations(r.take()) == []
    assert (job.state, job.worker_id) == (S.RUNNING, "w1b")


def test_adoption_after_a_restart_stops_at_the_workers_capacity() -> None:
    """5,000 made-up ids from a worker of capacity 4: 4 are adopted, the rest terminated; the
    pool counts 4 active jobs, not 5,000."""
    r = Rig()
    r.s.worker_joined(r.now, "w1", AGENT, 4)
    ids = [f"made-up-{i}" for i in range(5000)]
    r.s.migrate(r.now, "w1", ids)
    terms = terminations(r.take())
    assert len(terms) == 4996
    assert set(terms) == set(ids[4:])
    assert sorted(r.s.workers["w1"].jobs) == sorted(ids[:4])
    assert r.s.pools[AGENT].active == 4
    assert len(r.s.jobs) == 4


def test_adoption_counts_against_the_quota() -> None:
    """Adopted jobs count against the pool quota, and adoption stops at it: the excess is
    terminated, and a real dispatch still finds a slot once the quota allows."""
    r = Rig(max_concurrent_jobs=4)
    r.s.worker_joined(r.now, "good", AGENT, 2)
    r.s.request(r.now, "real", AGENT)
    r.take()
    r.run("good", "real")
    r.s.worker_joined(r.now, "w1", AGENT, 10)
    r.s.migrate(r.now, "w1", [f"x{i}" for i in range(100)])
    assert len(terminations(r.take())) == 97
    assert r.s.pools[AGENT].active == 4  # the quota, never more
    r.s.job_status(r.now, "w1", "x0", S.SUCCEEDED)
    r.take()
    r.s.request(r.now, "real2", AGENT)
    assert offers(r.take()) == [("good", "real2")]


def test_adoption_by_a_worker_of_unknown_capacity_stops_at_the_server_ceiling() -> None:
    """With no declared capacity, adoption is bounded by `Limits.max_worker_jobs`."""
    r = Rig(limits=Limits(max_worker_jobs=3))
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.migrate(r.now, "w1", ["a", "b", "c", "d", "e"])
    assert terminations(r.take()) == ["d", "e"]
    assert len(r.s.workers["w1"].jobs) == 3


def test_a_migrated_job_withdraws_an_offer_that_would_overfill_the_worker() -> None:
    """A worker offered a job just before its migrate arrives (nothing was orphaned, so it was
    not held back) gets its running job counted, and the offer is withdrawn and re-placed:
    used never exceeds capacity."""
    r = Rig(max_jobs_per_worker=1)
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.worker_joined(r.now, "w2", AGENT)
    r.s.worker_status(r.now, "w2", available=False)
    r.s.request(r.now, "queued-one", AGENT)
    assert offers(r.take()) == [("w1", "queued-one")]
    r.s.worker_status(r.now, "w2", available=True)
    r.s.migrate(r.now, "w1", ["running-before-restart"])
    assert offers(r.take()) == [("w2", "queued-one")]
    w1 = r.s.workers["w1"]
    assert list(w1.jobs) == ["running-before-restart"]
    assert not w1.offers
    assert w1.used == 1
    trace = [e.event for e in r.s.jobs["queued-one"].trace]
    assert "offer_withdrawn" in trace


# --------------------------------------------------------------------- traces


def test_answers_for_a_job_never_offered_to_that_worker_grow_nothing() -> None:
    """200,000 answers for a job offered to someone else leave its trace and the worker as
    they were (they used to add one trace event each)."""
    r = Rig(max_jobs_per_worker=1)
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.worker_joined(r.now, "hostile", AGENT)
    r.s.worker_status(r.now, "hostile", available=False)
    r.s.request(r.now, "j1", AGENT)
    r.take()
    r.run("w1", "j1")
    job = r.s.jobs["j1"]
    before = list(job.trace)
    for _ in range(200_000):
        r.s.answer(r.now, "hostile", "j1", available=True)
    assert r.take() == []
    assert job.trace == before
    assert r.s.workers["hostile"].used == 0


def test_a_trace_keeps_its_head_its_latest_events_and_counts_the_rest() -> None:
    """Past `max_trace_events` a trace keeps the first half, one `trace_truncated` event
    counting what was dropped, and the latest events, ending with the outcome."""
    r = Rig(limits=Limits(max_trace_events=10), max_jobs_per_worker=1, availability_timeout_s=1.0)
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.request(r.now, "j1", AGENT)
    r.take()
    r.tick(1.0)  # offer_timeout: now the late answers are traced
    for _ in range(1000):
        r.s.answer(r.now, "w1", "j1", available=False)
    job = r.s.jobs["j1"]
    assert len(job.trace) == 10
    events = [e.event for e in job.trace]
    assert events[:4] == ["requested", "offered", "offer_timeout", "queued"]
    assert events[5] == "trace_truncated"
    assert events[6:] == ["late_answer_ignored"] * 4
    total = 4 + 1000  # requested, offered, offer_timeout, queued + the answers
    assert job.trace[5].detail == f"{total - 9} events dropped"
    r.s.cancel(r.now, "j1")
    ended = [a.job for a in r.take() if isinstance(a, JobEnded)]
    assert ended
    assert ended[0].trace[-1].event == "cancelled"
    assert len(ended[0].trace) == 10
    times = [e.at for e in ended[0].trace]
    assert times == sorted(times)


# ---------------------------------------------------------------------- queue


def test_a_full_pool_queue_refuses_new_requests_with_queue_full() -> None:
    """Beyond the pool's `max_queued` a new request ends `no_capacity` at once with code
    `queue_full` and a reason naming the limit and the fix; it counts as refused demand."""
    r = Rig(max_queued=3)
    for i in range(3):
        assert r.s.request(r.now, f"q{i}", AGENT).state is S.QUEUED
    job = r.s.request(r.now, "q3", AGENT)
    assert job.state is S.NO_CAPACITY
    assert job.code == "queue_full"
    assert "max_queued = 3" in job.reason
    assert "raise" in job.reason
    assert r.s.pools[AGENT].queued == 3
    assert r.s.demand(r.now, AGENT, 10.0).refused == 1


def test_the_server_wide_queue_limit_spans_pools() -> None:
    """`Limits.max_queued` bounds the queued jobs of all pools together."""
    s = Scheduler(limits=Limits(max_queued=2))
    s.request(0.0, "a", "p1")
    s.request(0.0, "b", "p2")
    job = s.request(0.0, "c", "p3")
    assert job.code == "queue_full"
    assert "[server] max_queued = 2" in job.reason
    assert s.queued_total == 2
    s.cancel(0.0, "a")
    assert s.request(0.0, "d", "p3").state is S.QUEUED
    assert s.queued_total == 2


def test_requeued_jobs_are_never_refused_by_the_queue_limit() -> None:
    """A soft refusal puts its job back at the front even when the queue is at its limit."""
    r = Rig(max_queued=1, max_jobs_per_worker=1)
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.request(r.now, "a", AGENT)
    r.s.request(r.now, "b", AGENT)  # queued: the limit
    r.take()
    r.s.answer(r.now, "w1", "a", available=False)
    assert r.s.jobs["a"].state is S.QUEUED
    assert r.s.pools[AGENT].queued == 2


# ----------------------------------------------------------------- terminate


def test_a_termination_never_confirmed_ends_cancelled_and_frees_the_slot() -> None:
    """After `terminate_timeout_s` without the worker's confirmation the job ends `cancelled`
    with a reason saying so, the slot is freed and a queued job gets it; a late JS_SUCCESS
    changes nothing."""
    r = Rig(max_jobs_per_worker=1, terminate_timeout_s=5.0)
    r.s.worker_joined(r.now, "w1", AGENT)
    r.s.request(r.now, "j1", AGENT)
    r.take()
    r.run("w1", "j1")
    r.s.cancel(r.now, "j1")
    r.s.request(r.now, "next", AGENT)
    r.take()
    assert r.tick(4.9) == []
    actions = r.tick(0.2)
    ended = [a.job for a in actions if isinstance(a, JobEnded)]
    assert [j.id for j in ended] == ["j1"]
    assert ended[0].state is S.CANCELLED
    assert "did not confirm the termination within 5 s" in ended[0].reason
    assert offers(actions) == [("w1", "next")]
    r.s.job_status(r.now, "w1", "j1", S.SUCCEEDED)
    assert r.take() == []


# ---------------------------------------------------------------------- pools


def test_pools_of_unconfigured_names_are_forgotten_when_idle() -> None:
    """A pool made by an unknown agent name is dropped once it has no worker and no job; a
    configured pool stays; a forgotten name comes back as a fresh pool."""
    s = Scheduler([PoolConfig(agent_name="kept")])
    s.request(0.0, "a", "typo", max_wait_s=0)
    s.request(0.0, "b", "kept", max_wait_s=0)
    assert set(s.pools) == {"kept"}
    s.worker_joined(0.0, "w1", "typo")
    assert "typo" in s.pools
    s.worker_left(0.0, "w1")
    assert set(s.pools) == {"kept"}
    assert s.requested["typo"] == 1  # recent names keep their counters


def test_counters_of_long_forgotten_names_fold_into_one_label() -> None:
    """The adapter is told of every forgotten pool (to drop its own series); past the last
    `FORGOTTEN_KEPT` forgotten names the counters move to `FORGOTTEN_POOL`, totals unchanged."""
    s = Scheduler()
    names = [f"made-up-{i}" for i in range(FORGOTTEN_KEPT + 50)]
    forgotten: list[str] = []
    for i, name in enumerate(names):
        s.request(0.0, f"j{i}", name, max_wait_s=0)
        forgotten += [a.agent_name for a in s.take_actions() if isinstance(a, PoolForgotten)]
    assert forgotten == names
    assert s.pools == {}
    assert len(s.requested) == FORGOTTEN_KEPT + 1
    assert s.requested[FORGOTTEN_POOL] == 50
    assert sum(s.requested.values()) == len(names)
    assert s.ended[(FORGOTTEN_POOL, "no_capacity")] == 50
    assert len({p for p, _ in s.ended}) == FORGOTTEN_KEPT + 1


# ---------------------------------------------------------------------- names


def test_agent_names_are_short_and_plain() -> None:
    """Agent names: "" or up to 128 of A-Z a-z 0-9 . _ -; anything else says why."""
    for ok in ("", "support-agent", "inbound_caller", "voice.v2", "a" * 128):
        assert agent_name_problem(ok) is None, ok
    assert "129 characters" in (agent_name_problem("a" * 129) or "")
    for bad in ("has space", "new\nline", "quote'", "(unconfigured)", "é"):
        assert "characters outside" in (agent_name_problem(bad) or ""), bad
