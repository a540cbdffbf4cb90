"""Stateful property tests: random event interleavings against the dispatch contract.

A hypothesis state machine drives one pool of a `Scheduler` with worker joins
(declared capacity or not), leaves, status reports, accepts, soft and hard
rejects, late answers, silences (the clock passes offer timeouts), job running /
success / failure, migrations, cancels and requests with various max waits.
The test keeps its own model of what the contract allows (which worker is
benched or suspended, which job each worker refused and when its state last
changed, which offers are live) built only from the events it sent and the
actions it got back, and checks every action and, after every step, the
scheduler's tables against it.

The clock moves like a real adapter moves it: to each `next_deadline()` in turn.
Timers due at the same instant may run in any order, so the model treats events
of one instant as unordered (a refusal and a state change at the same instant
count either way).

Examples scale with TRUNKLINE_PROPERTY_EXAMPLES (default 800, about 20 s on 2 cores; CI
uses the same; set it to 20000 for a deep run).
"""

from __future__ import annotations

import dataclasses
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trunkline.core import (
    Action,
    JobEnded,
    JobRunning,
    JobState,
    Limits,
    Placement,
    PoolConfig,
    Scheduler,
    SendAssignment,
    SendOffer,
    SendTermination,
)
from trunkline.core.states import ACTIVE

S = JobState
AGENT = "voice"
THRESHOLD = 0.8
EXAMPLES = int(os.environ.get("TRUNKLINE_PROPERTY_EXAMPLES", "800"))


@dataclasses.dataclass
class ModelWorker:
    """What the test knows about one connected worker."""

    cap: int | None
    available: bool = True
    load: float = 0.0
    draining: bool = False
    bench_until: float | None = None  # benched after a refusal/silence until then
    strikes: int = 0  # consecutive silences since the last answer
    changed: int = 0  # step number of the last state change (report, job end, backoff)
    allowance: int = 0  # used may exceed cap only after a migrate, and only shrink back
    offered: set[str] = dataclasses.field(default_factory=set)  # every job ever offered
    identity: str = ""  # who it is across reconnects (a lost job goes back only to it)


def pool_active(m: SchedulerMachine) -> int:
    return m.s.pools[AGENT].active


def pick(items: object, i: int) -> str:
    seq = sorted(items)  # type: ignore[call-overload]
    return seq[i % len(seq)]  # type: ignore[no-any-return]


class SchedulerMachine(RuleBasedStateMachine):
    s: Scheduler

    # ------------------------------------------------------------- setup

    @initialize(
        pool_cap=st.sampled_from([None, 1, 2, 4]),
        quota=st.sampled_from([None, None, 1, 3, 6]),
        placement=st.sampled_from(Placement),
        redispatch=st.booleans(),
        grace=st.sampled_from([0.0, 2.0, 5.0]),
        timeout=st.sampled_from([1.0, 3.0]),
        backoff=st.sampled_from([0.5, 1.0, 4.0]),
        max_strikes=st.sampled_from([1, 2, 3]),
    )
    def setup(
        self,
        pool_cap: int | None,
        quota: int | None,
        placement: Placement,
        redispatch: bool,
        grace: float,
        timeout: float,
        backoff: float,
        max_strikes: int,
    ) -> None:
        self.cfg = PoolConfig(
            agent_name=AGENT,
            max_jobs_per_worker=pool_cap,
            max_concurrent_jobs=quota,
            queue_max_wait_s=5.0,
            availability_timeout_s=timeout,
            placement=placement,
            load_threshold=THRESHOLD,
            refusal_backoff_s=backoff,
            max_strikes=max_strikes,
            reconnect_grace_s=grace,
            redispatch_on_worker_loss=redispatch,
        )
        self.s = Scheduler([self.cfg])
        self.now = 0.0
        self.step = 0
        self.n_workers = 0
        self.n_jobs = 0
        self.workers: dict[str, ModelWorker] = {}
        self.requested: set[str] = set()
        self.quota_allowance = 0  # pool.active may exceed the quota only after adoption
        self.ended: dict[str, JobState] = {}
        self.offers: dict[str, tuple[str, float]] = {}  # live offers: job -> (worker, sent at)
        self.refusals: dict[tuple[str, str], int] = {}  # (job, worker) -> step of refusal
        self.back_to_refuser: list[tuple[str, str]] = []  # offers to a refuser in this rule
        self.orphan_of: dict[str, str] = {}  # job -> identity of the worker that lost it

    def tick_step(self) -> int:
        self.step += 1
        return self.step

    # ------------------------------------------------------- action checks

    def process(
        self,
        *,
        assign: tuple[str, str] | None = None,
        running: str | None = None,
        migrated: frozenset[str] = frozenset(),
    ) -> list[Action]:
        """Check the actions of one step against the contract and update the model."""
        actions = self.s.take_actions()
        for a in actions:
            if isinstance(a, SendOffer):
                self.check_offer(a.worker_id, a.job.id)
            elif isinstance(a, SendAssignment):
                assert (a.worker_id, a.job.id) == assign, f"unexpected assignment {a}"
                assign = None
            elif isinstance(a, JobRunning):
                assert a.job.id == running, f"unexpected JobRunning {a.job}"
                running = None
            elif isinstance(a, SendTermination):
                if a.job_id in self.ended or a.job_id not in self.requested:
                    assert a.job_id in migrated, f"termination of dead job {a.job_id}"
            else:
                job = a.job
                assert job.id in self.requested
                assert job.id not in self.ended, f"{job.id} ended twice"
                assert job.state.terminal
                assert job.reason, f"{job.id} ended without a reason"
                assert job.id not in self.offers, f"{job.id} ended with a live offer"
                assert job.trace[-1].event == job.state.value
                self.ended[job.id] = job.state
        assert assign is None, f"accept of {assign} got no assignment"
        return actions

    def check_offer(self, wid: str, jid: str) -> None:
        assert jid in self.requested
        assert jid not in self.ended, f"offer of ended job {jid}"
        assert jid not in self.offers, f"{jid} has two live offers"
        mw = self.workers.get(wid)
        assert mw is not None, f"offer to departed worker {wid}"
        assert mw.available, f"offer to WS_FULL worker {wid}"
        assert mw.load < THRESHOLD, f"offer to overloaded worker {wid}"
        assert not mw.draining, f"offer to draining worker {wid}"
        assert mw.bench_until is None, f"offer to benched worker {wid}"
        assert mw.strikes < self.cfg.max_strikes, f"offer to suspended worker {wid}"
        refused_at = self.refusals.get((jid, wid))
        assert refused_at is None or mw.changed >= refused_at, (
            f"{jid} offered again to {wid}, which refused it, before its state changed"
        )
        self.offers[jid] = (wid, self.now)
        mw.offered.add(jid)
        if refused_at is not None:
            self.back_to_refuser.append((wid, jid))

    def bench(self, wid: str) -> None:
        mw = self.workers[wid]
        if mw.bench_until is None:
            mw.bench_until = self.now + self.cfg.refusal_backoff_s

    def changed(self, wid: str, step: int) -> None:
        mw = self.workers[wid]
        mw.changed = step
        mw.bench_until = None

    # --------------------------------------------------------------- rules

    @rule(declared=st.sampled_from([None, None, 1, 2, 3, 4]), ident=st.sampled_from(["", "a"]))
    def join(self, declared: int | None, ident: str) -> None:
        self.tick_step()
        self.n_workers += 1
        wid = f"w{self.n_workers}"
        caps = [c for c in (declared, self.cfg.max_jobs_per_worker) if c is not None]
        cap = min(caps) if caps else None
        mw = ModelWorker(cap=cap, changed=self.step, allowance=cap or 0, identity=ident)
        if any(job.state is S.ORPHANED for job in self.s.jobs.values()):
            # it may be a lost worker coming back: no offers until it migrates or reports
            mw.bench_until = self.now + self.cfg.refusal_backoff_s
        self.workers[wid] = mw
        self.s.worker_joined(self.now, wid, AGENT, declared, ident)
        assert self.s.workers[wid].capacity == cap
        self.process()

    @precondition(lambda self: self.workers)
    @rule(i=st.integers(0, 99))
    def leave(self, i: int) -> None:
        self.tick_step()
        wid = pick(self.workers, i)
        for jid in [j for j, (w, _) in self.offers.items() if w == wid]:
            del self.offers[jid]
        for jid in self.s.workers[wid].jobs:
            self.orphan_of[jid] = self.workers[wid].identity
        del self.workers[wid]
        self.s.worker_left(self.now, wid)
        self.process()

    @precondition(lambda self: self.workers)
    @rule(
        i=st.integers(0, 99),
        available=st.booleans(),
        load=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
        draining=st.integers(0, 9),
    )
    def status(self, i: int, available: bool, load: float, draining: int) -> None:
        step = self.tick_step()
        wid = pick(self.workers, i)
        mw = self.workers[wid]
        mw.available, mw.load = available, load
        mw.draining = mw.draining or draining == 0
        self.changed(wid, step)
        self.s.worker_status(self.now, wid, available=available, load=load, draining=draining == 0)
        self.process()

    @rule(max_wait=st.sampled_from([None, 0.0, 0.5, 2.0, 5.0, 20.0]))
    def request(self, max_wait: float | None) -> None:
        self.tick_step()
        self.n_jobs += 1
        jid = f"j{self.n_jobs}"
        self.requested.add(jid)
        self.s.request(self.now, jid, AGENT, max_wait_s=max_wait)
        self.process()

    @precondition(lambda self: self.offers)
    @rule(i=st.integers(0, 99), kind=st.sampled_from(["accept", "accept", "soft", "hard"]))
    def answer(self, i: int, kind: str) -> None:
        step = self.tick_step()
        jid = pick(self.offers, i)
        wid, _ = self.offers.pop(jid)
        mw = self.workers[wid]
        mw.strikes = 0
        if kind == "soft":
            self.refusals[(jid, wid)] = step
            self.bench(wid)
        available, terminate = kind == "accept", kind == "hard"
        self.s.answer(self.now, wid, jid, available=available, terminate=terminate)
        self.process(assign=(wid, jid) if available else None)
        if kind == "hard":
            assert self.ended.get(jid) is S.REJECTED
        elif kind == "accept":
            assert self.s.jobs[jid].state is S.ASSIGNED

    def late_pairs(self) -> list[tuple[str, str]]:
        return sorted(
            (wid, jid)
            for wid, mw in self.workers.items()
            for jid in mw.offered
            if self.offers.get(jid, ("",))[0] != wid
        )

    @precondition(lambda self: self.late_pairs())
    @rule(i=st.integers(0, 99), kind=st.sampled_from(["accept", "soft", "hard"]))
    def late_answer(self, i: int, kind: str) -> None:
        """An answer to an offer that was withdrawn (timed out, cancelled, moved on)."""
        self.tick_step()
        pairs = self.late_pairs()
        wid, jid = pairs[i % len(pairs)]
        self.workers[wid].strikes = 0
        before = self.s.jobs.get(jid)
        state = before.state if before is not None else None
        self.s.answer(self.now, wid, jid, available=kind == "accept", terminate=kind == "hard")
        actions = self.process()
        assert not any(isinstance(a, JobEnded) and a.job.id == jid for a in actions)
        after = self.s.jobs.get(jid)
        # Only a queued job may move (to an offer, if the answer lifted a suspension).
        allowed = {state, S.OFFERED} if state is S.QUEUED else {state}
        assert (after.state if after is not None else None) in allowed

    def placed(self) -> list[str]:
        return sorted(j for w in self.s.workers.values() for j in w.jobs)

    @precondition(lambda self: self.placed())
    @rule(i=st.integers(0, 99))
    def job_running(self, i: int) -> None:
        self.tick_step()
        jid = pick(self.placed(), i)
        job = self.s.jobs[jid]
        was = job.state
        self.s.job_status(self.now, job.worker_id or "", jid, S.RUNNING)
        self.process(running=jid if was is S.ASSIGNED else None)
        assert job.state is (S.RUNNING if was is S.ASSIGNED else was)

    @precondition(lambda self: self.placed())
    @rule(i=st.integers(0, 99), ok=st.booleans())
    def job_end(self, i: int, ok: bool) -> None:
        step = self.tick_step()
        jid = pick(self.placed(), i)
        job = self.s.jobs[jid]
        was, wid = job.state, job.worker_id or ""
        self.changed(wid, step)
        self.s.job_status(self.now, wid, jid, S.SUCCEEDED if ok else S.FAILED, "exit 1")
        self.process()
        expected = S.CANCELLED if was is S.TERMINATING else S.SUCCEEDED if ok else S.FAILED
        assert self.ended.get(jid) is expected

    @precondition(lambda self: self.workers)
    @rule(
        i=st.integers(0, 99),
        orphans=st.integers(0, 2**8),
        extra=st.sampled_from(["none", "ghost", "ended", "live"]),
    )
    def migrate(self, i: int, orphans: int, extra: str) -> None:
        """A (re)connected worker claims jobs: orphans its identity lost are re-attached
        (another identity's stay orphaned), a job never seen is adopted as running
        there up to its capacity and the quota, anything else is terminated; the
        migrate is a state change of the worker (lifts its bench)."""
        step = self.tick_step()
        wid = pick(self.workers, i)
        self.changed(wid, step)
        orphaned = sorted(j for j, job in self.s.jobs.items() if job.state is S.ORPHANED)
        ids = [j for k, j in enumerate(orphaned) if orphans >> (k % 8) & 1]
        ghost = f"ghost{step}"  # never seen by the scheduler: as after a server restart
        if extra == "ghost":
            ids.append(ghost)
        elif extra == "ended" and self.ended:
            ids.append(pick(self.ended, orphans))
        elif extra == "live" and self.s.jobs:
            ids.append(pick(self.s.jobs, orphans))
        w = self.s.workers[wid]
        held = set(w.jobs)
        budget = w.capacity if w.capacity is not None else Limits().max_worker_jobs
        # This identity's orphans come back while the worker is under its capacity;
        # another identity's are not handed over. Refused ones are terminated here and
        # stay orphaned.
        mine = {j for j in orphaned if self.orphan_of[j] == self.workers[wid].identity}
        back: list[str] = []
        n = len(held)
        for j in dict.fromkeys(ids):
            if j in mine and n < budget:
                back.append(j)
                n += 1
        expected = [j for j in dict.fromkeys(ids) if j not in back and j not in held and j != ghost]
        offered_here = [j for j, (ow, _) in self.offers.items() if ow == wid]
        # the adapter passes the ids its history knows have ended
        self.s.migrate(self.now, wid, ids, self.ended)
        # A job brought back may withdraw an unanswered offer that would overfill the
        # worker (a running job comes first); the withdrawn job is re-placed.
        withdrawn = [j for j in offered_here if j not in w.offers]
        for j in withdrawn:
            del self.offers[j]
        brought = len(back) + (1 if ghost in ids and ghost in self.s.jobs else 0)
        assert len(withdrawn) <= brought
        if w.capacity is not None and brought:
            assert w.used <= max(w.capacity, len(offered_here) + len(held))
        adopted = ghost in ids and ghost in self.s.jobs
        if adopted:
            self.requested.add(ghost)
        elif ghost in ids:
            # Adoption stops at the worker's capacity and the pool's quota.
            quota = self.cfg.max_concurrent_jobs
            assert len(w.jobs) >= budget or (quota is not None and pool_active(self) >= quota)
            expected.append(ghost)
        actions = self.process(migrated=frozenset(ids))
        terms = [a.job_id for a in actions if isinstance(a, SendTermination)]
        assert sorted(set(terms)) == sorted(set(expected))
        assert all(a.worker_id == wid for a in actions if isinstance(a, SendTermination))
        for j in ids:
            if j in back or (j == ghost and adopted):
                assert self.s.jobs[j].state is S.RUNNING
                assert self.s.jobs[j].worker_id == wid
            elif j in orphaned:
                assert self.s.jobs[j].state is S.ORPHANED
        mw = self.workers[wid]
        if mw.cap is not None:
            mw.allowance = max(mw.cap, w.used)
        self.quota_allowance = max(self.quota_allowance, self.s.pools[AGENT].active)

    @rule(i=st.integers(0, 99), unknown=st.integers(0, 9))
    def cancel(self, i: int, unknown: int) -> None:
        self.tick_step()
        if not self.s.jobs or unknown == 0:
            assert not self.s.cancel(self.now, "nope")
            assert self.process() == []
            return
        jid = pick(self.s.jobs, i)
        job = self.s.jobs[jid]
        was = job.state
        self.offers.pop(jid, None)
        assert self.s.cancel(self.now, jid)
        actions = self.process()
        if was in (S.QUEUED, S.OFFERED, S.ORPHANED):
            assert self.ended.get(jid) is S.CANCELLED
        elif was in (S.ASSIGNED, S.RUNNING):
            assert job.state is S.TERMINATING
            assert [a.job_id for a in actions if isinstance(a, SendTermination)] == [jid]
        else:
            assert job.state is S.TERMINATING
            assert actions == []

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 3.0, 7.0]))
    def advance(self, dt: float) -> None:
        self.advance_to(self.now + dt)

    def advance_to(self, target: float) -> None:
        """Move the clock to `target`, stopping at every timer deadline on the way."""
        while True:
            nd = self.s.next_deadline()
            t = nd if nd is not None and nd <= target else target
            assert t >= self.now
            self.instant(t)
            if t == target:
                return

    def instant(self, t: float) -> None:
        step = self.tick_step()
        self.now = t
        lifted = set()
        for wid, mw in self.workers.items():
            if mw.bench_until is not None and mw.bench_until <= t:
                self.changed(wid, step)
                lifted.add(wid)
        timeout = self.cfg.availability_timeout_s
        silent = [(j, w) for j, (w, sent) in self.offers.items() if sent + timeout <= t]
        for jid, wid in silent:
            del self.offers[jid]
            self.refusals[(jid, wid)] = step
        self.s.advance(t)
        self.process()
        for jid, wid in silent:
            job = self.s.jobs.get(jid)
            if job is not None:
                assert (t, "offer_timeout", wid) in [
                    (e.at, e.event, e.worker_id) for e in job.trace
                ]
            mw = self.workers[wid]
            mw.strikes += 1
            if wid in lifted:
                # The backoff ended at the very instant of this silence: the scheduler may
                # have run either timer first, so adopt its view of the bench.
                mw.bench_until = self.s.workers[wid].cooldown_until
            else:
                self.bench(wid)
        self.check_back_to_refuser(
            [w for w in self.s.workers if w not in lifted and self.can_take_offer(w)]
        )

    # ---------------------------------------------------------- invariants

    @invariant()
    def tables_match_the_contract(self) -> None:
        s = self.s
        pool = s.pools[AGENT]
        live = self.requested - set(self.ended)
        assert set(s.jobs) == live, "a job vanished without JobEnded (or a dead one lingers)"
        # Offers: each live job holds at most one, on the worker the model says.
        offered = {j: w.id for w in s.workers.values() for j in w.offers}
        n_offers = sum(len(w.offers) for w in s.workers.values())
        assert n_offers == len(offered), "a job is offered to two workers"
        assert offered == {j: w for j, (w, _) in self.offers.items()}
        for wid, w in s.workers.items():
            for job in w.offers.values():
                assert job.state is S.OFFERED
                assert job.worker_id == wid
            for jid, job in w.jobs.items():
                assert job.state in (S.ASSIGNED, S.RUNNING, S.TERMINATING), (jid, job.state)
                assert job.worker_id == wid
        for jid, job in s.jobs.items():
            if job.state is S.OFFERED:
                assert offered.get(jid) == job.worker_id
            elif job.state in (S.ASSIGNED, S.RUNNING, S.TERMINATING):
                assert jid in s.workers[job.worker_id or ""].jobs
        # Slots: used <= capacity (a migrate may overfill; then used only shrinks back).
        assert set(s.workers) == set(self.workers)
        for wid, w in s.workers.items():
            mw = self.workers[wid]
            assert w.used == len(w.offers) + len(w.jobs)
            if mw.cap is None:
                assert len(w.offers) <= 1, f"{wid}: {len(w.offers)} offers with unknown capacity"
            else:
                assert w.used <= mw.allowance, f"{wid}: {w.used} used, capacity {mw.cap}"
                mw.allowance = max(mw.cap, min(mw.allowance, w.used))
        # Counters.
        queued = [j for j in s.jobs.values() if j.state is S.QUEUED]
        in_queue = [j for j in pool.queue if j.state is S.QUEUED and j.queued_since is not None]
        assert len(in_queue) == len({id(j) for j in in_queue}), "a job is queued twice"
        assert {j.id for j in queued} == {j.id for j in in_queue}, "a QUEUED job is not queued"
        assert pool.queued == len(queued)
        assert pool.active == sum(1 for j in s.jobs.values() if j.state in ACTIVE)
        quota = self.cfg.max_concurrent_jobs
        if quota is not None:
            # Above the quota only through adopting jobs a worker already runs (a
            # migrate after a restart); then it may only shrink back, never grow.
            assert pool.active <= max(quota, self.quota_allowance)
            self.quota_allowance = max(quota, min(self.quota_allowance, pool.active))
        open_workers = [wid for wid in s.workers if self.can_take_offer(wid)]
        # No stranding: a queued job never waits while an eligible worker has a free slot.
        if queued and (quota is None or pool.active < quota):
            assert not open_workers, f"{len(queued)} queued while {open_workers} have a slot"
        self.check_back_to_refuser(open_workers)

    def check_back_to_refuser(self, open_workers: list[str]) -> None:
        """A job goes back to a worker that refused it only if no other worker could take
        it. Checked at the end of the rule or timer instant that made the offer: a worker
        open then was open at the offer too (within one instant slots only fill up, except
        when a backoff ends at that very instant, which callers exclude)."""
        for wid, jid in self.back_to_refuser:
            others = [w for w in open_workers if w != wid and (jid, w) not in self.refusals]
            assert not others, f"{jid} went back to refuser {wid} while {others} were open"
        self.back_to_refuser.clear()

    def can_take_offer(self, wid: str) -> bool:
        """The model's view: eligible for an offer and a slot free."""
        w, mw = self.s.workers[wid], self.workers[wid]
        eligible = (
            mw.available
            and mw.load < THRESHOLD
            and not mw.draining
            and mw.bench_until is None
            and mw.strikes < self.cfg.max_strikes
        )
        return eligible and ((not w.offers) if mw.cap is None else w.used < mw.cap)

    def teardown(self) -> None:
        """Every worker leaves and time passes every deadline and grace: nothing stays live,
        and every job ended exactly once."""
        if not hasattr(self, "cfg"):
            return
        for wid in sorted(self.workers):
            for jid in [j for j, (w, _) in self.offers.items() if w == wid]:
                del self.offers[jid]
            del self.workers[wid]
            self.s.worker_left(self.now, wid)
            self.process()
            self.tables_match_the_contract()
        for _ in range(10_000):
            nd = self.s.next_deadline()
            if nd is None:
                break
            self.advance_to(max(nd, self.now))
            self.tables_match_the_contract()
        assert self.s.jobs == {}, f"jobs left live: {self.s.jobs}"
        assert set(self.ended) == self.requested
        pool = self.s.pools[AGENT]
        assert (pool.queued, pool.active) == (0, 0)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
