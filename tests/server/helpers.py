"""`Srv`: one in-process trunkline server plus an HTTP client and its workers."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from protoworker import ProtoWorker
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.server.keys import DISPATCHER


class Srv:
    """A started `TestServer` running `build_app(config)`; REST helpers send a
    valid admin token unless `headers` says otherwise."""

    def __init__(self, ts: TestServer) -> None:
        self.ts = ts
        self.url = str(ts.make_url("")).rstrip("/")
        self.dispatcher: Dispatcher = ts.app[DISPATCHER]
        self.session = aiohttp.ClientSession()
        self.auth = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        self.workers: list[ProtoWorker] = []

    async def close(self) -> None:
        for w in self.workers:
            await w.close()
        await self.session.close()
        await self.ts.close()

    # ---------------------------------------------------------------- workers

    def worker(self, agent_name: str = "", **kw: Any) -> ProtoWorker:
        """A worker for this server, closed at teardown (not connected yet)."""
        w = ProtoWorker(self.url, agent_name, **kw)
        self.workers.append(w)
        return w

    async def connect(self, agent_name: str = "", **kw: Any) -> ProtoWorker:
        """A registered worker."""
        w = self.worker(agent_name, **kw)
        await w.connect()
        return w

    # ------------------------------------------------------------------- HTTP

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or None)."""
        hdrs = self.auth if headers is None else headers
        async with self.session.request(
            method, self.url + path, json=json, data=data, headers=hdrs
        ) as r:
            body = await r.json() if r.content_type == "application/json" else None
            return r.status, body

    async def dispatch(self, agent_name: str = "", **fields: Any) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/dispatches", json={"agent_name": agent_name, **fields}
        )
        assert status == 201, body
        result: dict[str, Any] = body
        return result

    async def job(self, job_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/jobs/{job_id}")
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    async def wait_state(self, job_id: str, state: str, within: float = 5.0) -> dict[str, Any]:
        """Poll `GET /v1/jobs/{id}` until the job is in `state`."""

        async def check() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] == state else None

        result: dict[str, Any] = await wait_until(
            check, within, interval=0.01, what=f"job {job_id} {state}"
        )
        return result

    async def metrics_text(self) -> str:
        async with self.session.get(self.url + "/metrics") as r:
            assert r.status == 200
            return await r.text()
