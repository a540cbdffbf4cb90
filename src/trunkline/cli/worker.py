"""`trunkline worker MODULE:FUNCTION`: run one worker replica of an agent.

The function is the job entrypoint (`async def entrypoint(ctx: JobContext)`).
Server address and credentials come from the flags or from LiveKit's variables
(`LIVEKIT_URL`, `LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`), which trunkline's
local provider sets for each replica. SIGTERM drains the worker (running jobs
finish, their final status is reported) and the command exits 0.
"""

from __future__ import annotations

import argparse
from typing import Any

_LOG_LEVELS = ("debug", "info", "warning", "error")


def register(subparsers: Any) -> None:
    """Add the `worker` subcommand to the `trunkline` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run a worker replica for an agent entrypoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "entrypoint",
        metavar="MODULE:FUNCTION",
        help="job entrypoint, e.g. examples.echo_agent:entrypoint (MODULE is imported "
        "with the current directory on the path)",
    )
    parser.add_argument(
        "--max-jobs",
        type=int,
        default=4,
        help="concurrent jobs this replica takes; declared to the server (default: 4)",
    )
    parser.add_argument("--agent-name", default="", help="agent name to register as")
    parser.add_argument("--url", default=None, help="server URL (default: $LIVEKIT_URL)")
    parser.add_argument("--api-key", default=None, help="API key (default: $LIVEKIT_API_KEY)")
    parser.add_argument(
        "--api-secret", default=None, help="API secret (default: $LIVEKIT_API_SECRET)"
    )
    parser.add_argument(
        "--num-idle-processes",
        type=int,
        default=None,
        help="warm job processes kept ready (default: 2)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds running jobs get to finish on SIGTERM (default: 1800)",
    )
    parser.add_argument("--log-level", choices=_LOG_LEVELS, default="info")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here: `trunkline --help` and other commands must not pay for them.
    import dataclasses
    import importlib
    import os
    import sys

    from trunkline.worker import WorkerOptions, run_app

    module_name, _, attr = args.entrypoint.partition(":")
    if not module_name or not attr:
        print(
            f"trunkline worker: expected MODULE:FUNCTION, got {args.entrypoint!r}", file=sys.stderr
        )
        return 2
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        entrypoint = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        print(f"trunkline worker: cannot load {args.entrypoint!r}: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {
        "ws_url": args.url,
        "api_key": args.api_key,
        "api_secret": args.api_secret,
        "num_idle_processes": args.num_idle_processes,
        "drain_timeout": args.drain_timeout,
    }
    try:
        opts = WorkerOptions(
            entrypoint_fnc=entrypoint, max_jobs=args.max_jobs, agent_name=args.agent_name
        )
        opts = dataclasses.replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as exc:
        print(f"trunkline worker: {exc}", file=sys.stderr)
        return 2
    return run_app(opts, log_level=args.log_level, log_format=args.log_format)
