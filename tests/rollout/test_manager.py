"""The rollout manager (runtime/rollout.py) on the fake provider: the planner's
actions carried out through the autoscaler's PoolScaler, the provider and the
Dispatcher, with workers "registering" when the test says their replica is up."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from support import wait_until

from trunkline.config import ReplicaPoolConfig, parse_config, replica_version
from trunkline.providers.fake import FakeBackend, FakeProvider
from trunkline.runtime.autoscaler import AutoscaleController
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.rollout import RolloutManager


class _Link:
    def send(self, frame: bytes) -> None:
        pass

    async def close(self, message: bytes) -> None:
        pass


def _setup(
    backend: FakeBackend, min_replicas: int = 2, **rollout: Any
) -> tuple[AutoscaleController, RolloutManager]:
    config = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {
                "p": {
                    "command": ["agent", "A"],
                    "max_jobs_per_worker": 2,
                    "min_replicas": min_replicas,
                    "max_replicas": 4,
                    "rollout": rollout,
                }
            },
        }
    )
    d = Dispatcher(config, Metrics())
    d.start(asyncio.get_running_loop())
    ctl = AutoscaleController(
        d,
        config.replica_pools,
        {"local": FakeProvider(backend)},
        url="ws://x",
        api_key="k",
        api_secret="s",
    )
    return ctl, RolloutManager(ctl)


def _version(rp: ReplicaPoolConfig, *command: str) -> ReplicaPoolConfig:
    return dataclasses.replace(
        rp, command=command, version=replica_version(command, rp.env, rp.provider)
    )


def _connect_all(ctl: AutoscaleController, backend: FakeBackend, done: set[str]) -> None:
    """Every launched replica still live whose worker has not registered does so."""
    for launch in backend.launches:
        rid = launch.replica_id
        if rid in backend.live and rid not in done:
            done.add(rid)
            ctl.dispatcher.worker_connected(_Link(), f"AW_{rid}", "p", None, launch.token)


def _serving(ctl: AutoscaleController) -> list[str]:
    return [
        ctl.versions[r.id]
        for r in ctl.scalers["p"].replicas.values()
        if r.state.value in ("starting", "ready")
    ]


async def test_a_rolling_update_keeps_capacity_and_ends_on_the_new_version() -> None:
    """A -> B with surge 1 and 2 replicas: never more than 3 serving, no A replica
    drained before a B one is ready, B workers are tagged B, and it ends done
    with both replicas on B and the route cleared."""
    backend = FakeBackend()
    ctl, m = _setup(backend)
    await ctl.start()
    up: set[str] = set()
    try:
        await wait_until(lambda: len(backend.launches) == 2, 5, what="the minimum starts")
        _connect_all(ctl, backend, up)
        rp = ctl.pools["p"]
        a = rp.version
        new = _version(rp, "agent", "B")
        said = m.apply("p", new)
        assert "started (rolling)" in said, said
        peak = 0
        for _ in range(200):
            await asyncio.sleep(0)
            peak = max(peak, len(_serving(ctl)))
            draining = [
                r for r in ctl.scalers["p"].replicas.values() if r.state.value == "draining"
            ]
            ready_b = [
                r
                for r in ctl.scalers["p"].replicas.values()
                if r.state.value == "ready" and ctl.versions[r.id] == new.version
            ]
            assert len(draining) <= len(ready_b), (draining, ready_b)
            _connect_all(ctl, backend, up)
            if not m.rollouts["p"].active:
                break
        ro = m.rollouts["p"]
        assert ro.phase.value == "done", [e.detail for e in ro.events]
        assert peak == 3
        assert _serving(ctl) == [new.version, new.version]
        pool = ctl.dispatcher.pool("p")
        assert pool is not None
        assert set(pool.groups.values()) == {new.version}
        assert pool.route_group is None
        assert ro.old == a
        assert [launch.command for launch in backend.launches[2:]] == [("agent", "B")] * 2
        assert all(launch.version == new.version for launch in backend.launches[2:])
    finally:
        await ctl.close(0.1)


async def test_a_new_version_whose_replicas_crash_is_stopped_with_the_reason() -> None:
    """B's replicas exit at once: after max_start_failures the rollout stops by
    itself, the reason names the failure, and the pool serves on A."""
    backend = FakeBackend()
    backend.exit_codes["crash"] = 3
    ctl, m = _setup(backend, max_start_failures=2)
    await ctl.start()
    up: set[str] = set()
    try:
        await wait_until(lambda: len(backend.launches) == 2, 5, what="the minimum starts")
        _connect_all(ctl, backend, up)
        a = ctl.pools["p"].version
        m.apply("p", _version(ctl.pools["p"], "crash"))

        def stopped() -> bool:
            _connect_all(ctl, backend, up)
            return not m.rollouts["p"].active

        await wait_until(stopped, 20, what="the rollout stops itself")
        ro = m.rollouts["p"]
        assert ro.phase.value == "rolled_back"
        assert "replicas of version" in ro.reason
        assert "exited with code 3" in ro.reason, ro.reason
        assert [e.kind for e in ro.events if e.kind == "stopped"] == ["stopped"]
        assert _serving(ctl) == [a, a]
        assert m.version("p") == a
        info = m.rollout_json("p")
        assert info is not None
        assert info["reason"] == ro.reason
    finally:
        await ctl.close(0.1)


async def test_adopted_replicas_keep_their_version_and_their_workers_are_tagged() -> None:
    """A restarted server learns each adopted replica's version from its handle
    (no launch), tags its worker, and resumes the rollout from that version to
    the configured one by itself."""
    backend = FakeBackend()
    backend.add_existing("p-1", "p", "tok-1", version="old0")
    backend.add_existing("p-2", "p", "tok-2", version="old0")
    ctl, m = _setup(backend)
    await ctl.start()
    try:
        assert ctl.versions["p-1"] == ctl.versions["p-2"] == "old0"
        assert backend.stops == []  # not retired while their workers may hold calls
        states = {r.id: r.state.value for r in ctl.scalers["p"].replicas.values()}
        assert states["p-1"] == states["p-2"] == "starting"
        d = ctl.dispatcher
        d.worker_connected(_Link(), "AW_1", "p", None, "tok-1")
        pool = d.pool("p")
        assert pool is not None
        assert pool.groups == {"AW_1": "old0"}
        assert [r["version"] for r in ctl.replicas_json("p")][:2] == ["old0", "old0"]
        # Once the new version's replicas are up, the adopted ones are retired.
        await wait_until(lambda: backend.launches, 5, what="a replica of the new version")
        for launch in backend.launches:
            d.worker_connected(_Link(), f"AW_{launch.replica_id}", "p", None, launch.token)
        d.worker_connected(_Link(), "AW_2", "p", None, "tok-2")
        await wait_until(lambda: backend.stops, 5, what="an adopted replica is retired")
        await wait_until(lambda: "p" in m.rollouts, 5, what="the rollout resumes")
        ro = m.rollouts["p"]
        assert (ro.old, ro.new) == ("old0", ctl.pools["p"].version)
        assert "already in progress" in m.begin("p")
    finally:
        await ctl.close(0.1)


async def test_a_canary_then_a_new_share_then_promote() -> None:
    """begin with a canary share, begin again with another (the share changes,
    no second rollout), promote: it rolls on."""
    backend = FakeBackend()
    ctl, m = _setup(backend, min_replicas=4)
    await ctl.start()
    try:
        await wait_until(lambda: len(backend.launches) == 4, 5, what="the minimum starts")
        c = ctl.pools["p"] = _version(ctl.pools["p"], "agent", "B")
        ctl.configs["p"][c.version] = c
        assert "started (canary)" in m.begin("p", 25)
        ro = m.rollouts["p"]
        assert "now takes 50 %" in m.begin("p", 50)
        assert m.rollouts["p"] is ro
        assert ro.canary_percent == 50
        assert "promoted" in m.promote("p")
        assert ro.phase.value == "rolling"
        assert "aborted" in m.abort("p")
        assert ro.phase.value in ("rolling_back", "rolled_back")
    finally:
        await ctl.close(0.1)


async def test_replicas_of_unknown_version_do_not_start_a_rollout() -> None:
    """Adopted replicas recorded without a version (an older server's) stay."""
    backend = FakeBackend()
    backend.add_existing("p-1", "p", "tok-1")
    backend.add_existing("p-2", "p", "tok-2")
    ctl, m = _setup(backend)
    await ctl.start()
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        assert "p" in m._checked
        assert m.rollouts == {}
        assert backend.launches == []
    finally:
        await ctl.close(0.1)


async def test_metrics_show_replicas_by_version_and_the_rollout() -> None:
    """/metrics: trunkline_replica_versions, trunkline_pool_version, trunkline_rollout."""
    backend = FakeBackend()
    ctl, m = _setup(backend)
    await ctl.start()
    try:
        await wait_until(lambda: len(backend.launches) == 2, 5, what="the minimum starts")
        m.apply("p", _version(ctl.pools["p"], "agent", "B"))
        await asyncio.sleep(0)
        text = ctl.dispatcher.metrics.render().decode()
        a = m.rollouts["p"].old
        b = m.rollouts["p"].new
        # A's replicas were still starting: retired at once; B's two start.
        assert f'trunkline_replica_versions{{pool="p",state="draining",version="{a}"}} 2.0' in text
        assert f'trunkline_replica_versions{{pool="p",state="starting",version="{b}"}} 2.0' in text
        assert f'trunkline_pool_version{{pool="p",version="{b}"}} 1.0' in text
        assert f'trunkline_rollout{{from="{a}",phase="rolling",pool="p",to="{b}"}} 1.0' in text
    finally:
        await ctl.close(0.1)
