"""The bridge against the LiveKit double, driven by the protocol-level test
worker behind trunkline (both servers in the test's loop): the answer window,
hard refusals, the relayed answer and assignment, termination from upstream,
upstream reconnects, and the bridge's config keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from livekit.lk_double import LiveKitDouble
from livekit.lk_thread import UP_KEY, UP_SECRET
from livekit.protocol import agent, models
from protoworker import ProtoWorker
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.config import ConfigError, parse_config
from trunkline.runtime.bridge import Bridge
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.server.app import build_app


class Rig:
    def __init__(self, double: LiveKitDouble, server: TestServer) -> None:
        self.double = double
        self.server = server
        self.url = str(server.make_url("")).rstrip("/")

    @staticmethod
    def job(name: str) -> agent.Job:
        return agent.Job(
            id=f"AJ_{name}", type=agent.JT_ROOM, room=models.Room(name=f"room-{name}", sid="RM_1"),
            agent_name="bot", metadata=name,
        )  # fmt: skip

    async def available(self) -> None:
        """Wait until the bridge reports upstream that it can take a job."""

        def ok() -> bool:
            ws = list(self.double.workers.values())
            return bool(ws) and all(
                w.status == agent.WorkerStatus.WS_AVAILABLE and w.load < 0.7 for w in ws
            )

        await wait_until(ok, 10, what="the bridge reports WS_AVAILABLE")

    async def tl_job(self, job_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{self.url}/v1/jobs/{job_id}", headers=headers) as resp,
        ):
            data: dict[str, Any] = await resp.json()
            return data


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig() -> AsyncIterator[MakeRig]:
    started: list[tuple[LiveKitDouble, TestServer]] = []

    async def make(
        window: float = 0.6,
        honour_migrate: bool = False,
        connections: int = 1,
        cap: int = 1,
        **pool: Any,
    ) -> Rig:
        double = LiveKitDouble(
            UP_KEY, UP_SECRET, affinity_wait_s=0.0, honour_migrate=honour_migrate
        )
        await double.start()
        cfg = {
            "keys": {KEY: SECRET},
            "livekit": {
                "url": double.ws_url, "api_key": UP_KEY, "api_secret": UP_SECRET,
                "bridge": True, "bridge_answer_window_s": window,
                "bridge_connections": connections,
            },
            "pools": {"bot": {"max_jobs_per_worker": cap, **pool}},
        }  # fmt: skip
        ts = TestServer(build_app(parse_config(cfg)), host="127.0.0.1")
        await ts.start_server()
        started.append((double, ts))
        await wait_until(
            lambda: len(double.workers) == connections, 10, what="the bridge registers upstream"
        )
        return Rig(double, ts)

    yield make
    for double, ts in started:
        await ts.close()
        await double.close()


async def test_accept_relays_identity_and_the_upstream_token(rig: MakeRig) -> None:
    """The worker's accept goes up with its identity and attributes; the
    upstream's token and URL come down in the worker's assignment."""
    r = await rig()
    w = ProtoWorker(r.url, "bot")
    await w.connect()
    await r.available()
    request = r.double._spawn(r.double.job_request(r.job("one")))
    offer = await w.next_offer()
    assert offer.id == "AJ_one"
    assert offer.room.sid == "RM_1"  # the upstream's job, as it came
    await w.accept(offer.id)
    assigned = (await w.next("assignment")).assignment
    res = await request
    assert res.outcome == "running"
    assert assigned.token == res.token
    assert assigned.url == r.double.ws_url
    state = r.double.job_states["AJ_one"]
    assert state.participant_identity == "agent-AJ_one"
    await w.running("AJ_one")
    await wait_until(lambda: r.double.job_states["AJ_one"].status == agent.JobStatus.JS_RUNNING)
    await w.succeed("AJ_one")
    await wait_until(lambda: "AJ_one" not in r.double.job_worker, what="success goes up")
    assert r.double.job_states["AJ_one"].status == agent.JobStatus.JS_SUCCESS
    await w.close()


async def test_no_slot_within_the_window_is_answered_not_available_in_time(rig: MakeRig) -> None:
    """An offer no worker can take within the window is answered "not available"
    before the upstream's deadline (never a timeout); trunkline's job ends
    naming the window, and the busy worker's job is untouched."""
    r = await rig(window=0.6)
    w = ProtoWorker(r.url, "bot", auto="accept")
    await w.connect()
    await r.available()
    first = await r.double.job_request(r.job("one"))
    assert first.outcome == "running"
    second = await r.double.job_request(r.job("two"))
    assert second.outcome == "no_worker"
    assert [a for _, a in second.attempts] == ["worker not available"]
    assert 0.2 <= second.answer_s[0] < 0.9
    job = await wait_until(lambda: r.tl_job("AJ_two"), what="the refused job is recorded")
    assert job["state"] == "no_capacity", job
    assert w.terminated == []
    await w.close()


async def test_a_silent_worker_still_gets_not_available_in_time(rig: MakeRig) -> None:
    """A worker that never answers cannot make the upstream time out: the bridge
    withdraws the offer at the window and answers "not available"."""
    r = await rig(window=0.5)
    w = ProtoWorker(r.url, "bot", auto="ignore")
    await w.connect()
    await r.available()
    res = await r.double.job_request(r.job("one"))
    assert res.outcome == "no_worker"
    assert res.answer_s[0] < 0.8
    job = await r.tl_job("AJ_one")
    assert job["state"] == "cancelled"
    assert "answer window" in job["reason"]
    await w.close()


async def test_hard_reject_is_relayed_as_terminate(rig: MakeRig) -> None:
    """reject() (terminate=true) on trunkline's worker reaches the upstream as
    terminate=true, which ends the job there at once."""
    r = await rig()
    w = ProtoWorker(r.url, "bot", auto="reject")
    await w.connect()
    await r.available()
    res = await r.double.job_request(r.job("one"))
    assert res.outcome == "terminated"
    assert (await r.tl_job("AJ_one"))["state"] == "rejected"
    await w.close()


async def test_upstream_termination_ends_the_job_on_the_worker(rig: MakeRig) -> None:
    """A JobTermination from the upstream reaches the worker and ends the job."""
    r = await rig()
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True, auto_end=True)
    await w.connect()
    await r.available()
    assert (await r.double.job_request(r.job("one"))).outcome == "running"
    assert r.double.terminate_job("AJ_one")
    assert await w.next_termination() == "AJ_one"
    job = await wait_until(
        lambda: _ended(r.tl_job("AJ_one")), what="the terminated job ends in trunkline"
    )
    assert job["state"] == "cancelled"
    await w.close()


async def _ended(job: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    j = await job
    return j if j.get("ended") else None


async def test_upstream_reconnect_migrates_running_jobs(rig: MakeRig) -> None:
    """The upstream drops the bridge's connection: the running job is not cut,
    the bridge reconnects and names it in a MigrateJobRequest, and its end is
    reported on the new connection."""
    r = await rig(honour_migrate=True)
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True)
    await w.connect()
    await r.available()
    assert (await r.double.job_request(r.job("one"))).outcome == "running"
    old = set(r.double.workers)
    await r.double.drop_connections()
    await wait_until(lambda: set(r.double.workers) - old, 10, what="the bridge reconnects")
    new = next(iter(set(r.double.workers) - old))
    await wait_until(
        lambda: "migrate_job" in r.double.workers[new].received, what="the job is migrated"
    )
    assert r.double.job_worker["AJ_one"].id == new
    assert w.terminated == []
    await w.succeed("AJ_one")
    await wait_until(lambda: "AJ_one" not in r.double.job_worker, what="its end goes up")
    assert r.double.job_states["AJ_one"].status == agent.JobStatus.JS_SUCCESS
    await w.close()


async def test_a_worker_reconnecting_to_trunkline_keeps_its_bridged_job(rig: MakeRig) -> None:
    """The worker behind the bridge loses its connection to trunkline and comes
    back (same identity) migrating its job: the job is not cut on either side,
    and its end, reported on the new connection, goes up."""
    r = await rig()
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True)
    await w.connect()
    await r.available()
    assert (await r.double.job_request(r.job("one"))).outcome == "running"
    await wait_until(lambda: r.double.job_states["AJ_one"].status == agent.JobStatus.JS_RUNNING)
    conn = r.double.job_worker["AJ_one"]
    await w.abort()
    await wait_until(lambda: _state_is(r, "AJ_one", "orphaned"), what="the job is orphaned")
    again = ProtoWorker(r.url, "bot")
    await again.connect()
    await again.migrate("AJ_one")
    await wait_until(lambda: _state_is(r, "AJ_one", "running"), what="migrated back")
    assert r.double.job_worker["AJ_one"] is conn  # nothing changed upstream
    assert r.double.job_states["AJ_one"].status == agent.JobStatus.JS_RUNNING
    await again.succeed("AJ_one")
    await wait_until(lambda: "AJ_one" not in r.double.job_worker, what="its end goes up")
    assert r.double.job_states["AJ_one"].status == agent.JobStatus.JS_SUCCESS
    assert (await r.tl_job("AJ_one"))["state"] == "succeeded"
    await again.close()


async def _state_is(r: Rig, job_id: str, state: str) -> bool:
    return (await r.tl_job(job_id))["state"] == state


async def test_several_upstream_connections_share_the_pool(rig: MakeRig) -> None:
    """With bridge_connections = 2 the upstream sees two workers for the agent
    name, both reporting the pool's status; jobs sent to either run on the
    pool's worker (cap 2), and each job's status goes up on the connection
    that was offered it."""
    r = await rig(connections=2, cap=2)
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True)
    await w.connect()
    await r.available()
    ids = sorted(r.double.workers)
    assert len(ids) == 2
    results = []
    for name in ("a", "b", "c", "d"):
        res = await r.double.job_request(r.job(name))
        assert res.outcome == "running", res
        results.append(res)
        await w.succeed(f"AJ_{name}")
        await wait_until(lambda n=name: f"AJ_{n}" not in r.double.job_worker)  # type: ignore[misc]
    assert {res.worker_id for res in results} == set(ids)  # both were picked
    for res in results:
        assert r.double.job_states[res.job.id].status == agent.JobStatus.JS_SUCCESS
        assert r.double.job_states[res.job.id].worker_id == res.worker_id
    await w.close()


async def test_a_soft_refusal_is_placed_again_within_the_window(rig: MakeRig) -> None:
    """A worker behind the bridge refuses softly (terminate=false): the job
    stays trunkline's, goes to the worker that joins meanwhile, within the
    window, and the upstream sees one accepted answer, not a refusal."""
    r = await rig(window=2.0)
    soft = ProtoWorker(r.url, "bot", auto="refuse")
    await soft.connect()
    await r.available()
    request = r.double._spawn(r.double.job_request(r.job("one")))
    await wait_until(lambda: soft.offers, 5, what="the first worker is offered the job")
    take = ProtoWorker(r.url, "bot", auto="accept")
    await take.connect()
    assert (await take.next_assignment()).id == "AJ_one"
    res = await request
    assert res.outcome == "running", res
    assert [a for _, a in res.attempts] == ["accepted"]
    events = [t["event"] for t in (await r.tl_job("AJ_one"))["trace"]]
    assert events[:3] == ["requested", "offered", "refused"]  # the first worker's, soft
    await soft.close()
    await take.close()


async def test_a_full_quota_is_reported_full_and_refused_at_once(rig: MakeRig) -> None:
    """The pool's quota (max_concurrent_jobs) reached: the bridge reports
    WS_FULL, so the upstream bids nothing and fails the next request at once
    ("no servers available") instead of waiting on trunkline."""
    r = await rig(cap=2, max_concurrent_jobs=1)
    w = ProtoWorker(r.url, "bot", auto="accept", auto_run=True)
    await w.connect()
    await r.available()
    assert (await r.double.job_request(r.job("one"))).outcome == "running"

    def full() -> bool:
        return all(x.status == agent.WorkerStatus.WS_FULL for x in r.double.workers.values())

    await wait_until(full, 10, what="the bridge reports WS_FULL")
    res = await r.double.job_request(r.job("two"))
    assert (res.outcome, res.error, res.attempts) == ("no_worker", "no servers available", [])
    await w.succeed("AJ_one")
    await r.available()  # the quota has room again
    assert (await r.double.job_request(r.job("three"))).outcome == "running"
    await w.close()


def test_status_counts_replicas_starting_and_queue_room() -> None:
    """With no worker connected the bridge reports WS_FULL unless a slot can
    appear within the window: replicas being started count as free slots
    (WS_AVAILABLE, load 0); an autoscaled pool with nothing starting still has
    queue room; an unautoscaled pool with no worker has none."""
    cfg = parse_config(_cfg(bridge=True))
    assert cfg.livekit is not None
    starting: dict[str, int | None] = {"a": None}
    b = Bridge(Dispatcher(cfg, Metrics()), cfg.livekit, lambda name: starting[name])
    full, avail = agent.WorkerStatus.WS_FULL, agent.WorkerStatus.WS_AVAILABLE
    assert b.pool_status("a") == (full, 1.0, 0)  # no worker, not autoscaled
    starting["a"] = 4
    assert b.pool_status("a") == (avail, 0.0, 0)  # 4 slots on their way
    starting["a"] = 0
    assert b.pool_status("a")[:2] == (avail, 0.69)  # autoscaled: a slot can appear


def _cfg(**lk: Any) -> dict[str, Any]:
    base = {"url": "wss://lk.example", "api_key": "k", "api_secret": "s"}
    return {"keys": {KEY: SECRET}, "pools": {"a": {}}, "livekit": {**base, **lk}}


def test_bridge_config_defaults_and_errors() -> None:
    """bridge = true registers every pool for room jobs with a 2.5 s window; bad
    bridge keys are all reported at once, each with what is allowed."""
    lk = parse_config(_cfg(bridge=True)).livekit
    assert lk is not None
    assert lk.bridge is not None
    assert lk.bridge.agent_names == ("a",)
    assert lk.bridge.job_types == {"a": ("room",)}
    assert lk.bridge.answer_window_s == 2.5
    assert lk.bridge.connections == 1
    with pytest.raises(ConfigError) as err:
        parse_config(
            _cfg(
                bridge=True,
                bridge_job_types={"a": ["rooms"], "b": ["room"]},
                bridge_answer_window_s=30,
                bridge_connections=0,
            )
        )
    text = str(err.value)
    for key in (
        "livekit.bridge_job_types.a",
        "livekit.bridge_job_types.b",
        "livekit.bridge_answer_window_s",
        "livekit.bridge_connections",
    ):
        assert key in text
    with pytest.raises(ConfigError, match="without bridge = true"):
        parse_config(_cfg(bridge_connections=2))
