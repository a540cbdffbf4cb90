"""A rollout of a pool of real SDK workers on the local provider, under a
steady stream of calls: A -> B, a 25 % canary of C, its abort (scenario.py)."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestServer
from rollout.scenario import Client, pool_toml, run_scenario
from support import KEY, SECRET, free_port

from trunkline.config import load_config
from trunkline.server.app import build_app


async def test_rollout_canary_and_abort_on_local_replicas_cut_no_call(tmp_path: Path) -> None:
    """No call cut or refused, none over the cap, every call on A ends on A; the
    canary takes about a quarter of new calls; the abort sends them all back."""
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
    finally:
        await client.session.close()
        await server.close()
