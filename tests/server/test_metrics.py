"""`/metrics`: values a short scripted run implies, parsed as Prometheus text."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from server.conftest import MakeServer
from server.helpers import Srv
from support import wait_until


class Scrape:
    """One parsed scrape: `value(sample_name, **labels)`."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels}"
        return self.samples[key]

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


async def scrape(srv: Srv) -> Scrape:
    return Scrape(await srv.metrics_text())


async def test_metrics_after_burst_over_capacity(make_server: MakeServer) -> None:
    """13 dispatches at one cap-4 worker: metrics show 4 placed, 9 queued then refused."""
    srv = await make_server({"pools": {"m": {"max_jobs_per_worker": 4}}})
    w = await srv.connect("m", auto="accept", auto_run=True)
    jobs = [(await srv.dispatch("m", max_wait_s=1.0))["job_id"] for _ in range(13)]
    running, queued = jobs[:4], jobs[4:]

    # While the overflow waits: 9 queued, the 4 first placed.
    for job_id in running:
        await srv.wait_state(job_id, "running")
    m = await scrape(srv)
    assert m.value("trunkline_queue_depth", pool="m") == 9
    assert m.value("trunkline_jobs_requested_total", pool="m") == 13
    assert m.value("trunkline_jobs_active", pool="m", state="queued") == 9
    assert m.value("trunkline_jobs_active", pool="m", state="running") == 4

    async def all_refused() -> bool:
        _, body = await srv.call("GET", "/v1/jobs?state=no_capacity")
        return len(body["jobs"]) == 9

    await wait_until(all_refused, 5, 0.02, "9 jobs end no_capacity")
    for job_id in queued:
        assert (await srv.job(job_id))["state"] == "no_capacity"

    m = await scrape(srv)
    assert m.value("trunkline_jobs_requested_total", pool="m") == 13
    assert m.value("trunkline_jobs_ended_total", pool="m", outcome="no_capacity") == 9
    assert m.value("trunkline_refusals_total", pool="m", reason="no_capacity") == 9
    assert m.value("trunkline_offers_total", pool="m", answer="accept") == 4
    offer_answers = {
        dict(labels)["answer"] for (name, labels) in m.samples if name == "trunkline_offers_total"
    }
    assert offer_answers == {"accept"}
    assert m.value("trunkline_queue_depth", pool="m") == 0
    assert m.value("trunkline_worker_slots", pool="m", state="used") == 4
    assert m.value("trunkline_worker_slots", pool="m", state="reserved") == 0
    assert m.value("trunkline_worker_slots", pool="m", state="free") == 0
    assert m.value("trunkline_workers", pool="m", state="available") == 1
    assert m.value("trunkline_workers", pool="m", state="full") == 0
    assert m.value("trunkline_jobs_active", pool="m", state="running") == 4
    assert m.value("trunkline_placement_latency_seconds_count", pool="m") == 4
    # Queue wait is observed for every job that left the queue: 4 placed + 9 refused.
    assert m.value("trunkline_queue_wait_seconds_count", pool="m") == 13
    assert m.value("trunkline_queue_wait_seconds_bucket", pool="m", le="+Inf") == 13
    # The 9 refused waited their full second.
    assert m.value("trunkline_queue_wait_seconds_sum", pool="m") >= 9 * 1.0

    # Two jobs succeed, one fails: outcomes and slots follow.
    await w.succeed(running[0])
    await w.succeed(running[1])
    await w.fail(running[2], "crash")
    await srv.wait_state(running[2], "failed")
    m = await scrape(srv)
    assert m.value("trunkline_jobs_ended_total", pool="m", outcome="succeeded") == 2
    assert m.value("trunkline_jobs_ended_total", pool="m", outcome="failed") == 1
    assert m.value("trunkline_worker_slots", pool="m", state="used") == 1
    assert m.value("trunkline_worker_slots", pool="m", state="free") == 3


async def test_metrics_reserved_slots_and_offer_outcomes(make_server: MakeServer) -> None:
    """Unanswered offers are reserved slots; offers are counted by how they were answered."""
    srv = await make_server(
        {"pools": {"r": {"max_jobs_per_worker": 3, "availability_timeout_s": 0.2}}}
    )
    w = await srv.connect("r")
    j1 = (await srv.dispatch("r"))["job_id"]
    j2 = (await srv.dispatch("r"))["job_id"]
    await w.next_offer()
    await w.next_offer()
    m = await scrape(srv)
    assert m.value("trunkline_worker_slots", pool="r", state="reserved") == 2
    assert m.value("trunkline_worker_slots", pool="r", state="used") == 0
    assert m.value("trunkline_worker_slots", pool="r", state="free") == 1
    await w.reject(j1, terminate=True)
    await srv.wait_state(j1, "rejected")
    # j2 is left unanswered: it times out, then comes back (the worker is alone).
    again = await w.next_offer(within=3)
    assert again.id == j2
    await w.reject(j2, terminate=False)
    await w.barrier()
    m = await scrape(srv)
    assert m.value("trunkline_offers_total", pool="r", answer="reject_terminate") == 1
    assert m.value("trunkline_offers_total", pool="r", answer="timeout") == 1
    assert m.value("trunkline_offers_total", pool="r", answer="reject") == 1
    assert m.value("trunkline_jobs_ended_total", pool="r", outcome="rejected") == 1
    assert m.value("trunkline_workers", pool="r", state="benched") == 1
    await w.status(full=True)
    await w.barrier()
    m = await scrape(srv)
    assert m.value("trunkline_workers", pool="r", state="full") == 1


async def test_metrics_endpoint_needs_no_token(srv: Srv) -> None:
    """/metrics is Prometheus text, served without auth, even with no pools."""
    async with srv.session.get(srv.url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    names = Scrape(text).names()
    assert "trunkline_jobs_requested_total" not in names  # nothing requested yet
    await asyncio.gather(srv.dispatch("x", max_wait_s=0), srv.dispatch("x", max_wait_s=0))
    m = await scrape(srv)
    assert m.value("trunkline_jobs_requested_total", pool="x") == 2
    assert m.value("trunkline_refusals_total", pool="x", reason="no_capacity") == 2
