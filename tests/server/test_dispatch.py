"""Dispatch over the wire: capacity, answers, offer timeouts, worker loss."""

from __future__ import annotations

from typing import Any

from protoworker import ProtoWorker
from server.conftest import MakeServer
from server.helpers import Srv


def _pool(name: str, **settings: Any) -> dict[str, Any]:
    return {"pools": {name: settings}}


async def _no_more_offers(*workers: ProtoWorker) -> None:
    for w in workers:
        await w.barrier()
        assert w.pending("availability") == 0, f"{w.worker_id} got an unexpected offer"


# ------------------------------------------------------------------ capacity


async def test_declared_max_jobs_is_honoured(srv: Srv) -> None:
    """`?max_jobs=2`: two offers go out, the third job queues until a job ends."""
    w = await srv.connect("cap", max_jobs=2)
    jobs = [(await srv.dispatch("cap"))["job_id"] for _ in range(3)]
    first = await w.next_offer()
    second = await w.next_offer()
    assert [first.id, second.id] == jobs[:2]
    await _no_more_offers(w)
    for job_id in jobs[:2]:
        await w.accept(job_id)
        await w.next_assignment()
        await w.running(job_id)
    await srv.wait_state(jobs[1], "running")
    assert (await srv.job(jobs[2]))["state"] == "queued"
    await _no_more_offers(w)
    await w.succeed(jobs[0])
    third = await w.next_offer()
    assert third.id == jobs[2]
    _, body = await srv.call("GET", "/v1/workers")
    (info,) = body["workers"]
    assert info["capacity"] == 2
    assert info["used"] == 2


async def test_pool_cap_limits_a_larger_declared_max_jobs(make_server: MakeServer) -> None:
    """Pool `max_jobs_per_worker` = 2 caps a worker that declares `max_jobs=5`."""
    srv = await make_server(_pool("cap", max_jobs_per_worker=2))
    w = await srv.connect("cap", max_jobs=5)
    assert srv.dispatcher.worker(w.worker_id).capacity == 2
    jobs = [(await srv.dispatch("cap"))["job_id"] for _ in range(3)]
    assert [(await w.next_offer()).id for _ in range(2)] == jobs[:2]
    await _no_more_offers(w)
    assert (await srv.job(jobs[2]))["state"] == "queued"


async def test_declared_max_jobs_below_pool_cap_wins(make_server: MakeServer) -> None:
    """A worker declaring fewer slots than the pool allows gets its own number."""
    srv = await make_server(_pool("cap", max_jobs_per_worker=4))
    w = await srv.connect("cap", max_jobs=1)
    _, body = await srv.call("GET", "/v1/workers")
    assert body["workers"][0]["capacity"] == 1
    await srv.dispatch("cap")
    await srv.dispatch("cap")
    await w.next_offer()
    await _no_more_offers(w)


async def test_unknown_capacity_one_outstanding_offer(srv: Srv) -> None:
    """Without any declared cap a worker has one unanswered offer at a time."""
    w = await srv.connect("free")
    assert srv.dispatcher.worker(w.worker_id).capacity is None
    j1 = (await srv.dispatch("free"))["job_id"]
    j2 = (await srv.dispatch("free"))["job_id"]
    assert (await w.next_offer()).id == j1
    await _no_more_offers(w)
    await w.accept(j1)
    assert (await w.next_offer()).id == j2


async def test_full_status_stops_offers_until_available(srv: Srv) -> None:
    """A worker reporting WS_FULL gets no offer; WS_AVAILABLE lets the queue at it."""
    w = await srv.connect("st", max_jobs=4)
    await w.status(full=True)
    await w.barrier()
    job = await srv.dispatch("st")
    await _no_more_offers(w)
    assert (await srv.job(job["job_id"]))["state"] == "queued"
    await w.status(full=False, load=0.1)
    assert (await w.next_offer()).id == job["job_id"]


async def test_load_at_threshold_stops_offers(make_server: MakeServer) -> None:
    """A worker whose reported load reaches `load_threshold` gets no offer."""
    srv = await make_server(_pool("ld", load_threshold=0.5, max_jobs_per_worker=4))
    w = await srv.connect("ld")
    await w.status(load=0.5)
    await w.barrier()
    job = await srv.dispatch("ld")
    await _no_more_offers(w)
    await w.status(load=0.2)
    assert (await w.next_offer()).id == job["job_id"]


async def test_placement_pack_and_spread(make_server: MakeServer) -> None:
    """`pack` fills the fuller worker first; `spread` picks the emptier one."""
    srv = await make_server(
        {
            "pools": {
                "p": {"max_jobs_per_worker": 3, "placement": "pack"},
                "s": {"max_jobs_per_worker": 3, "placement": "spread"},
            }
        }
    )
    for name in ("p", "s"):
        a = await srv.connect(name, auto="accept", auto_run=True)
        b = await srv.connect(name, auto="accept", auto_run=True)
        await srv.dispatch(name, wait=True)
        first = a if a.received[1:] else b
        other = b if first is a else a
        await srv.dispatch(name, wait=True)
        await first.barrier()
        await other.barrier()
        on_first = sum(m.WhichOneof("message") == "assignment" for m in first.received)
        on_other = sum(m.WhichOneof("message") == "assignment" for m in other.received)
        assert (on_first, on_other) == ((2, 0) if name == "p" else (1, 1)), name


# ------------------------------------------------------------------- answers


async def test_reject_terminate_ends_job_rejected(srv: Srv) -> None:
    """`reject()` (terminate=true) ends the job `rejected`, not re-offered."""
    w = await srv.connect("rj", max_jobs=2)
    other = await srv.connect("rj", max_jobs=2)
    job = await srv.dispatch("rj")
    offered_to = w if job["worker_id"] == w.worker_id else other
    await offered_to.next_offer()
    await offered_to.reject(job["job_id"], terminate=True)
    done = await srv.wait_state(job["job_id"], "rejected")
    assert "terminate=true" in done["reason"]
    await _no_more_offers(w, other)


async def test_soft_refusal_moves_job_to_another_worker(srv: Srv) -> None:
    """`reject(terminate=False)` re-places the job on a worker that has not refused it."""
    a = await srv.connect("soft", max_jobs=2)
    job_id = (await srv.dispatch("soft"))["job_id"]
    await a.next_offer()
    b = await srv.connect("soft", max_jobs=2)
    await a.reject(job_id, terminate=False)
    assert (await b.next_offer()).id == job_id
    await b.accept(job_id)
    await b.next_assignment()
    await b.running(job_id)
    job = await srv.wait_state(job_id, "running")
    events = [(e["event"], e["worker_id"]) for e in job["trace"]]
    assert ("refused", a.worker_id) in events
    assert ("accepted", b.worker_id) in events
    await _no_more_offers(a)


async def test_job_failure_reported_with_error(srv: Srv) -> None:
    """JS_FAILED ends the job `failed` with the worker's error as its reason."""
    w = await srv.connect("f", max_jobs=1)
    job_id = (await srv.dispatch("f"))["job_id"]
    assert await w.take_job() == job_id
    await w.fail(job_id, "entrypoint raised")
    job = await srv.wait_state(job_id, "failed")
    assert job["reason"] == "entrypoint raised"


# ------------------------------------------------------------- offer timeout


async def test_silent_worker_offer_withdrawn_and_job_moves(make_server: MakeServer) -> None:
    """A silent worker's offer is withdrawn and moved on; its late accept gets nothing."""
    srv = await make_server(_pool("sil", availability_timeout_s=0.2, max_jobs_per_worker=2))
    silent = await srv.connect("sil")
    job_id = (await srv.dispatch("sil"))["job_id"]
    assert (await silent.next_offer()).id == job_id
    good = await srv.connect("sil")
    assert (await good.next_offer(within=3)).id == job_id
    await silent.accept(job_id)  # too late
    await silent.barrier()
    assert silent.pending("assignment") == 0
    await good.accept(job_id)
    await good.next_assignment()
    await good.running(job_id)
    job = await srv.wait_state(job_id, "running")
    events = [(e["event"], e["worker_id"]) for e in job["trace"]]
    assert ("offer_timeout", silent.worker_id) in events
    assert ("late_answer_ignored", silent.worker_id) in events
    assert job["worker_id"] == good.worker_id
    info = srv.dispatcher.worker(silent.worker_id)
    assert info.used == 0


# --------------------------------------------------------------- worker loss


async def test_reconnect_and_migrate_within_grace(make_server: MakeServer) -> None:
    """An orphaned job migrated by a new connection within the grace runs on and finishes."""
    srv = await make_server(_pool("mig", reconnect_grace_s=10.0, max_jobs_per_worker=2))
    old = await srv.connect("mig")
    job_id = (await srv.dispatch("mig"))["job_id"]
    await old.take_job()
    await srv.wait_state(job_id, "running")
    await old.close()
    orphan = await srv.wait_state(job_id, "orphaned")
    assert orphan["worker_id"] == old.worker_id
    new = await srv.connect("mig")
    assert new.worker_id != old.worker_id
    await new.migrate(job_id)
    await new.barrier()
    assert new.pending("termination") == 0
    job = await srv.wait_state(job_id, "running")
    assert job["worker_id"] == new.worker_id
    assert any(e["event"] == "migrated" for e in job["trace"])
    await new.succeed(job_id)
    done = await srv.wait_state(job_id, "succeeded")
    assert done["worker_id"] == new.worker_id


async def test_no_reconnect_ends_worker_lost(make_server: MakeServer) -> None:
    """Without a reconnect within `reconnect_grace_s` the job ends `worker_lost`."""
    srv = await make_server(_pool("lost", reconnect_grace_s=0.2, max_jobs_per_worker=2))
    w = await srv.connect("lost")
    job_id = (await srv.dispatch("lost"))["job_id"]
    await w.take_job()
    await srv.wait_state(job_id, "running")
    await w.close()
    job = await srv.wait_state(job_id, "worker_lost", within=3)
    assert "did not reconnect within 0.2 s" in job["reason"]
    events = [e["event"] for e in job["trace"]]
    assert events[-2:] == ["orphaned", "worker_lost"]


async def test_redispatch_on_worker_loss(make_server: MakeServer) -> None:
    """With `redispatch_on_worker_loss`, a lost job is offered to another worker."""
    srv = await make_server(
        _pool("re", reconnect_grace_s=0.2, redispatch_on_worker_loss=True, max_jobs_per_worker=1)
    )
    first = await srv.connect("re")
    job_id = (await srv.dispatch("re"))["job_id"]
    await first.take_job()
    await srv.wait_state(job_id, "running")
    second = await srv.connect("re")
    await first.close()
    assert (await second.next_offer(within=3)).id == job_id
    await second.accept(job_id)
    await second.next_assignment()
    await second.running(job_id)
    job = await srv.wait_state(job_id, "running")
    assert job["worker_id"] == second.worker_id
    assert "redispatched" in [e["event"] for e in job["trace"]]


async def test_migrate_of_a_job_never_seen_is_adopted(srv: Srv) -> None:
    """After a server restart a worker's migrate names jobs the server never saw: they are
    adopted as running on it (not cut off), and their end is recorded."""
    w = await srv.connect("m", max_jobs=2)
    await w.migrate("AJ_from_before_restart")
    await w.barrier()
    job = await srv.job("AJ_from_before_restart")
    assert job["state"] == "running"
    assert job["worker_id"] == w.worker_id
    assert "adopted" in [ev["event"] for ev in job["trace"]]
    await w.succeed("AJ_from_before_restart")
    await w.barrier()
    assert (await srv.job("AJ_from_before_restart"))["state"] == "succeeded"


async def test_migrate_of_an_ended_job_is_terminated(srv: Srv) -> None:
    """A migrate naming a job the server knows has ended gets a JobTermination: it must
    not run twice."""
    w = await srv.connect("m", max_jobs=2)
    job_id = (await srv.dispatch("m"))["job_id"]
    await w.take_job()
    await w.succeed(job_id)
    await w.barrier()
    assert (await srv.job(job_id))["state"] == "succeeded"
    again = await srv.connect("m", max_jobs=2)
    await again.migrate(job_id)
    assert await again.next_termination() == job_id


async def test_disconnect_with_pending_offer_replaces_job(srv: Srv) -> None:
    """A worker leaving with an unanswered offer: the job goes to another worker at once."""
    a = await srv.connect("po", max_jobs=1)
    job_id = (await srv.dispatch("po"))["job_id"]
    await a.next_offer()
    b = await srv.connect("po", max_jobs=1)
    await a.close()
    assert (await b.next_offer()).id == job_id


async def test_pool_quota_caps_concurrent_jobs(make_server: MakeServer) -> None:
    """`max_concurrent_jobs` queues the job over quota until a pool job ends."""
    srv = await make_server(_pool("q", max_concurrent_jobs=2, max_jobs_per_worker=2))
    a = await srv.connect("q", auto="accept", auto_run=True)
    b = await srv.connect("q", auto="accept", auto_run=True)
    first = (await srv.dispatch("q", wait=True))["job_id"]
    await srv.dispatch("q", wait=True)
    third = (await srv.dispatch("q"))["job_id"]
    job = await srv.job(third)
    assert job["state"] == "queued"
    assert job["trace"][-1]["detail"] == "pool quota reached"
    holder = a if first in srv.dispatcher.worker(a.worker_id).jobs else b
    await holder.succeed(first)
    await srv.wait_state(third, "running")


async def test_delete_offered_job_then_late_accept(srv: Srv) -> None:
    """DELETE of an offered job cancels it at once; a later accept gets no assignment."""
    w = await srv.connect("o", max_jobs=1)
    job_id = (await srv.dispatch("o"))["job_id"]
    await w.next_offer()
    status, body = await srv.call("DELETE", f"/v1/jobs/{job_id}")
    assert (status, body["state"]) == (200, "cancelled")
    await w.accept(job_id)
    await w.barrier()
    assert w.pending("assignment") == 0
    assert srv.dispatcher.worker(w.worker_id).used == 0
    nxt = (await srv.dispatch("o"))["job_id"]
    assert (await w.next_offer()).id == nxt


async def test_disconnect_while_terminating_ends_cancelled(srv: Srv) -> None:
    """A worker that drops a job being terminated: the job ends `cancelled`."""
    w = await srv.connect("t", max_jobs=1)
    job_id = (await srv.dispatch("t"))["job_id"]
    await w.take_job()
    await srv.wait_state(job_id, "running")
    await srv.call("DELETE", f"/v1/jobs/{job_id}")
    await w.next_termination()
    await w.close()
    job = await srv.wait_state(job_id, "cancelled")
    assert "while terminating" in job["reason"]


async def test_worker_reported_draining_gets_no_offers(srv: Srv) -> None:
    """A worker reporting `draining` (WS_FULL, load 0) gets no more offers."""
    a = await srv.connect("dr", max_jobs=2)
    await a.status(full=True, draining=True)
    await a.barrier()
    job_id = (await srv.dispatch("dr"))["job_id"]
    await _no_more_offers(a)
    b = await srv.connect("dr", max_jobs=2)
    assert (await b.next_offer()).id == job_id


async def test_reconnecting_worker_is_not_overfilled_before_migrate(
    make_server: MakeServer,
) -> None:
    """A reconnecting cap-1 worker is never offered a queued job on top of its migrated one."""
    srv = await make_server(_pool("rc", max_jobs_per_worker=1, reconnect_grace_s=10.0))
    old = await srv.connect("rc")
    running = (await srv.dispatch("rc"))["job_id"]
    await old.take_job()
    await srv.wait_state(running, "running")
    queued = (await srv.dispatch("rc"))["job_id"]
    await old.close()
    await srv.wait_state(running, "orphaned")
    new = await srv.connect("rc")
    await new.migrate(running)
    await srv.wait_state(running, "running")
    await _no_more_offers(new)
    w = srv.dispatcher.worker(new.worker_id)
    assert w.used == 1
    assert w.capacity == 1
    await new.succeed(running)
    assert (await new.next_offer()).id == queued
