"""Property: whatever the interleaving of demand, calls ending, pods dying, watch
drops, expired watches and API outages, the Kubernetes provider driven by the
autoscaling policy (`PoolScaler`) never deletes a pod that holds a call before
the drain limit, never reports a replica gone while its pod still runs, and
reports each replica's end exactly once.

The policy runs on a fake clock (the test advances it); the provider and the
fake cluster (simulated containers) run for real on the loop. Calls are a
model: each is placed on a ready, undrained replica with a free slot, like the
scheduler does, and is lost when its replica ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from providers.k8s.harness import Cluster, fake_cluster, phase

from trunkline.core.autoscale import (
    Demand,
    DrainReplica,
    PoolScaler,
    ReplicaState,
    ScaleSpec,
    StartReplica,
    StopReplica,
)
from trunkline.providers import Launch, ProviderError
from trunkline.providers.kubernetes import KubernetesProvider, KubernetesReplica

CAP = 2
SPEC = ScaleSpec(
    slots_per_replica=CAP,
    min_replicas=1,
    max_replicas=4,
    scale_down_delay_s=5.0,
    drain_timeout_s=30.0,
    start_timeout_s=60.0,
    stop_grace_s=1.0,
)

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("calls"), st.integers(1, 5)),
        st.tuples(st.just("hangup"), st.integers(1, 5)),
        st.tuples(st.just("tick"), st.sampled_from([1, 4, 6, 31])),
        st.tuples(st.just("crash"), st.integers(0, 3)),
        st.tuples(st.just("drop"), st.just(0)),
        st.tuples(st.just("expire"), st.integers(0, 10**6)),
        st.tuples(st.just("outage"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=14,
)


class World:
    """The policy, the provider and the call model, glued like the controller."""

    def __init__(self, cluster: Cluster, provider: KubernetesProvider) -> None:
        self.c = cluster
        self.p = provider
        self.scaler = PoolScaler("support", SPEC)
        self.now = 0.0
        self.handles: dict[str, KubernetesReplica] = {}
        self.calls: dict[str, int] = {}  # replica id -> calls held
        self.queued = 0
        self.ends: dict[str, list[tuple[int | None, str]]] = {}
        self.violations: list[str] = []
        self.expired = 0
        self.closing = False  # shutdown stops every replica, calls or not
        cluster.api.store.subscribe(self._check_event)

    # -------------------------------------------------------------- checks

    def _rid_of(self, pod: str) -> str | None:
        for rid, h in self.handles.items():
            if h.pod == pod:
                return rid
        return None

    def _check_event(self, ev: Any) -> None:
        """A pod got a deletionTimestamp (or went at once): was that allowed?"""
        if ev.resource != "pods":
            return
        meta = ev.obj["metadata"]
        deleting = ev.type == "DELETED" or meta.get("deletionTimestamp")
        rid = self._rid_of(meta["name"])
        if not deleting or rid is None or rid in self.ends or self.closing:
            return
        held = self.calls.get(rid, 0)
        r = self.scaler.replicas.get(rid)
        started = r.drain_started_at if r is not None else None
        if held and (started is None or self.now < started + SPEC.drain_timeout_s):
            self.violations.append(
                f"pod of {rid} deleted holding {held} calls at t={self.now} (drain from {started})"
            )

    def check_bookkeeping(self) -> None:
        running = set(self.c.kubelet.running())
        for rid, h in self.handles.items():
            n = len(self.ends.get(rid, []))
            if n > 1:
                self.violations.append(f"{rid} reported gone {n} times: {self.ends[rid]}")
            if n and h.pod in running:
                self.violations.append(f"{rid} reported gone while its pod runs")

    # --------------------------------------------------------------- glue

    def on_exit(self, rid: str) -> Any:
        def cb(code: int | None, detail: str) -> None:
            self.ends.setdefault(rid, []).append((code, detail))
            self.calls.pop(rid, None)  # its calls are lost with it
            self.scaler.replica_exited(self.now, rid, code, detail)

        return cb

    def demand(self) -> tuple[Demand, dict[str, int]]:
        running = sum(self.calls.values())
        return Demand(running=running, queued=self.queued), dict(self.calls)

    def place(self) -> None:
        for r in self.scaler.replicas.values():
            if r.state is ReplicaState.READY and r.id not in self.ends:
                free = CAP - self.calls.get(r.id, 0)
                take = min(free, self.queued)
                if take > 0:
                    self.calls[r.id] = self.calls.get(r.id, 0) + take
                    self.queued -= take

    async def evaluate(self) -> None:
        for _ in range(3):  # a start's pod turning ready can change the next decision
            self.mark_ready()
            self.place()
            self.scaler.evaluate(self.now, *self.demand())
            actions = self.scaler.take_actions()
            if not actions:
                return
            for a in actions:
                if isinstance(a, StartReplica):
                    rid = a.replica.id
                    la = Launch(rid, "support", ("agent",), {}, f"tok-{rid}")
                    try:
                        self.handles[rid] = await self.p.start(la, self.on_exit(rid))
                    except ProviderError as exc:
                        self.scaler.replica_exited(self.now, rid, None, str(exc))
                elif isinstance(a, DrainReplica):
                    pass  # `place` offers nothing to a DRAINING replica
                else:
                    assert isinstance(a, StopReplica)
                    h = self.handles.get(a.replica.id)
                    if h is not None:
                        await self.p.stop(h, a.grace_s)
            await self.settle()

    def mark_ready(self) -> None:
        for rid, h in self.handles.items():
            r = self.scaler.replicas.get(rid)
            pod = self.c.api.store.get("pods", "default", h.pod)
            if r is not None and r.state is ReplicaState.STARTING and phase(pod) == "Running":
                self.scaler.replica_ready(self.now, rid, rid)

    async def settle(self) -> None:
        """Until the provider has seen every change and nothing moves any more."""
        quiet = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while quiet < 3:
            caught_up = self.p.reachable and self.p._rv == self.c.api.store.version
            quiet = quiet + 1 if caught_up else 0
            if loop.time() > deadline:
                raise AssertionError("the provider never caught up with the cluster")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.c.api.store.changed.wait(), 0.01)

    # ----------------------------------------------------------------- ops

    async def do(self, op: Op) -> None:
        kind, n = op
        live = [rid for rid, h in self.handles.items() if h.pod in self.c.kubelet.running()]
        if kind == "calls":
            self.queued += n
        elif kind == "hangup":
            for rid in list(self.calls):
                while n and self.calls[rid]:
                    self.calls[rid] -= 1
                    n -= 1
        elif kind == "tick":
            self.now += n
        elif kind == "crash" and live:
            self.c.kubelet.exit(self.handles[live[n % len(live)]].pod, 1)
        elif kind == "drop":
            self.c.api.drop_watches()
        elif kind == "expire":
            # A change the watch has not seen yet, then compaction: its version
            # is now too old, so the resumed watch gets 410 and relists.
            self.c.api.store.create("configmaps", "default", {"metadata": {"name": f"x{n}"}})
            self.c.api.compact()
            self.c.api.drop_watches()
            self.expired += 1
        elif kind == "outage":
            await self.c.api.outage()
            if live and n:
                self.c.kubelet.exit(self.handles[live[n % len(live)]].pod, 137)
            await self.evaluate_offline()
            await self.c.api.restore()
        await self.settle()
        await self.evaluate()
        self.check_bookkeeping()

    async def evaluate_offline(self) -> None:
        """The policy goes on deciding while the API server is away: stops are
        queued by the provider, starts fail."""
        self.now += 1
        self.scaler.evaluate(self.now, *self.demand())
        for a in self.scaler.take_actions():
            if isinstance(a, StopReplica) and a.replica.id in self.handles:
                await self.p.stop(self.handles[a.replica.id], a.grace_s)
            elif isinstance(a, StartReplica):
                self.scaler.replica_exited(self.now, a.replica.id, None, "API server unreachable")


async def scenario(tmp: Path, steps: list[Op]) -> None:
    async with fake_cluster(tmp, simulated=True, bookmark_interval_s=0.05) as cluster:
        p = cluster.provider({"support": cluster.template()}, request_budget_s=0.3)
        world = World(cluster, p)
        try:
            await world.evaluate()
            for op in steps:
                await world.do(op)
                assert not world.violations, (op, world.violations)
        finally:
            world.closing = True
            await p.aclose(1)
        world.check_bookkeeping()
        assert not world.violations, world.violations
        for rid in world.handles:
            assert len(world.ends.get(rid, [])) == 1, (rid, world.ends.get(rid))


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=ops)
def test_no_pod_holding_a_call_goes_before_the_drain_limit_and_each_end_is_reported_once(
    steps: list[Op],
) -> None:
    """Random interleavings of demand, hang-ups, time, pod deaths, watch drops,
    410s and outages: deletes only hit pods without calls (or past the drain
    limit), no replica is reported gone while its pod runs, each end once."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), steps))
