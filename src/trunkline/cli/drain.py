"""`trunkline drain WORKER_ID`: stop offering jobs to a worker.

Sends `POST /v1/workers/{id}/drain`. Its running jobs continue; it gets no new
offers. Exit 0 with the worker's state, 1 if no such worker is connected.
"""

from __future__ import annotations

import argparse
from typing import Any

from trunkline.cli._client import OK, Client, add_client_args, console, print_json, run
from trunkline.cli._fmt import slot_bar


def register(subparsers: Any) -> None:
    """Add the `drain` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "drain",
        help="stop offering jobs to a worker (its running jobs continue)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("worker_id", metavar="WORKER_ID")
    add_client_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        w = await client.request("POST", f"/v1/workers/{args.worker_id}/drain")
        if args.json:
            print_json(w)
        else:
            cap = w.get("capacity")
            console().print(
                f"worker [bold]{w['worker_id']}[/] ({w.get('agent_name') or '(default)'}) "
                f"draining: {slot_bar(w.get('running', 0), w.get('reserved', 0), cap)} "
                f"{w.get('running', 0)} running jobs continue, no new offers"
            )
        return OK

    return run(args, body)
