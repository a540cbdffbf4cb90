"""`trunkline rollout POOL`: move an autoscaled pool to its configured version
without cutting a call.

Sends `POST /v1/pools/{pool}/rollout`. Without options the server re-reads its
config file and rolls POOL to the version it now names (the digest of its
command and env, or its pod template): new replicas start, new calls move to
them as they become ready, old ones drain and stop once empty. `--canary N`
sends N % of new calls to the new version and keeps the old replicas until
`--promote` (roll the rest) or `--abort` (back to the old version); on a
running canary it changes its share. Exit 0
with the rollout's state, 1 if the pool is not autoscaled or there is no
rollout to promote or abort, 2 for a config the server refuses.
"""

from __future__ import annotations

import argparse
from typing import Any

from trunkline.cli._client import OK, Client, add_client_args, console, print_json, run


def register(subparsers: Any) -> None:
    """Add the `rollout` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "rollout",
        help="move an autoscaled pool to a new version (canary, promote, abort)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pool", metavar="POOL")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--canary", type=float, metavar="N", help="send N %% of new calls to the new version"
    )
    how.add_argument("--promote", action="store_true", help="roll a canary out to every replica")
    how.add_argument("--abort", action="store_true", help="roll back to the old version")
    add_client_args(p)
    p.set_defaults(handler=_run)


def describe(data: dict[str, Any]) -> list[str]:
    """Lines for people: the message, the phase and the replicas by version."""
    lines = [str(data.get("message", ""))]
    ro = data.get("rollout") or {}
    if ro:
        lines.append(
            f"rollout {ro.get('from') or '(none)'} -> {ro.get('to')}: {ro.get('phase')}"
            + (f" (canary {ro['canary_percent']:g} %)" if ro.get("canary_percent") else "")
            + (f"; {ro['reason']}" if ro.get("reason") else "")
        )
        for r in ro.get("replicas") or []:
            if r.get("state") not in ("stopped", "failed"):
                lines.append(f"  {r.get('version') or '?'}: {r.get('count')} {r.get('state')}")
    return lines


def _run(args: argparse.Namespace) -> int:
    action = "promote" if args.promote else "abort" if args.abort else "start"
    payload: dict[str, Any] = {"action": action}
    if args.canary is not None:
        payload["canary_percent"] = args.canary

    async def body(client: Client) -> int:
        data = await client.request("POST", f"/v1/pools/{args.pool}/rollout", body=payload)
        if args.json:
            print_json(data)
        else:
            for line in describe(data):
                console().print(line, markup=False, highlight=False)
        return OK

    return run(args, body)
