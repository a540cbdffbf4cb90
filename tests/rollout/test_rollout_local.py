"""A rollout of a pool of real SDK workers on the local provider, under a
steady stream of calls: A -> B, a 25 % canary of C, its abort (scenario.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from rollout.scenario import Client, pool_toml, run_scenario
from support import KEY, SECRET, free_port

from trunkline.cli.status import render
from trunkline.config import load_config
from trunkline.server.app import build_app
from trunkline.server.dashboard import HUB


async def test_rollout_canary_and_abort_on_local_replicas_cut_no_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No call cut or refused, none over the cap, every call on A ends on A; the
    canary takes about a quarter of new calls; the abort sends them all back.
    `trunkline status`, the dashboard and /metrics show the versions and the
    rollout."""
    events = tmp_path / "events.jsonl"
    port = free_port()
    path = tmp_path / "trunkline.toml"
    head = (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n[keys]\n{KEY} = "{SECRET}"\n'
        f'[store]\nbackend = "memory"\n[autoscale]\nrun_dir = "{tmp_path / "run"}"\n'
    )

    def set_version(v: str) -> None:
        path.write_text(head + pool_toml(v, events))

    set_version("A")
    server = TestServer(build_app(load_config(path)), host="127.0.0.1", port=port)
    await server.start_server()
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await run_scenario(client, events, set_version)
        pools = (await client.get("/v1/pools"))["pools"]
        workers = (await client.get("/v1/workers"))["workers"]
        (pool,) = [p for p in pools if p["agent_name"] == "roll"]
        running = {r["version"] for r in pool["replicas"] if r["state"] == "ready"}
        (b,) = running
        capsys.readouterr()
        render(client.url, pools, workers)
        out = capsys.readouterr().out
        assert f"-> {pool['rollout']['to']}: rolled_back" in out, out
        assert b in out
        snap = server.app[HUB].snapshot()
        (dash,) = [p for p in snap["pools"] if p["agent_name"] == "roll"]
        assert dash["rollout"]["phase"] == "rolled_back"
        assert {r["version"] for r in dash["replicas"] if r["state"] == "ready"} == {b}
        async with client.session.get(client.url + "/metrics") as r:
            text = await r.text()
        assert 'trunkline_rollouts_total{outcome="done",pool="roll"} 1.0' in text, text
        assert 'trunkline_rollouts_total{outcome="rolled_back",pool="roll"} 1.0' in text
        assert f'trunkline_replica_versions{{pool="roll",state="ready",version="{b}"}}' in text
    finally:
        await client.session.close()
        await server.close()
