"""The 13-call burst through the Kubernetes provider: a trunkline server in this
process whose pool runs on the fake cluster; the fake kubelet runs each pod's
command, real trunkline SDK workers (tests/autoscale/sdk_agent.py), which
register through the replica URL in their pod's environment and take calls.

What each replica ran comes from the events file the agents append to; what
the provider asked the API server for comes from the fake's request log.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from providers.k8s.harness import fake_cluster
from support import KEY, SECRET, free_port, peak_level, wait_until

from trunkline.auth import admin_token
from trunkline.config import parse_config
from trunkline.server.app import build_app

AGENTS = Path(__file__).resolve().parent.parent / "autoscale"
COMPAT = Path(__file__).resolve().parent.parent / "compat"


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        )

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as r:
            r.raise_for_status()
            return await r.json()

    async def pool(self, name: str) -> dict[str, Any]:
        data = await self.get("/v1/pools")
        (pool,) = [p for p in data["pools"] if p["agent_name"] == name]
        return dict(pool)

    async def dispatch(self, name: str, hold_s: float) -> str:
        body = {"agent_name": name, "metadata": {"hold_s": hold_s}}
        async with self.session.post(self.url + "/v1/dispatches", json=body) as r:
            data = await r.json()
            assert r.status == 201, data
            return str(data["job_id"])

    async def ended(self, job_id: str, within: float = 60.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job: dict[str, Any] = await self.get(f"/v1/jobs/{job_id}")
            return job if job["ended"] else None

        result: dict[str, Any] = await wait_until(check, within, what=f"job {job_id} ends")
        return result


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def test_burst_of_13_on_pods_holds_the_cap_and_scale_down_deletes_only_empty_pods(
    tmp_path: Path,
) -> None:
    """13 simultaneous calls at cap 4 with one warm pod: the provider is asked for
    3 more pods at once (4 in all, never more), every call succeeds, no pod's
    worker ever holds a 5th call; when demand falls, the pods are drained and
    each is deleted only once it holds no call, and the pool keeps its minimum."""
    events = tmp_path / "events.jsonl"
    port = free_port()
    async with fake_cluster(tmp_path / "cluster") as cluster:
        template = cluster.template()
        command = [sys.executable, "-m", "trunkline", "worker", "sdk_agent:entrypoint"]
        command += ["--max-jobs", "4", "--agent-name", "burst", "--num-idle-processes", "1"]
        config = parse_config(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "keys": {KEY: SECRET},
                "store": {"backend": "memory"},
                "kubernetes": {"kubeconfig": str(cluster.kubeconfig), "on_shutdown": "delete"},
                "pools": {
                    "burst": {
                        "provider": "kubernetes",
                        "pod_template": str(template),
                        "command": command,
                        "env": {"PYTHONPATH": str(AGENTS), "TL_EVENTS": str(events)},
                        "max_jobs_per_worker": 4,
                        "queue_max_wait_s": 30,
                        "min_replicas": 1,
                        "max_replicas": 5,
                        "scale_down_delay_s": 1.0,
                        "drain_timeout_s": 30,
                    }
                },
            }
        )
        server = TestServer(build_app(config), host="127.0.0.1", port=port)
        await server.start_server()
        client = Client(f"http://127.0.0.1:{port}")
        try:

            async def warm() -> bool:
                reps = (await client.pool("burst"))["replicas"]
                return any(r["state"] == "ready" for r in reps)

            await wait_until(warm, 60, what="the warm pod's worker registers")
            creates_before = [r for r in cluster.api.requests if r.method == "POST"]
            assert len(creates_before) == 1, creates_before

            job_ids = await asyncio.gather(*(client.dispatch("burst", 2.0) for _ in range(13)))
            jobs = await asyncio.gather(*(client.ended(j) for j in job_ids))
            assert [j["state"] for j in jobs] == ["succeeded"] * 13, [j["reason"] for j in jobs]

            # The cap held on every replica, by the agents' own records.
            changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
            for ev in _events(events):
                if ev["job_id"] in job_ids:
                    changes[ev["replica"]].append((ev["t"], 1 if ev["event"] == "start" else -1))
            peaks = {rid: peak_level(c) for rid, c in changes.items()}
            assert peaks, "no agent recorded a call"
            assert max(peaks.values()) <= 4, peaks

            # Pods were asked for at once: 3 more creates, issued within 0.2 s
            # of the first call that did not fit, and no 5th pod.
            creates = [r for r in cluster.api.requests if r.method == "POST" and "/pods" in r.path]
            assert len(creates) == 4, [r.body["metadata"]["name"] for r in creates]
            created_at = sorted(j["created_at"] for j in jobs)
            burst_creates = sorted(r.at for r in creates[1:])
            assert burst_creates[0] - created_at[4] < 0.2, (burst_creates, created_at[4])
            assert burst_creates[-1] - created_at[-1] < 0.2, (burst_creates, created_at[-1])
            pool = await client.pool("burst")
            assert {r["where"]["kind"] for r in pool["replicas"]} == {"pod"}
            assert {r["provider"] for r in pool["replicas"]} == {"kubernetes"}

            # Demand is gone: the pool drains back to its minimum.
            async def shrunk() -> list[dict[str, Any]] | None:
                reps = (await client.pool("burst"))["replicas"]
                stopped = [r for r in reps if r["state"] == "stopped"]
                serving = [r for r in reps if r["state"] in ("ready", "starting")]
                return stopped if len(stopped) == 3 and len(serving) == 1 else None

            stopped = await wait_until(shrunk, 30, what="three pods drained and deleted")
            deletes = cluster.api.deletes()
            by_replica: dict[str, float] = {}
            for r in deletes:
                pod = r.path.rsplit("/", 1)[1]
                (create,) = [c for c in creates if c.body["metadata"]["name"] == pod]
                rid = create.body["metadata"]["annotations"]["trunkline.dev/replica-id"]
                by_replica.setdefault(rid, r.at)
            assert set(by_replica) == {r["id"] for r in stopped}, (by_replica, stopped)
            ends = {ev["job_id"]: ev["t"] for ev in _events(events) if ev["event"] == "end"}
            for ev in _events(events):
                if ev["event"] == "start" and ev["replica"] in by_replica:
                    # every call on a deleted pod had ended before its delete
                    assert ends[ev["job_id"]] <= by_replica[ev["replica"]], ev
            for r in stopped:
                assert r["drain_started_at"] <= by_replica[r["id"]]
        finally:
            await client.session.close()
            await server.close()
        # Shutdown deleted the last pod too; nothing is left running.
        assert cluster.kubelet.running() == []


async def test_a_restarted_server_adopts_the_running_pod_instead_of_starting_another(
    tmp_path: Path,
) -> None:
    """A server shut down (a rollout, an evicted server pod) leaves its pods
    running (`on_shutdown = "leave"`, the default); the next one with the same
    config adopts the pod (no create request), the pod's worker reconnects with
    its token and makes the adopted replica ready, and calls are placed on it."""
    events = tmp_path / "events.jsonl"
    port = free_port()
    async with fake_cluster(tmp_path / "cluster") as cluster:
        command = [sys.executable, "-m", "trunkline", "worker", "sdk_agent:entrypoint"]
        command += ["--max-jobs", "2", "--agent-name", "keep", "--num-idle-processes", "1"]
        config = parse_config(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "keys": {KEY: SECRET},
                "store": {"backend": "memory"},
                "kubernetes": {"kubeconfig": str(cluster.kubeconfig)},
                "pools": {
                    "keep": {
                        "provider": "kubernetes",
                        "pod_template": str(cluster.template()),
                        "command": command,
                        "env": {"PYTHONPATH": str(AGENTS), "TL_EVENTS": str(events)},
                        "max_jobs_per_worker": 2,
                        "min_replicas": 1,
                        "max_replicas": 1,
                        "queue_max_wait_s": 30,
                    }
                },
            }
        )

        async def ready(client: Client) -> list[dict[str, Any]]:
            reps = (await client.pool("keep"))["replicas"]
            return [r for r in reps if r["state"] == "ready"]

        first = TestServer(build_app(config), host="127.0.0.1", port=port)
        await first.start_server()
        client = Client(f"http://127.0.0.1:{port}")
        try:
            (before,) = await wait_until(lambda: ready(client), 60, what="the first pod is ready")
        finally:
            await client.session.close()
            await first.close()
        pods = [p["metadata"]["name"] for p in cluster.api.pods()]
        assert len(pods) == 1, pods
        assert cluster.kubelet.running() == pods  # left running

        second = TestServer(build_app(config), host="127.0.0.1", port=port)
        await second.start_server()
        client = Client(f"http://127.0.0.1:{port}")
        try:
            (after,) = await wait_until(lambda: ready(client), 60, what="the adopted pod is ready")
            assert after["id"] == before["id"]
            assert after["where"]["pod"] == pods[0]
            creates = [r for r in cluster.api.requests if r.method == "POST"]
            assert len(creates) == 1, "the restarted server created a pod"
            job = await client.ended(await client.dispatch("keep", 0.1))
            assert job["state"] == "succeeded"
            assert job["worker_id"] == after["worker_id"]
        finally:
            await client.session.close()
            await second.close()
        assert cluster.kubelet.running() == pods  # left again, for the next one


@pytest.mark.compat
async def test_livekit_agents_in_a_pod_takes_calls_and_a_bad_image_shows_its_reason(
    tmp_path: Path,
) -> None:
    """An unmodified livekit-agents worker in a pod registers through its pod's
    environment and runs calls; a pool whose image cannot be pulled shows
    "failed to start: ImagePullBackOff" for its replicas in /v1/pools."""
    events = tmp_path / "lk.jsonl"
    port = free_port()
    async with fake_cluster(tmp_path / "cluster") as cluster:
        config = parse_config(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "keys": {KEY: SECRET},
                "store": {"backend": "memory"},
                "kubernetes": {"kubeconfig": str(cluster.kubeconfig), "on_shutdown": "delete"},
                "pools": {
                    "lk": {
                        "provider": "kubernetes",
                        "pod_template": str(cluster.template("lk")),
                        "command": [sys.executable, str(COMPAT / "lk_agent.py"), "start"],
                        "env": {
                            "TL_EVENTS": str(events),
                            "TL_AGENT_NAME": "lk",
                            "TL_IDLE": "1",
                            "TL_NO_LOAD_GUARD": "1",
                        },
                        "max_jobs_per_worker": 2,
                        "min_replicas": 1,
                        "max_replicas": 1,
                        "queue_max_wait_s": 30,
                    },
                    "broken": {
                        "provider": "kubernetes",
                        "pod_template": str(
                            cluster.template("broken", image="registry.invalid/agent:1")
                        ),
                        "command": ["agent"],
                        "max_jobs_per_worker": 1,
                        "min_replicas": 1,
                    },
                },
            }
        )
        server = TestServer(build_app(config), host="127.0.0.1", port=port)
        await server.start_server()
        client = Client(f"http://127.0.0.1:{port}")
        try:

            async def ready() -> list[dict[str, Any]]:
                reps = (await client.pool("lk"))["replicas"]
                return [r for r in reps if r["state"] == "ready"]

            (replica,) = await wait_until(ready, 60, what="the livekit-agents pod registers")
            job_ids = [await client.dispatch("lk", 0.2) for _ in range(2)]
            jobs = [await client.ended(j) for j in job_ids]
            assert [j["state"] for j in jobs] == ["succeeded"] * 2
            assert {j["worker_id"] for j in jobs} == {replica["worker_id"]}
            assert set(job_ids) <= {e["job_id"] for e in _events(events)}

            async def failed() -> list[dict[str, Any]]:
                reps = (await client.pool("broken"))["replicas"]
                return [r for r in reps if r["state"] == "failed"]

            broken = (await wait_until(failed, 20, what="the bad image fails its start"))[0]
            assert "failed to start: ImagePullBackOff" in broken["detail"], broken
            scale = (await client.pool("broken"))["scale_events"]
            failures = [ev["reason"] for ev in scale if ev["kind"] == "failed"]
            assert any("ImagePullBackOff" in reason for reason in failures), failures
        finally:
            await client.session.close()
            await server.close()
