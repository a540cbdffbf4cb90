"""`trunkline serve`: run the server."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the dispatch server",
        description="Run the trunkline server: /agent, REST /v1, Twirp, /metrics on one port.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (docs/config.md)")
    p.add_argument("--host", help="bind address (overrides [server].host)")
    p.add_argument("--port", type=int, help="port (overrides [server].port; default 7880)")
    p.add_argument(
        "--dev",
        action="store_true",
        help="development mode: the public key 'devkey' / 'secret', no dashboard token, "
        "loopback only (refuses [keys] from --config and a non-loopback host)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("text", "json"))
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from trunkline.common.logs import setup_logging
    from trunkline.config import ConfigError, dev_host_problem, load_config
    from trunkline.providers import ProviderError
    from trunkline.server import run_server

    try:
        config = load_config(args.config, dev=args.dev)
    except ConfigError as exc:
        print(f"trunkline: {exc}", file=sys.stderr)
        return 2
    server = config.server
    server = dataclasses.replace(
        server,
        host=args.host or server.host,
        port=args.port if args.port is not None else server.port,
        log_level=args.log_level or server.log_level,
        log_format=args.log_format or server.log_format,
    )
    config = dataclasses.replace(config, server=server)
    if config.dev and (problem := dev_host_problem(server.host)) is not None:
        print(f"trunkline: --host: {problem}", file=sys.stderr)
        return 2
    if not config.keys:
        print(
            "trunkline: no API keys configured: add a [keys] section to the config "
            '(api_key = "api_secret") or run with --dev',
            file=sys.stderr,
        )
        return 2
    setup_logging(server.log_level, server.log_format)
    try:
        run_server(config)
    except ProviderError as exc:
        # A replica pool's provider cannot be built (e.g. a bad pod template).
        print(f"trunkline: {exc}", file=sys.stderr)
        return 2
    return 0
