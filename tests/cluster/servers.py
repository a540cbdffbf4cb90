"""Three real `trunkline serve` processes on one real redis-server, for the
cluster tests: `cluster_of(tmp, redis, n)` starts them (each with its own
temp dir and an in-memory history, or SQLite), `owner_of(servers, pool)` finds the one
every member agrees owns a pool, `dispatch(srv)` asks one for a session.
The `redis` and `servers` fixtures (conftest.py) use them."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from support import ServerProcess, wait_until

TTL_S = 1.5
POOL = "support"


def cluster_toml(
    redis_url: str, name: str, extra: str = "", *, store: str = "memory", cluster: str = ""
) -> str:
    """A member's config: `extra` goes into the pool's table, `cluster` into [cluster]."""
    return (
        f'[store]\nbackend = "{store}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nmember = "{name}"\nlease_ttl_s = {TTL_S}\n'
        'timeout_s = 0.4\nnamespace = "t"\n' + cluster + "\n"
        f"[pools.{POOL}]\nmax_jobs_per_worker = 4\nqueue_max_wait_s = 60\n" + extra
    )


def cluster_of(
    tmp: Path,
    redis_url: str,
    n: int = 3,
    extra: str = "",
    *,
    sqlite: bool = False,
    cluster: str = "",
) -> list[ServerProcess]:
    """`n` members started together (s0 .. s{n-1}), each listening on return;
    with `sqlite` each keeps its history in its own directory (a member
    restarted on the same config finds it again)."""
    servers = []
    for i in range(n):
        d = tmp / f"s{i}"
        d.mkdir()
        store = "sqlite" if sqlite else "memory"
        srv = ServerProcess(
            d, cluster_toml(redis_url, f"s{i}", extra, store=store, cluster=cluster)
        )
        if sqlite:
            text = srv.config.read_text().replace("[server]\n", f'[server]\ndata_dir = "{d}"\n', 1)
            srv.config.write_text(text)
        servers.append(srv)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda srv: srv.start(timeout=60.0), servers))
    return servers


def signal_server(srv: ServerProcess, sig: signal.Signals) -> None:
    assert srv.proc is not None
    os.kill(srv.proc.pid, sig)


async def view(srv: ServerProcess) -> dict[str, Any]:
    got: dict[str, Any] = await srv.get("/v1/cluster")
    return got


async def owner_of(
    servers: list[ServerProcess], pool: str = POOL, within: float = 10.0, above: int = 0
) -> tuple[ServerProcess, int]:
    """The server that owns `pool` at an epoch above `above`, as every given
    server sees it, and that epoch (waits until there is one)."""

    async def agreed() -> tuple[ServerProcess, int] | None:
        owners = set()
        found = None
        for srv in servers:
            v = await view(srv)
            for p in v["pools"]:
                if p["pool"] == pool and p["owner"]:
                    owners.add((p["owner"], p["epoch"]))
                    if p["ours"]:
                        found = (srv, p["epoch"])
            if not any(p["pool"] == pool and p["owner"] for p in v["pools"]):
                return None
        if found is None or len(owners) != 1 or found[1] <= above:
            return None
        return found

    result: tuple[ServerProcess, int] = await wait_until(agreed, within, what="one agreed owner")
    return result


async def dispatch(
    srv: ServerProcess, max_wait_s: float = 30.0, pool: str = POOL
) -> tuple[int, dict[str, Any]]:
    """`POST /v1/dispatches` for `pool` at `srv`: the status and the JSON body."""
    status, body = await srv.post("/v1/dispatches", {"agent_name": pool, "max_wait_s": max_wait_s})
    return status, body
