"""Configuration: one TOML file, validated in full at start.

A wrong value is refused before anything listens, with a message naming the
key and what is allowed (`ConfigError`). Unknown keys are errors too: a typo
must not silently fall back to a default. Every error found, in every section
([sip] included), is reported at once, not just the first: one
`trunkline.common.errors.ErrorCollector` goes through them all.

Layout (all sections optional; see docs/config.md)::

    [server]            host, port, log_level, log_format, history_size,
                        behind_tls_proxy
    [keys]              api_key = "api_secret", ...  (workers and API clients)
    [livekit]           url, api_key, api_secret  (media server for room tokens)
    [defaults]          pool settings for agent names without their own section
    [pools."name"]      pool settings for agent name "name"; with `command`, an
                        autoscaled replica pool (provider, min/max_replicas,
                        spare_slots, ...)
    [autoscale]         run_dir (replica logs), url (what replicas connect to)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trunkline.common.errors import ConfigError as ConfigError
from trunkline.common.errors import ErrorCollector
from trunkline.core.autoscale import ScaleSpec
from trunkline.core.config import Placement, PoolConfig
from trunkline.sip.config import SipConfig, check_sip_config

DEV_KEY = "devkey"
DEV_SECRET = "secret"
# The shortest API secret accepted outside --dev: HS256 keys of 256 bits, as
# LiveKit's own server requires in production.
MIN_SECRET_BYTES = 32

# Replica provider names a pool's `provider` key may hold. The factories live
# in `trunkline.providers` (a layer above this one); a provider added there is
# named here too, so an unknown name is refused before anything starts.
PROVIDERS: tuple[str, ...] = ("local",)


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


@dataclasses.dataclass(frozen=True, slots=True)
class MediaServer:
    """A LiveKit media server: assignments carry its URL and a room token."""

    url: str
    api_key: str
    api_secret: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaPoolConfig:
    """How trunkline starts one replica of an autoscaled pool, and its scaling.
    `provider` is one of `PROVIDERS`: what starts and stops the replicas."""

    command: tuple[str, ...]
    env: Mapping[str, str]
    scale: ScaleSpec
    provider: str = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    """`[autoscale]`: where replica logs go ("" = a fresh temp dir) and the URL
    replicas connect to ("" = ws://127.0.0.1:<server port>)."""

    run_dir: str = ""
    url: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    livekit: MediaServer | None = None
    defaults: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(agent_name=""))
    pools: Mapping[str, PoolConfig] = dataclasses.field(default_factory=dict)
    dev: bool = False
    sip: SipConfig | None = None
    replica_pools: Mapping[str, ReplicaPoolConfig] = dataclasses.field(default_factory=dict)
    autoscale: AutoscaleSettings = AutoscaleSettings()


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def _check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], where: str, e: ErrorCollector
) -> None:
    for key in table:
        if key not in allowed:
            e.add(f"{where}.{key}" if where else key, f"unknown key; allowed: {', '.join(allowed)}")


def _get(
    table: Mapping[str, Any],
    key: str,
    where: str,
    e: ErrorCollector,
    kind: str,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
) -> Any:
    """Fetch and type-check one value; None when absent or invalid."""
    if key not in table:
        return None
    value = table[key]
    name = f"{where}.{key}"
    ok: bool
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if ok and check is not None:
        ok = check(value)
    if not ok:
        e.add(name, f"must be {allowed or kind} (got {value!r})")
        return None
    return value


# Every scheduling setting of a pool, as PoolConfig declares them.
_POOL_KEYS = tuple(f.name for f in dataclasses.fields(PoolConfig) if f.name != "agent_name")


# Keys of an autoscaled pool: only in a [pools."name"] section, only with `command`.
_SCALE_KEYS = (
    "command",
    "provider",
    "env",
    "min_replicas",
    "max_replicas",
    "spare_slots",
    "scale_down_delay_s",
    "drain_timeout_s",
    "start_timeout_s",
)


def _replica_pool(
    name: str, table: Any, pool: PoolConfig, where: str, e: ErrorCollector
) -> ReplicaPoolConfig | None:
    """The autoscaling part of a pool section; None when it has no `command`."""
    if not isinstance(table, dict):
        return None
    given = [k for k in _SCALE_KEYS if k in table]
    if "command" not in table:
        if given:
            e.add(f"{where}.{given[0]}", "needs `command` (how to start one replica) in the pool")
        return None
    raw = table["command"]
    command: tuple[str, ...] = ()
    if isinstance(raw, str) and raw.strip():
        try:
            command = tuple(shlex.split(raw))
        except ValueError as exc:
            e.add(f"{where}.command", f"cannot be split into arguments: {exc}")
    elif isinstance(raw, list) and raw and all(isinstance(a, str) and a for a in raw):
        command = tuple(raw)
    else:
        e.add(f"{where}.command", f"must be a non-empty string or list of strings (got {raw!r})")
    provider = _get(
        table, "provider", where, e, "str", lambda v: v in PROVIDERS,
        "one of the replica providers: " + ", ".join(PROVIDERS),
    )  # fmt: skip
    env: dict[str, str] = {}
    raw_env = table.get("env", {})
    if isinstance(raw_env, dict) and all(isinstance(v, str) for v in raw_env.values()):
        env = dict(raw_env)
    else:
        e.add(f"{where}.env", 'must be a table of NAME = "value" strings')
    if pool.max_jobs_per_worker is None:
        e.add(
            f"{where}.max_jobs_per_worker",
            "is required in a pool with `command` (slots per replica, used to size the pool)",
        )
    values: dict[str, Any] = {}
    for key, kind, check, allowed in (
        ("min_replicas", "int", lambda v: v >= 0, "an integer >= 0"),
        ("max_replicas", "int", lambda v: v >= 1, "an integer >= 1"),
        ("spare_slots", "int", lambda v: v >= 0, "an integer >= 0"),
        ("scale_down_delay_s", "number", lambda v: v >= 0, "a number >= 0"),
        ("drain_timeout_s", "number", lambda v: v >= 0, "a number >= 0"),
        ("start_timeout_s", "number", lambda v: v > 0, "a number > 0"),
    ):
        v = _get(table, key, where, e, kind, check, allowed)
        if v is not None:
            values[key] = float(v) if kind == "number" else v
    spec = ScaleSpec(slots_per_replica=pool.max_jobs_per_worker or 1)
    spec = dataclasses.replace(spec, **values)
    if "max_replicas" not in values and spec.max_replicas < spec.min_replicas:
        spec = dataclasses.replace(spec, max_replicas=spec.min_replicas)
    if spec.min_replicas > spec.max_replicas:
        e.add(
            f"{where}.min_replicas",
            f"must be <= max_replicas ({spec.min_replicas} > {spec.max_replicas})",
        )
    return ReplicaPoolConfig(command=command, env=env, scale=spec, provider=provider or "local")


def _pool(name: str, table: Any, base: PoolConfig, where: str, e: ErrorCollector) -> PoolConfig:
    if not isinstance(table, dict):
        e.add(where, "must be a table")
        return dataclasses.replace(base, agent_name=name)
    if where == "defaults":
        for key in _SCALE_KEYS:
            if key in table:
                e.add(f"defaults.{key}", 'only allowed in a [pools."agent-name"] section')
        table = {k: v for k, v in table.items() if k not in _SCALE_KEYS}
    _check_keys(table, _POOL_KEYS + _SCALE_KEYS, where, e)
    values: dict[str, Any] = {"agent_name": name}
    pos_int = "an integer >= 1"
    nonneg = "a number >= 0"
    for key, kind, check, allowed in (
        ("max_jobs_per_worker", "int", lambda v: v >= 1, pos_int),
        ("max_concurrent_jobs", "int", lambda v: v >= 1, pos_int),
        ("queue_max_wait_s", "number", lambda v: v >= 0, nonneg),
        ("availability_timeout_s", "number", lambda v: v > 0, "a number > 0"),
        ("load_threshold", "number", lambda v: 0 < v <= 1, "a number in (0, 1]"),
        ("refusal_backoff_s", "number", lambda v: v >= 0, nonneg),
        ("max_strikes", "int", lambda v: v >= 1, pos_int),
        ("reconnect_grace_s", "number", lambda v: v >= 0, nonneg),
        ("redispatch_on_worker_loss", "bool", None, "true or false"),
    ):
        v = _get(table, key, where, e, kind, check, allowed)
        if v is not None:
            values[key] = float(v) if kind == "number" else v
    placement = _get(
        table, "placement", where, e, "str", lambda v: v in ("pack", "spread"), "'pack' or 'spread'"
    )
    if placement is not None:
        values["placement"] = Placement(placement)
    return dataclasses.replace(base, **values)


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


def parse_config(data: Mapping[str, Any], *, dev: bool = False) -> Config:
    """Build a `Config` from parsed TOML. Raises `ConfigError` listing every
    problem. `dev` adds LiveKit's dev key (devkey/secret) and binds to
    127.0.0.1 unless the file names another loopback host; with `dev`, keys
    in the file or a host that is not loopback are errors. Outside `dev`
    every secret must have at least `MIN_SECRET_BYTES` bytes."""
    e = ErrorCollector()
    _check_keys(data, ("server", "keys", "livekit", "defaults", "pools", "sip", "autoscale"), "", e)

    server_t = data.get("server", {})
    server = ServerConfig(host="127.0.0.1") if dev else ServerConfig()
    if isinstance(server_t, dict):
        _check_keys(
            server_t,
            ("host", "port", "log_level", "log_format", "history_size", "behind_tls_proxy"),
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
        if dev and host is not None and (problem := dev_host_problem(host)) is not None:
            e.add("server.host", problem)
        server = ServerConfig(
            host=host if host is not None else server.host,
            port=port if port is not None else server.port,
            log_level=level or server.log_level,
            log_format=fmt or server.log_format,
            history_size=hist if hist is not None else server.history_size,
            behind_tls_proxy=proxy if proxy is not None else server.behind_tls_proxy,
        )
    else:
        e.add("server", "must be a table")

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

    livekit: MediaServer | None = None
    lk = data.get("livekit")
    if lk is not None:
        if not isinstance(lk, dict):
            e.add("livekit", "must be a table")
        else:
            _check_keys(lk, ("url", "api_key", "api_secret"), "livekit", e)
            url = _get(
                lk, "url", "livekit", e, "str",
                lambda v: v.split("://")[0] in ("ws", "wss", "http", "https"),
                "a ws://, wss://, http:// or https:// URL",
            )  # fmt: skip
            key = _get(lk, "api_key", "livekit", e, "str", bool, "a non-empty string")
            secret = _get(lk, "api_secret", "livekit", e, "str", bool, "a non-empty string")
            missing = [k for k in ("url", "api_key", "api_secret") if k not in lk]
            if url and key and secret:
                livekit = MediaServer(url, key, secret)
            elif lk and missing:
                # A partial section must not silently mean "no media server".
                e.add(
                    "livekit",
                    f"needs url, api_key and api_secret together (missing: {', '.join(missing)})",
                )

    defaults = _pool("", data.get("defaults", {}), PoolConfig(agent_name=""), "defaults", e)
    pools: dict[str, PoolConfig] = {}
    replica_pools: dict[str, ReplicaPoolConfig] = {}
    pools_t = data.get("pools", {})
    if isinstance(pools_t, dict):
        for name, table in pools_t.items():
            pools[name] = _pool(name, table, defaults, f"pools.{name}", e)
            rp = _replica_pool(name, table, pools[name], f"pools.{name}", e)
            if rp is not None:
                replica_pools[name] = rp
    else:
        e.add("pools", 'must be a table of [pools."agent-name"] sections')

    sip: SipConfig | None = None
    sip_t = data.get("sip")
    if sip_t is not None:
        if not isinstance(sip_t, dict):
            e.add("sip", "must be a table")
        else:
            sip = check_sip_config(sip_t, e)
    autoscale = AutoscaleSettings()
    as_t = data.get("autoscale", {})
    if isinstance(as_t, dict):
        _check_keys(as_t, ("run_dir", "url"), "autoscale", e)
        run_dir = _get(as_t, "run_dir", "autoscale", e, "str", bool, "a directory path")
        url = _get(
            as_t, "url", "autoscale", e, "str",
            lambda v: v.split("://")[0] in ("ws", "wss", "http", "https"),
            "a ws://, wss://, http:// or https:// URL",
        )  # fmt: skip
        autoscale = AutoscaleSettings(run_dir=run_dir or "", url=url or "")
    else:
        e.add("autoscale", "must be a table")
    e.raise_if_any()
    return Config(
        server=server,
        keys=keys,
        livekit=livekit,
        defaults=defaults,
        pools=pools,
        dev=dev,
        sip=sip,
        replica_pools=replica_pools,
        autoscale=autoscale,
    )


def load_config(path: str | Path | None, *, dev: bool = False) -> Config:
    """Read and validate a TOML file (None: embedded defaults only)."""
    if path is None:
        return parse_config({}, dev=dev)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(data, dev=dev)
