"""The `trunkline` command.

Each subcommand lives in its own module under `trunkline.cli` and exposes
`register(subparsers)`, which adds its parser and sets `handler` to a function
taking the parsed namespace and returning the process exit code. Modules are
imported only when listed here, so a slow import in one command never slows
another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence

# Order is the order `trunkline --help` lists them.
COMMANDS: tuple[str, ...] = (
    "demo",
    "serve",
    "status",
    "jobs",
    "usage",
    "trace",
    "dispatch",
    "drain",
    "rollout",
    "plan",
    "worker",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trunkline",
        description="Control plane for real-time voice AI agents.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"trunkline.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"trunkline.cli.{name}":
                raise
            continue  # a command not built yet in this checkout
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by the console script)."""
    # LiveKit's dev secret ("secret") is shorter than PyJWT likes, and PyJWT
    # warns on every token made or checked with it. That is a property of the
    # configured keys, not news on each request.
    warnings.filterwarnings("ignore", message="The HMAC key is", module="jwt")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
