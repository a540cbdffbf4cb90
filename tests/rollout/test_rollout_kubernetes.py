"""The rollout scenario (scenario.py) through the Kubernetes provider: the pool's
replicas are pods on the fake API server (tests/providers/k8s), whose kubelet
runs each pod's command, real SDK workers. Each version's pods carry it as a
label and an annotation."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestServer
from providers.k8s.harness import fake_cluster
from rollout.scenario import Client, pool_toml, run_scenario
from support import KEY, SECRET, free_port

from trunkline.config import load_config
from trunkline.server.app import build_app


async def test_rollout_canary_and_abort_on_pods_cut_no_call(tmp_path: Path) -> None:
    """The same promises on pods: no call cut, cap held, canary share, abort; and
    every pod created names its version (label and annotation)."""
    events = tmp_path / "events.jsonl"
    port = free_port()
    path = tmp_path / "trunkline.toml"
    async with fake_cluster(tmp_path / "cluster") as cluster:
        template = cluster.template()
        head = (
            f'[server]\nhost = "127.0.0.1"\nport = {port}\n[keys]\n{KEY} = "{SECRET}"\n'
            f'[store]\nbackend = "memory"\n'
            f'[kubernetes]\nkubeconfig = "{cluster.kubeconfig}"\non_shutdown = "delete"\n'
        )

        def set_version(v: str) -> None:
            pool = pool_toml(v, events).replace(
                "[pools.roll]\n",
                f'[pools.roll]\nprovider = "kubernetes"\npod_template = "{template}"\n',
            )
            path.write_text(head + pool)

        set_version("A")
        server = TestServer(build_app(load_config(path)), host="127.0.0.1", port=port)
        await server.start_server()
        client = Client(f"http://127.0.0.1:{port}")
        try:
            await run_scenario(client, events, set_version)
            pool = await client.pool()
            by_id = {r["id"]: r["version"] for r in pool["replicas"]}
        finally:
            await client.session.close()
            await server.close()
        creates = [r for r in cluster.api.requests if r.method == "POST" and "/pods" in r.path]
        versions = set()
        for c in creates:
            meta = c.body["metadata"]
            v = meta["annotations"]["trunkline.dev/version"]
            assert meta["labels"]["trunkline.dev/version"] == v
            rid = meta["annotations"]["trunkline.dev/replica-id"]
            if rid in by_id:
                assert by_id[rid] == v
            versions.add(v)
        assert len(versions) == 3, versions  # A, B and the canary's C
