"""The autoscale controller on a fake provider: a restarted server adopts the
replicas an earlier run left instead of starting duplicates or killing them."""

from __future__ import annotations

import asyncio

from support import wait_until

from trunkline.config import parse_config
from trunkline.providers.fake import FakeBackend, FakeProvider
from trunkline.runtime.autoscaler import AutoscaleController
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics


class _Link:
    def send(self, frame: bytes) -> None:
        pass

    async def close(self, message: bytes) -> None:
        pass


def _controller(provider: FakeProvider, min_replicas: int) -> AutoscaleController:
    config = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {
                "p": {
                    "command": ["agent"],
                    "max_jobs_per_worker": 2,
                    "min_replicas": min_replicas,
                    "max_replicas": 4,
                }
            },
        }
    )
    d = Dispatcher(config, Metrics())
    d.start(asyncio.get_running_loop())
    return AutoscaleController(
        d, config.replica_pools, {"local": provider}, url="ws://x", api_key="k", api_secret="s"
    )


async def test_restarted_controller_adopts_live_replicas_and_starts_no_duplicate() -> None:
    """Two replicas left by an earlier run are adopted (not started again, not
    stopped); a min of 2 is then met without a launch, their workers reconnect
    with the same tokens and make them ready, and new replica ids continue past
    theirs."""
    backend = FakeBackend()
    backend.add_existing("p-1", "p", "tok-1")
    backend.add_existing("p-7", "p", "tok-7")
    ctl = _controller(FakeProvider(backend), min_replicas=2)
    await ctl.start()
    try:
        scaler = ctl.scalers["p"]
        assert sorted(scaler.replicas) == ["p-1", "p-7"]
        assert backend.launches == []
        assert backend.stops == []
        d = ctl.dispatcher
        d.worker_connected(_Link(), "AW_1", "p", None, "tok-1")
        d.worker_connected(_Link(), "AW_7", "p", None, "tok-7")
        assert {r.state.value for r in scaler.replicas.values()} == {"ready"}
        # Demand for a third replica: the new one is named past the adopted ids.
        for _ in range(5):
            d.request("p")
        await wait_until(lambda: backend.launches, 5, what="a new replica is launched")
        assert [launch.replica_id for launch in backend.launches] == ["p-8"]
        # An adopted replica that exits is reported once and replaced.
        backend.exit("p-1", 0)
        await wait_until(lambda: scaler.replicas["p-1"].state.value != "ready", 5, what="exit")
    finally:
        await ctl.close(0.1)


async def test_a_replica_that_died_while_no_server_ran_is_not_adopted() -> None:
    """Only live replicas are adopted: one that is gone is started afresh."""
    backend = FakeBackend()
    backend.add_existing("p-1", "p", "tok-1")
    backend.exit("p-1", 0)
    ctl = _controller(FakeProvider(backend), min_replicas=1)
    await ctl.start()
    try:
        await wait_until(lambda: backend.launches, 5, what="the minimum replica is launched")
        assert [launch.replica_id for launch in backend.launches] == ["p-1"]
    finally:
        await ctl.close(0.1)
