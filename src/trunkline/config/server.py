"""`[server]` and `[keys]`: where the server listens, its limits, its data
directory, and the API keys (with --dev's public dev key)."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import operator
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trunkline.common.errors import ErrorCollector
from trunkline.config._fields import _check_keys, _get

DEV_KEY = "devkey"
DEV_SECRET = "secret"
# The shortest API secret accepted outside --dev: HS256 keys of 256 bits, as
# LiveKit's own server requires in production.
MIN_SECRET_BYTES = 32


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 7880
    log_level: str = "info"
    log_format: str = "text"
    history_size: int = 10_000  # ended jobs kept for GET /v1/jobs/{id}
    # Clients reach the server over HTTPS through a TLS-terminating proxy: the
    # dashboard cookie is marked Secure even though this hop is plain HTTP.
    behind_tls_proxy: bool = False
    # Where the server keeps its files (the SQLite history); "" = default_data_dir().
    data_dir: str = ""
    # Bounds on what workers and clients can make the server hold (docs/config.md).
    max_worker_jobs: int = 1000  # largest `/agent?max_jobs=N` a worker may declare
    max_trace_events: int = 200  # trace events kept per job
    max_queued: int = 10_000  # queued jobs across all pools; new requests beyond: queue_full
    worker_outbound_limit_bytes: int = 4 << 20  # frames queued for a worker that is not reading


# `[server]` limit keys: (least allowed value, what the error says is allowed).
_SERVER_LIMITS = {
    "max_worker_jobs": (1, "an integer >= 1"),
    "max_trace_events": (10, "an integer >= 10"),
    "max_queued": (0, "an integer >= 0"),
    "worker_outbound_limit_bytes": (64 * 1024, "an integer >= 65536 (bytes)"),
}

_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def default_data_dir() -> Path:
    """`$XDG_STATE_HOME/trunkline` when XDG_STATE_HOME is set, else
    `./trunkline-data` (from the working directory): both work from a fresh
    clone and in a container, where HOME may be unset or read-only."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) / "trunkline" if os.path.isabs(state) else Path("trunkline-data")
    return base.absolute()


def data_dir(server: ServerConfig) -> Path:
    """The data directory `server` names, or the default one."""
    return Path(server.data_dir) if server.data_dir else default_data_dir()


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine: a loopback
    address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def dev_host_problem(host: str) -> str | None:
    """Why --dev may not bind `host` (None when it may)."""
    if is_loopback(host):
        return None
    return (
        f"--dev binds to loopback only, since its key devkey/secret is public (got {host!r}); "
        "use 127.0.0.1 or ::1, or remove --dev and configure [keys] to serve the network"
    )


def _server(data: Mapping[str, Any], dev: bool, e: ErrorCollector) -> ServerConfig:
    """`[server]`; with `dev`, bound to loopback (127.0.0.1 unless the file
    names another loopback host)."""
    server_t = data.get("server", {})
    server = ServerConfig(host="127.0.0.1") if dev else ServerConfig()
    if isinstance(server_t, dict):
        _check_keys(
            server_t,
            (
                "host",
                "port",
                "log_level",
                "log_format",
                "history_size",
                "behind_tls_proxy",
                "data_dir",
                *_SERVER_LIMITS,
            ),
            "server",
            e,
        )
        port = _get(server_t, "port", "server", e, "int", lambda v: 0 <= v <= 65535, "0..65535")
        host = _get(server_t, "host", "server", e, "str", lambda v: bool(v), "a host name or IP")
        level = _get(
            server_t, "log_level", "server", e, "str", lambda v: v in _LOG_LEVELS,
            "one of " + ", ".join(_LOG_LEVELS),
        )  # fmt: skip
        fmt = _get(
            server_t, "log_format", "server", e, "str", lambda v: v in _LOG_FORMATS,
            "'text' or 'json'",
        )  # fmt: skip
        hist = _get(server_t, "history_size", "server", e, "int", lambda v: v >= 0, ">= 0")
        proxy = _get(server_t, "behind_tls_proxy", "server", e, "bool", allowed="true or false")
        ddir = _get(server_t, "data_dir", "server", e, "str", bool, "a directory path")
        if dev and host is not None and (problem := dev_host_problem(host)) is not None:
            e.add("server.host", problem)
        limits = {}
        for key, (least, what) in _SERVER_LIMITS.items():
            v = _get(server_t, key, "server", e, "int", functools.partial(operator.le, least), what)
            if v is not None:
                limits[key] = v
        server = ServerConfig(
            **limits,
            host=host if host is not None else server.host,
            port=port if port is not None else server.port,
            log_level=level or server.log_level,
            log_format=fmt or server.log_format,
            history_size=hist if hist is not None else server.history_size,
            behind_tls_proxy=proxy if proxy is not None else server.behind_tls_proxy,
            data_dir=str(Path(ddir).expanduser().absolute()) if ddir else server.data_dir,
        )
    else:
        e.add("server", "must be a table")
    return server


def _keys(data: Mapping[str, Any], dev: bool, e: ErrorCollector) -> dict[str, str]:
    """`[keys]`: api_key = "api_secret"; with `dev`, only the dev key."""
    keys: dict[str, str] = {}
    keys_t = data.get("keys", {})
    if isinstance(keys_t, dict):
        for k, v in keys_t.items():
            if not isinstance(v, str) or not v:
                e.add(f"keys.{k}", "must be a non-empty secret string")
            elif not dev and len(v.encode()) < MIN_SECRET_BYTES:
                # The secret itself is never echoed: the error may end up in a log.
                e.add(
                    f"keys.{k}",
                    f"the secret is {len(v.encode())} bytes; at least {MIN_SECRET_BYTES} bytes "
                    "are required (make one with: openssl rand -base64 32)",
                )
            else:
                keys[k] = v
        if dev and keys_t:
            e.add(
                "keys",
                "--dev serves only the public dev key devkey/secret and cannot be combined "
                "with keys from a config file: remove --dev to serve these keys, or remove "
                "the [keys] section for local development",
            )
    else:
        e.add("keys", 'must be a table of api_key = "api_secret"')
    if dev:
        keys = {DEV_KEY: DEV_SECRET}
    return keys
