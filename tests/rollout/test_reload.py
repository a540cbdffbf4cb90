"""Config reload without a restart (runtime/reload.py, server/reload.py): a bad
value changes nothing and names its key; a good reload applies live without
dropping a worker connection or a call; SIGHUP does the same."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from rollout.scenario import Client, pool_toml
from support import KEY, SECRET, free_port, wait_until

from trunkline.auth import admin_token
from trunkline.config import load_config
from trunkline.server.app import build_app

NEW_KEY, NEW_SECRET = "APInew", "n" * 40


async def test_reload_refuses_a_bad_value_and_applies_a_good_one_live(tmp_path: Path) -> None:
    """One bad value: 400 naming pools.roll.max_replicas, nothing applied (not even
    the good values beside it); then a good file: pool settings, scaling and a
    new key apply, the same workers stay connected and the running call ends
    well; then SIGHUP applies the next edit."""
    events = tmp_path / "events.jsonl"
    port = free_port()
    path = tmp_path / "trunkline.toml"

    def write(extra: str = "", keys: str = "") -> None:
        path.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\n[keys]\n{KEY} = "{SECRET}"\n{keys}'
            f'[store]\nbackend = "memory"\n[autoscale]\nrun_dir = "{tmp_path / "run"}"\n'
            + pool_toml("A", events).replace("max_replicas = 4\n", "")
            + (extra or "max_replicas = 4\n")
        )

    write()
    server = TestServer(build_app(load_config(path)), host="127.0.0.1", port=port)
    await server.start_server()
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.ready_of((await client.pool())["autoscale"]["version"], 2)
        workers = sorted(w["worker_id"] for w in (await client.get("/v1/workers"))["workers"])
        job = await client.dispatch(4.0)

        async def running() -> bool:
            return bool((await client.get(f"/v1/jobs/{job}"))["state"] == "running")

        await wait_until(running, 20, what="the call runs")

        # Unauthenticated: refused.
        async with (
            aiohttp.ClientSession() as anon,
            anon.post(client.url + "/v1/config/reload") as r,
        ):
            assert r.status == 401

        # One bad value among good ones: nothing applies.
        write('max_replicas = "lots"\nspare_slots = 2\n')
        status, body = await client.post("/v1/config/reload")
        assert status == 400, body
        assert body["code"] == "invalid_config"
        assert "pools.roll.max_replicas" in body["message"], body
        pool = await client.pool()
        assert pool["autoscale"]["max_replicas"] == 4
        assert pool["autoscale"]["spare_slots"] == 0

        # A good file: applied live.
        write(
            "max_replicas = 3\nspare_slots = 1\n",
            keys=f'{NEW_KEY} = "{NEW_SECRET}"\n',
        )
        text = path.read_text().replace("queue_max_wait_s = 30", "queue_max_wait_s = 12")
        path.write_text(text)
        status, body = await client.post("/v1/config/reload")
        assert status == 200, body
        changed = " | ".join(body["changed"])
        assert "scheduling: pools.roll" in changed, body
        assert "pools.roll: scaling settings" in changed, body
        assert f"1 added ['{NEW_KEY}']" in changed, body
        assert body["rollouts"] == {}, body  # same command and env: same version
        pool = await client.pool()
        assert pool["config"]["queue_max_wait_s"] == 12
        assert pool["autoscale"]["max_replicas"] == 3
        assert pool["autoscale"]["spare_slots"] == 1
        headers = {"Authorization": f"Bearer {admin_token(NEW_KEY, NEW_SECRET)}"}
        async with (
            aiohttp.ClientSession(headers=headers) as other,
            other.get(client.url + "/v1/pools") as r,
        ):
            assert r.status == 200  # the new key is served
        ended = await client.ended(job)
        assert ended["state"] == "succeeded", ended
        now = sorted(w["worker_id"] for w in (await client.get("/v1/workers"))["workers"])
        assert set(workers) <= set(now), (workers, now)  # no worker was dropped

        # SIGHUP: the same reload, from the signal.
        write("max_replicas = 4\nspare_slots = 1\n", keys=f'{NEW_KEY} = "{NEW_SECRET}"\n')
        os.kill(os.getpid(), signal.SIGHUP)

        async def applied() -> bool:
            return bool((await client.pool())["autoscale"]["max_replicas"] == 4)

        await wait_until(applied, 10, what="SIGHUP reloads the file")

        # `trunkline rollout`: the CLI over POST /v1/pools/{pool}/rollout.
        async def cli(*argv: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "trunkline", "rollout", *argv,
                "--url", client.url, "--api-key", KEY, "--api-secret", SECRET,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode()

        code, out = await cli("roll")
        assert code == 0, out
        assert "nothing to roll out" in out, out
        code, out = await cli("roll", "--promote")
        assert code == 1, out
        assert "no canary to promote" in out, out
        code, out = await cli("nope")
        assert code == 1, out
        assert "not autoscaled" in out, out
    finally:
        await client.session.close()
        await server.close()
