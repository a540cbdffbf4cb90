"""`trunkline status`: pools, their replicas and workers with slot bars, queues.

Reads `GET /v1/pools` and `GET /v1/workers`. When the autoscaler adds
`replicas` (each with a state and slots) and `scale_events` to a pool, they are
shown too; without them the command shows what the dispatcher knows.
`--json` prints `{"pools": [...], "workers": [...]}` as the server sent them.
`--dashboard-url` prints a dashboard link carrying a read-only viewer token
instead (roomList, no roomAdmin: whoever holds the link can watch, never
cancel, drain or dispatch).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from trunkline.cli._client import (
    OK,
    Client,
    CliError,
    add_client_args,
    console,
    print_json,
    run,
    sign_viewer_token,
)
from trunkline.cli._fmt import first, fmt_clock, fmt_fields, slot_bar

DASHBOARD_TOKEN_TTL_S = 12 * 3600


def register(subparsers: Any) -> None:
    """Add the `status` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="pools, replicas and workers with their slots, queue depth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_client_args(p)
    p.add_argument(
        "--dashboard-url",
        action="store_true",
        help="print a dashboard link with a read-only token valid "
        f"{DASHBOARD_TOKEN_TTL_S // 3600} h",
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        if args.dashboard_url:
            await client.request("GET", "/v1/pools")  # proves the keys before printing
            token = sign_viewer_token(client.target, ttl_s=DASHBOARD_TOKEN_TTL_S)
            print(f"{client.target.url}/?token={token}")
            return OK
        pools = (await client.request("GET", "/v1/pools"))["pools"]
        workers = (await client.request("GET", "/v1/workers"))["workers"]
        try:  # cluster mode only (docs/cluster.md); a single server has no /v1/cluster
            cluster = await client.request("GET", "/v1/cluster")
        except CliError:
            cluster = None
        if args.json:
            print_json({"pools": pools, "workers": workers, "cluster": cluster})
        else:
            render(client.target.url, pools, workers)
            if cluster is not None:
                render_cluster(cluster)
        return OK

    return run(args, body)


def render(url: str, pools: list[dict[str, Any]], workers: list[dict[str, Any]]) -> None:
    """Print the status view of `pools` and `workers` to stdout."""
    from rich.table import Table

    out = console()
    running = sum(w.get("running", 0) for w in workers)
    queued = sum(p.get("queued", 0) for p in pools)
    out.print(
        f"[bold]trunkline[/] {url}: {len(pools)} pools, {len(workers)} workers, "
        f"{running} running, {queued} queued"
    )
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        by_pool.setdefault(w.get("agent_name", ""), []).append(w)
    names = [p.get("agent_name", "") for p in pools]
    # Workers of an agent name the pool list does not show (should not
    # happen; never hide a worker because of it).
    extra = [n for n in by_pool if n not in names]
    for pool in [*pools, *({"agent_name": n} for n in extra)]:
        name = pool.get("agent_name", "")
        out.print()
        out.print(_pool_line(name, pool))
        pool_workers = by_pool.get(name, [])
        if pool_workers:
            table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
            for col in ("worker", "status", "slots", "used", "load", "jobs"):
                table.add_column(col, justify="right" if col in ("used", "load") else "left")
            for w in pool_workers:
                cap = w.get("capacity")
                table.add_row(
                    w.get("worker_id", "?"),
                    _worker_state(w),
                    slot_bar(w.get("running", 0), w.get("reserved", 0), cap),
                    f"{w.get('used', 0)}/{cap if cap is not None else '?'}",
                    f"{w.get('load', 0.0):.2f}",
                    ", ".join(w.get("jobs", [])[:4])
                    + (" ..." if len(w.get("jobs", [])) > 4 else ""),
                )
            out.print(table)
        else:
            out.print("  [dim]no workers connected[/]")
        replicas = pool.get("replicas")
        if isinstance(replicas, list) and replicas:
            out.print(_replica_table(replicas))
        rollout = pool.get("rollout")
        if isinstance(rollout, Mapping):
            out.print(f"  {_rollout_line(rollout)}", markup=False, highlight=False)
        events = pool.get("scale_events")
        if isinstance(events, list) and events:
            out.print("  [bold]recent scale events[/]")
            for ev in events[-5:]:
                if isinstance(ev, Mapping):
                    at = ev.get("at")
                    when = fmt_clock(at) if isinstance(at, int | float) else ""
                    out.print(f"  {when} {_scale_event(ev)}")


def render_cluster(cluster: Mapping[str, Any]) -> None:
    """The members of the cluster and who owns which pool, with lease ages."""
    out = console()
    store = cluster.get("store", "?")
    out.print()
    out.print(
        f"[bold]cluster[/] member {cluster.get('member', '?')}, store "
        + ("[green]ok[/]" if store == "ok" else f"[red]{store}[/]")
    )
    for m in cluster.get("members", []):
        out.print(f"  member {m.get('member', '?')}  {m.get('url', '')}")
    for p in cluster.get("pools", []):
        owner = p.get("owner") or "[red]none[/]"
        age = f", held {p.get('age_s', 0):.1f} s" if p.get("ours") else ""
        out.print(f"  pool {p.get('pool', '?')}: owner {owner} (epoch {p.get('epoch', 0)}{age})")


def _pool_line(name: str, pool: Mapping[str, Any]) -> str:
    cfg = pool.get("config") or {}
    parts = [f"[bold]pool {name or '(default)'}[/]"]
    if "queued" in pool:
        q = pool["queued"]
        parts.append(f"queue [{'yellow' if q else 'green'}]{q}[/]")
    if "slots_used" in pool:
        parts.append(f"slots {pool['slots_used']} used / {pool.get('slots_free', 0)} free")
    if "active_jobs" in pool:
        quota = cfg.get("max_concurrent_jobs")
        parts.append(f"active {pool['active_jobs']}" + (f"/{quota}" if quota else ""))
    if cfg.get("max_jobs_per_worker"):
        parts.append(f"cap {cfg['max_jobs_per_worker']}/worker")
    if cfg.get("placement"):
        parts.append(cfg["placement"])
    if cfg.get("queue_max_wait_s") is not None:
        parts.append(f"max wait {cfg['queue_max_wait_s']:g} s")
    owner = pool.get("owner")
    if owner:  # cluster mode: the numbers are the owner's (docs/cluster.md)
        from rich.markup import escape

        unreachable = " [red](unreachable: numbers from this member)[/]"
        parts.append(
            f"owner {escape(str(owner))}" + (unreachable if pool.get("owner_unreachable") else "")
        )
    return "  ".join(parts)


def _worker_state(w: Mapping[str, Any]) -> str:
    if w.get("draining"):
        return "[magenta]draining[/]"
    if w.get("suspended"):
        return "[red]suspended[/]"
    if w.get("benched"):
        return "[yellow]benched[/]"
    if w.get("status") == "full":
        return "[yellow]full[/]"
    return "[green]available[/]"


def _scale_event(ev: Mapping[str, Any]) -> str:
    if not all(k in ev for k in ("kind", "from", "to")):
        return fmt_fields(ev, skip=("at",))
    text = f"{ev['kind']} {ev['from']} → {ev['to']} replicas"
    demand = ev.get("demand")
    if isinstance(demand, Mapping):
        text += (
            f" (demand {demand.get('total', '?')}: running {demand.get('running', 0)}, "
            f"queued {demand.get('queued', 0)}, refused {demand.get('refused', 0)})"
        )
    if ev.get("reason"):
        text += f": {ev['reason']}"
    return text


def _rollout_line(ro: Mapping[str, Any]) -> str:
    """The pool's rollout in one line: versions, phase, replicas by version."""
    text = f"rollout {ro.get('from') or '(none)'} -> {ro.get('to')}: {ro.get('phase')}"
    if ro.get("phase") == "canary":
        text += f" at {ro.get('canary_percent', 0):g} %"
    if ro.get("reason"):
        text += f" ({ro['reason']})"
    live = [
        f"{r.get('count')} {r.get('state')} on {r.get('version') or '?'}"
        for r in ro.get("replicas") or []
        if isinstance(r, Mapping) and r.get("state") not in ("stopped", "failed")
    ]
    return text + (": " + ", ".join(live) if live else "")


def _replica_table(replicas: list[Any]) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", title=None)
    for col in ("replica", "state", "worker", "slots", "version"):
        table.add_column(col)
    for r in replicas:
        if not isinstance(r, Mapping):
            continue
        used = first(r, "slots_used", "used", "running")
        if r.get("ended_at") is not None:
            continue  # ended replicas are history, not capacity
        cap = first(r, "slots_cap", "slots", "capacity", "max_jobs")
        slots = ""
        if isinstance(cap, int):
            used_n = used if isinstance(used, int) else 0
            slots = f"{slot_bar(used_n, 0, cap)} {used_n}/{cap}"
        table.add_row(
            str(first(r, "replica_id", "id", "name") or "?"),
            str(r.get("state", "?")),
            str(r.get("worker_id") or "-"),
            slots,
            str(r.get("version") or "-"),
        )
    return table
