"""Prometheus metrics, built with prometheus-client on a per-app registry.

Counters and gauges are read through the dispatcher's queries at scrape time
(a custom collector), so the hot path pays nothing for them; only the two latency
histograms are observed as jobs are placed and end.

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trunkline.core import Job, JobState
from trunkline.core.autoscale import PoolScaler, ReplicaState
from trunkline.core.entities import WORKER_STATES
from trunkline.core.pool import Pool

_LIVE_STATES = tuple(s for s in JobState if not s.terminal)

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Cluster mode: a pool's gauges (queue, slots, workers, active jobs,
        # replicas) only while this member owns it, so that summing every
        # member's scrape counts each pool once (docs/cluster.md). None: all.
        self.owns: Callable[[str], bool] | None = None
        self.queue_wait = Histogram(
            "trunkline_queue_wait_seconds",
            "Time jobs spent queued for a free slot, observed when they leave the queue.",
            ["pool"],
            registry=self.registry,
            buckets=_BUCKETS,
        )
        self.placement_latency = Histogram(
            "trunkline_placement_latency_seconds",
            "Request to placement (a worker accepted and the assignment was sent).",
            ["pool"],
            registry=self.registry,
            buckets=_BUCKETS,
        )
        # pool -> its child of each histogram: `labels()` validates and looks
        # the label up under a lock on every call, twice per job. Nothing
        # removes a child, so a cached one stays the one the registry exports.
        # (Two maps: a pool gets a child only where it was observed, as before.)
        self._placement: dict[str, Histogram] = {}
        self._queue_wait: dict[str, Histogram] = {}

    def bind(self, source: DispatchView) -> None:
        """Read pools, jobs and counters from `source` (the dispatcher) at scrape time."""
        self.registry.register(_DispatchCollector(source, lambda: self.owns))

    def bind_sip(self, stats: _HasAsDict) -> None:
        self.registry.register(_SipCollector(stats))

    def bind_autoscale(self, scalers: Callable[[], Mapping[str, PoolScaler]]) -> None:
        self.registry.register(_AutoscaleCollector(scalers, lambda: self.owns))

    def placed(self, job: Job) -> None:
        if job.placed_at is not None:
            pool = job.agent_name
            placement = self._placement.get(pool)
            if placement is None:
                placement = self._placement[pool] = self.placement_latency.labels(pool)
            placement.observe(job.placed_at - job.created_at)
            self._queue_wait_of(pool).observe(job.queue_wait_s)

    def ended(self, job: Job) -> None:
        if job.placed_at is None and job.state is JobState.NO_CAPACITY:
            self._queue_wait_of(job.agent_name).observe(job.queue_wait_s)

    def _queue_wait_of(self, pool: str) -> Histogram:
        child = self._queue_wait.get(pool)
        if child is None:
            child = self._queue_wait[pool] = self.queue_wait.labels(pool)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DispatchView(Protocol):
    """The dispatcher queries the collector reads."""

    def pools(self) -> Iterable[Pool]: ...

    def live_jobs(self) -> Iterable[Job]: ...

    def counters(
        self,
    ) -> tuple[Iterable[tuple[str, int]], Iterable[tuple[tuple[str, str], int]]]: ...

    def offer_answers(self) -> Iterable[tuple[tuple[str, str], int]]: ...


class _HasAsDict(Protocol):
    responses: Counter[int]

    def as_dict(self) -> dict[str, int]: ...


class _SipCollector(Collector):
    """The SIP edge's counters (INVITEs, placed, refused, retransmissions...)."""

    def __init__(self, stats: _HasAsDict) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        events = CounterMetricFamily(
            "trunkline_sip_events",
            "SIP edge events: invites, retransmissions, placed, refused, cancelled, released, "
            "bad_requests (answered 400), dropped (unanswerable input), ...",
            labels=["event"],
        )
        for name, n in sorted(self._stats.as_dict().items()):
            events.add_metric([name], n)
        responses = CounterMetricFamily(
            "trunkline_sip_responses",
            "SIP responses sent by the edge, by status code (retransmissions included).",
            labels=["code"],
        )
        for code, n in sorted(self._stats.responses.items()):
            responses.add_metric([str(code)], n)
        yield events
        yield responses


class _AutoscaleCollector(Collector):
    """Replicas by state and scale events by kind, per autoscaled pool."""

    def __init__(
        self,
        scalers: Callable[[], Mapping[str, PoolScaler]],
        owns: Callable[[], Callable[[str], bool] | None],
    ) -> None:
        self._scalers = scalers
        self._owns = owns

    def collect(self) -> Iterable[Metric]:
        replicas = GaugeMetricFamily(
            "trunkline_replicas", "Replicas of autoscaled pools by state.", labels=["pool", "state"]
        )
        events = CounterMetricFamily(
            "trunkline_scale_events",
            "Scaling decisions by kind (up, down, replace, failed).",
            labels=["pool", "kind"],
        )
        owns = self._owns()
        for name, scaler in sorted(self._scalers().items()):
            if owns is None or owns(name):
                counts = dict.fromkeys(ReplicaState, 0)
                for r in scaler.replicas.values():
                    counts[r.state] += 1
                for state, n in counts.items():
                    replicas.add_metric([name, state.value], n)
            for kind, n in sorted(scaler.event_kinds.items()):
                events.add_metric([name, kind], n)
        yield replicas
        yield events


class _DispatchCollector(Collector):
    def __init__(
        self, source: DispatchView, owns: Callable[[], Callable[[str], bool] | None]
    ) -> None:
        self._source = source
        self._owns = owns

    def collect(self) -> Iterable[Metric]:
        src = self._source
        requested_n, ended_n = src.counters()
        ended_items = sorted(ended_n)
        requested = CounterMetricFamily(
            "trunkline_jobs_requested", "Session requests received.", labels=["pool"]
        )
        for pname, n in sorted(requested_n):
            requested.add_metric([pname], n)
        ended = CounterMetricFamily(
            "trunkline_jobs_ended",
            "Jobs that reached a terminal state.",
            labels=["pool", "outcome"],
        )
        for (pname, outcome), n in ended_items:
            ended.add_metric([pname, outcome], n)
        refusals = CounterMetricFamily(
            "trunkline_refusals",
            "Requests refused for lack of capacity (jobs ended no_capacity).",
            labels=["pool", "reason"],
        )
        for (pname, outcome), n in ended_items:
            if outcome == JobState.NO_CAPACITY.value:
                refusals.add_metric([pname, "no_capacity"], n)
        offers = CounterMetricFamily(
            "trunkline_offers", "Offers by how they were answered.", labels=["pool", "answer"]
        )
        for (pname, answer), n in sorted(src.offer_answers()):
            offers.add_metric([pname, answer], n)

        queue = GaugeMetricFamily(
            "trunkline_queue_depth", "Jobs waiting for a slot.", labels=["pool"]
        )
        slots = GaugeMetricFamily(
            "trunkline_worker_slots",
            "Worker slots: used (running), reserved (offered or accepted, not yet running), "
            "free (offerable now).",
            labels=["pool", "state"],
        )
        workers = GaugeMetricFamily(
            "trunkline_workers", "Connected workers by state.", labels=["pool", "state"]
        )
        active = GaugeMetricFamily(
            "trunkline_jobs_active", "Live jobs by state.", labels=["pool", "state"]
        )
        live = Counter((job.agent_name, job.state) for job in src.live_jobs())
        owns = self._owns()
        for pool in sorted(src.pools(), key=lambda p: p.name):
            name = pool.name
            if owns is not None and not owns(name):
                continue  # its owner exports it
            queue.add_metric([name], pool.queued)
            used = sum(w.running for w in pool.workers.values())
            reserved = sum(w.used for w in pool.workers.values()) - used
            slots.add_metric([name, "used"], used)
            slots.add_metric([name, "reserved"], reserved)
            slots.add_metric([name, "free"], pool.free_slots())
            by_state = Counter(w.state for w in pool.workers.values())
            for state in WORKER_STATES:
                workers.add_metric([name, state], by_state[state])
            for st in _LIVE_STATES:
                active.add_metric([name, st.value], live[(name, st)])
        yield from (requested, ended, refusals, offers, queue, slots, workers, active)
