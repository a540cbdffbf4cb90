"""Configuration: one TOML file, validated in full at start.

A wrong value is refused before anything listens, with a message naming the
key and what is allowed (`ConfigError`). Unknown keys are errors too: a typo
must not silently fall back to a default. Every error found, in every section
([sip] included), is reported at once, not just the first: one
`trunkline.common.errors.ErrorCollector` goes through them all.

Layout (all sections optional; see docs/config.md)::

    [server]            host, port, log_level, log_format, history_size,
                        behind_tls_proxy, data_dir; limits max_worker_jobs,
                        max_trace_events, max_queued, worker_outbound_limit_bytes
    [store]             backend, url, retention_days, max_records (job history)
    [keys]              api_key = "api_secret", ...  (workers and API clients)
    [livekit]           url, api_key, api_secret  (media server for room tokens);
                        bridge = true and bridge_* (register upstream as a worker)
    [defaults]          pool settings for agent names without their own section
    [pools."name"]      pool settings for agent name "name"; with `command`, an
                        autoscaled replica pool (provider, min/max_replicas,
                        spare_slots, ...)
    [autoscale]         run_dir (replica logs), url (what replicas connect to)
    [kubernetes]        kubeconfig, context, namespace, owner, instance,
                        unschedulable_timeout_s, on_shutdown (provider = "kubernetes")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import ipaddress
import json
import math
import operator
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trunkline.common.errors import ConfigError as ConfigError
from trunkline.common.errors import ErrorCollector
from trunkline.core.autoscale import ScaleSpec
from trunkline.core.config import Placement, PoolConfig, agent_name_problem
from trunkline.core.rollout import RolloutSpec
from trunkline.sip.config import SipConfig, check_sip_config

DEV_KEY = "devkey"
DEV_SECRET = "secret"
# The shortest API secret accepted outside --dev: HS256 keys of 256 bits, as
# LiveKit's own server requires in production.
MIN_SECRET_BYTES = 32

# Replica provider names a pool's `provider` key may hold. The factories live
# in `trunkline.providers` (a layer above this one); a provider added there is
# named here too, so an unknown name is refused before anything starts.
PROVIDERS: tuple[str, ...] = ("local", "kubernetes")


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


# `[livekit] bridge_job_types` values -> the protocol's JobType names.
BRIDGE_JOB_TYPES = {"room": "JT_ROOM", "participant": "JT_PARTICIPANT", "publisher": "JT_PUBLISHER"}


@dataclasses.dataclass(frozen=True, slots=True)
class BridgeSettings:
    """`[livekit] bridge = true`: trunkline registers with that server's
    `/agent` as a worker, `connections` times for each agent name and each of
    its job types (`job_types[name]`), and answers each offer within
    `answer_window_s` (the upstream gives up on the whole request about 2.8 s
    after it sent the offer)."""

    agent_names: tuple[str, ...]
    job_types: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    answer_window_s: float = 2.5
    connections: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class MediaServer:
    """A LiveKit media server: assignments carry its URL and a room token.
    With `bridge`, trunkline also registers there as a worker."""

    url: str
    api_key: str
    api_secret: str
    bridge: BridgeSettings | None = None
    # A job whose agent participant left its room (webhook) ends after this,
    # unless the agent comes back.
    webhook_grace_s: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaPoolConfig:
    """How trunkline starts one replica of an autoscaled pool, and its scaling.
    `provider` is one of `PROVIDERS`: what starts and stops the replicas."""

    command: tuple[str, ...]
    env: Mapping[str, str]
    scale: ScaleSpec
    provider: str = "local"
    # provider "kubernetes": the Pod or PodTemplate manifest each replica's pod
    # is made from (`command`, if given, replaces its first container's command).
    pod_template: str = ""
    # What starts its replicas, as a digest (`replica_version`): a change is a rollout.
    version: str = ""
    rollout: RolloutSpec = dataclasses.field(default_factory=RolloutSpec)


def replica_version(
    command: tuple[str, ...], env: Mapping[str, str], provider: str, pod_template: str = ""
) -> str:
    """A stable 12-hex digest of what starts a pool's replicas: the command and
    env, and for Kubernetes the pod template's bytes. Equal inputs, equal
    version, across runs and machines (a restarted server knows its replicas)."""
    h = hashlib.sha256()
    h.update(json.dumps([provider, list(command), sorted(env.items())]).encode())
    if pod_template:
        try:
            h.update(Path(pod_template).read_bytes())
        except OSError:
            h.update(pod_template.encode())  # refused elsewhere: "no such file"
    return h.hexdigest()[:12]


# `[kubernetes] owner` kinds (the provider looks the owner's uid up).
KUBERNETES_OWNER_KINDS = ("Deployment", "StatefulSet", "ConfigMap")


@dataclasses.dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """`[kubernetes]`: where the cluster is for pools with provider "kubernetes"
    ("" = the standard places: service account, KUBECONFIG, ~/.kube/config),
    the pods' owner ("Kind/name", "" = none), the label value that tells this
    trunkline's pods from another's, and how long a pod may stay unschedulable
    before its start counts as failed."""

    kubeconfig: str = ""
    context: str = ""
    namespace: str = ""
    owner: str = ""
    instance: str = "trunkline"
    unschedulable_timeout_s: float = 0.0
    # At shutdown: "leave" the pods for the next server to adopt, or "delete" them.
    on_shutdown: str = "leave"


@dataclasses.dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    """`[autoscale]`: where replica logs go ("" = a fresh temp dir) and the URL
    replicas connect to ("" = ws://127.0.0.1:<server port>)."""

    run_dir: str = ""
    url: str = ""


STORE_BACKENDS = ("memory", "sqlite", "postgresql")


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    """`[store]`: where ended jobs are kept (docs/history.md). `url` is the
    PostgreSQL URL (backend "postgresql" only); `retention_days` and
    `max_records` bound the history by age and by size (0: no bound).
    Backend "memory" keeps `[server] history_size` records, none on restart."""

    backend: str = "sqlite"
    url: str = ""
    retention_days: float = 90.0
    max_records: int = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: several servers on one Redis (docs/cluster.md). `member`
    names this server ("" = host-pid-random); `advertise_url` is where the
    others send clients to it ("" = http://<host>:<port>); leases of pools
    last `lease_ttl_s`; store calls time out after `timeout_s`."""

    redis_url: str
    namespace: str = "trunkline"
    member: str = ""
    advertise_url: str = ""
    lease_ttl_s: float = 2.0
    timeout_s: float = 0.5


_CLUSTER_KEYS = ("redis_url", "namespace", "member", "advertise_url", "lease_ttl_s", "timeout_s")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _is_name(v: str) -> bool:
    return _NAME_RE.fullmatch(v) is not None


def _cluster(table: Any, e: ErrorCollector) -> ClusterConfig | None:
    """`[cluster]`: absent = single process (no Redis, no redis import)."""
    if not isinstance(table, dict):
        e.add("cluster", "must be a table")
        return None
    _check_keys(table, _CLUSTER_KEYS, "cluster", e)
    url = _get(
        table, "redis_url", "cluster", e, "str",
        lambda v: v.split("://")[0] in ("redis", "rediss", "unix") and len(v.split("://")) > 1,
        "a redis://host:port/db, rediss:// or unix:// URL",
    )  # fmt: skip
    named = "1-64 of A-Z a-z 0-9 _ . -"
    ns = _get(table, "namespace", "cluster", e, "str", _is_name, named)
    member = _get(table, "member", "cluster", e, "str", _is_name, named)
    adv = _get(
        table, "advertise_url", "cluster", e, "str",
        lambda v: v.split("://")[0] in ("http", "https") and len(v.split("://")) > 1,
        "an http:// or https:// URL",
    )  # fmt: skip
    ttl = _get(table, "lease_ttl_s", "cluster", e, "number", lambda v: 0.3 <= v <= 60, "0.3..60")
    tmo = _get(table, "timeout_s", "cluster", e, "number", lambda v: 0.05 <= v <= 10, "0.05..10")
    if "redis_url" not in table:
        e.add("cluster.redis_url", "is required in [cluster] (redis://host:port/db)")
    elif url is not None and importlib.util.find_spec("redis") is None:
        e.add("cluster.redis_url", "cluster mode needs redis-py: pip install 'trunkline[cluster]'")
    if ttl is not None and tmo is not None and tmo * 2 > ttl:
        e.add("cluster.timeout_s", f"must be at most half of lease_ttl_s ({ttl})")
    if url is None:
        return None
    base = ClusterConfig(redis_url=url)
    return ClusterConfig(
        redis_url=url,
        namespace=ns or base.namespace,
        member=member or "",
        advertise_url=(adv or "").rstrip("/"),
        lease_ttl_s=float(ttl) if ttl is not None else base.lease_ttl_s,
        timeout_s=float(tmo) if tmo is not None else base.timeout_s,
    )


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
    store: StoreConfig = StoreConfig()
    kubernetes: KubernetesSettings = KubernetesSettings()
    cluster: ClusterConfig | None = None  # None: one process, no Redis
    source: str = ""  # the file it was read from ("" = none): what a reload re-reads


# `[server]` limit keys: (least allowed value, what the error says is allowed).
_SERVER_LIMITS = {
    "max_worker_jobs": (1, "an integer >= 1"),
    "max_trace_events": (10, "an integer >= 10"),
    "max_queued": (0, "an integer >= 0"),
    "worker_outbound_limit_bytes": (64 * 1024, "an integer >= 65536 (bytes)"),
}

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
    "pod_template",
    "env",
    "min_replicas",
    "max_replicas",
    "spare_slots",
    "scale_down_delay_s",
    "drain_timeout_s",
    "start_timeout_s",
    "rollout",
)

# `rollout = {...}` keys: (kind, check, what the error says is allowed).
_ROLLOUT_KEYS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "surge": ("int", lambda v: v >= 1, "an integer >= 1"),
    "canary_percent": ("number", lambda v: 0 <= v < 100, "a number >= 0 and < 100"),
    "max_start_failures": ("int", lambda v: v >= 1, "an integer >= 1"),
    "max_failed_calls_percent": ("number", lambda v: 0 <= v <= 100, "a number 0..100"),
    "min_calls": ("int", lambda v: v >= 1, "an integer >= 1"),
}


def _rollout(table: Mapping[str, Any], where: str, e: ErrorCollector) -> RolloutSpec:
    raw = table.get("rollout", {})
    if not isinstance(raw, dict):
        e.add(f"{where}.rollout", "must be a table, e.g. { canary_percent = 10 }")
        return RolloutSpec()
    _check_keys(raw, tuple(_ROLLOUT_KEYS), f"{where}.rollout", e)
    values: dict[str, Any] = {}
    for key, (kind, check, allowed) in _ROLLOUT_KEYS.items():
        v = _get(raw, key, f"{where}.rollout", e, kind, check, allowed)
        if v is not None:
            values[key] = float(v) if kind == "number" else v
    return RolloutSpec(**values)


def _replica_pool(
    name: str, table: Any, pool: PoolConfig, where: str, e: ErrorCollector
) -> ReplicaPoolConfig | None:
    """The autoscaling part of a pool section; None when it has no `command`."""
    if not isinstance(table, dict):
        return None
    given = [k for k in _SCALE_KEYS if k in table]
    # A Kubernetes pool may leave the command to its pod template.
    if "command" not in table and table.get("provider") != "kubernetes":
        if given:
            e.add(f"{where}.{given[0]}", "needs `command` (how to start one replica) in the pool")
        return None
    raw = table.get("command")
    command: tuple[str, ...] = ()
    if raw is None:
        pass
    elif isinstance(raw, str) and raw.strip():
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
    pod_template = _pod_template(table, provider or "local", where, e)
    return ReplicaPoolConfig(
        command=command,
        env=env,
        scale=spec,
        provider=provider or "local",
        pod_template=pod_template,
        version=replica_version(command, env, provider or "local", pod_template),
        rollout=_rollout(table, where, e),
    )


def _pod_template(table: Mapping[str, Any], provider: str, where: str, e: ErrorCollector) -> str:
    """`pod_template`: required with provider "kubernetes", refused otherwise,
    and a file that exists (its content is checked when the provider starts)."""
    path = _get(table, "pod_template", where, e, "str", bool, "a path to a Pod or PodTemplate YAML")
    if provider != "kubernetes":
        if path is not None:
            e.add(f"{where}.pod_template", 'only applies with provider = "kubernetes"')
        return ""
    if "pod_template" not in table:
        e.add(
            f"{where}.pod_template",
            'is required with provider = "kubernetes" (a Pod or PodTemplate manifest, YAML)',
        )
        return ""
    if path is not None and not Path(path).is_file():
        e.add(f"{where}.pod_template", f"no such file: {path}")
    return str(path or "")


def _kubernetes(raw: Any, e: ErrorCollector) -> KubernetesSettings:
    """`[kubernetes]`, every key checked."""
    if not isinstance(raw, dict):
        e.add("kubernetes", "must be a table")
        return KubernetesSettings()
    keys = tuple(f.name for f in dataclasses.fields(KubernetesSettings))
    _check_keys(raw, keys, "kubernetes", e)
    w = "kubernetes"
    dns_label = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
    label_value = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    kinds = ", ".join(KUBERNETES_OWNER_KINDS)
    values = {
        "kubeconfig": _get(raw, "kubeconfig", w, e, "str", bool, "a path to a kubeconfig file"),
        "context": _get(raw, "context", w, e, "str", bool, "a kubeconfig context name"),
        "namespace": _get(
            raw, "namespace", w, e, "str", lambda v: re.match(dns_label, v) is not None,
            "a namespace name (lowercase letters, digits and '-', at most 63)",
        ),
        "owner": _get(
            raw, "owner", w, e, "str",
            lambda v: v.partition("/")[0] in KUBERNETES_OWNER_KINDS and bool(v.partition("/")[2]),
            f'"Kind/name" with Kind one of {kinds}, e.g. "Deployment/trunkline"',
        ),
        "instance": _get(
            raw, "instance", w, e, "str", lambda v: re.match(label_value, v) is not None,
            "a label value (letters, digits, '-', '_', '.', at most 63)",
        ),
        "unschedulable_timeout_s": _get(
            raw, "unschedulable_timeout_s", w, e, "number", lambda v: v >= 0, "a number >= 0"
        ),
        "on_shutdown": _get(
            raw, "on_shutdown", w, e, "str", lambda v: v in ("leave", "delete"),
            '"leave" (the next server adopts the pods) or "delete"',
        ),
    }  # fmt: skip
    kc = values["kubeconfig"]
    if kc is not None and not Path(kc).is_file():
        e.add("kubernetes.kubeconfig", f"no such file: {kc}")
    given = {k: v for k, v in values.items() if v is not None}
    if "unschedulable_timeout_s" in given:
        given["unschedulable_timeout_s"] = float(given["unschedulable_timeout_s"])
    return KubernetesSettings(**given)


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
        ("max_queued", "int", lambda v: v >= 0, "an integer >= 0"),
        ("terminate_timeout_s", "number", lambda v: v > 0, "a number > 0"),
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


def _store(table: Any, e: ErrorCollector) -> StoreConfig:
    """`[store]`: a backend name, or a PostgreSQL `url` (which implies it)."""
    if not isinstance(table, dict):
        e.add("store", "must be a table")
        return StoreConfig()
    _check_keys(table, ("backend", "url", "retention_days", "max_records"), "store", e)
    backend = _get(
        table, "backend", "store", e, "str", lambda v: v in STORE_BACKENDS,
        "one of " + ", ".join(STORE_BACKENDS),
    )  # fmt: skip
    url = _get(
        table, "url", "store", e, "str",
        lambda v: v.split("://")[0] in ("postgresql", "postgres") and len(v.split("://")) > 1,
        "a postgresql://user:password@host:port/database URL",
    )  # fmt: skip
    days = _get(table, "retention_days", "store", e, "number", lambda v: v >= 0, "a number >= 0")
    cap = _get(table, "max_records", "store", e, "int", lambda v: v >= 0, "an integer >= 0")
    if backend is None and url is not None:
        backend = "postgresql"
    if backend == "postgresql":
        if url is None and "url" not in table:
            e.add("store.url", 'is required with backend "postgresql" (postgresql://...)')
        elif importlib.util.find_spec("asyncpg") is None:
            e.add(
                "store.backend",
                "PostgreSQL needs the asyncpg driver: pip install 'trunkline[postgres]'",
            )
    elif backend is not None and "url" in table:
        e.add("store.url", f'is only for backend "postgresql" (backend is {backend!r})')
    base = StoreConfig()
    return StoreConfig(
        backend=backend or base.backend,
        url=url or "",
        retention_days=float(days) if days is not None else base.retention_days,
        max_records=cap if cap is not None else base.max_records,
    )


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


_BRIDGE_KEYS = (
    "bridge",
    "bridge_agent_names",
    "bridge_job_types",
    "bridge_answer_window_s",
    "bridge_connections",
)


def _bridge(
    lk: Mapping[str, Any], pools: tuple[str, ...], e: ErrorCollector
) -> BridgeSettings | None:
    """The bridge settings of `[livekit]` (None unless `bridge = true`)."""
    on = _get(lk, "bridge", "livekit", e, "bool", allowed="true or false")
    if not on:
        for k in _BRIDGE_KEYS[1:]:
            if k in lk:
                e.add(
                    f"livekit.{k}", "has no effect without bridge = true; set it or remove this key"
                )
        return None
    names = lk.get("bridge_agent_names", list(pools))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        e.add("livekit.bridge_agent_names", "must be a list of agent names")
        names = []
    elif not names:
        e.add(
            "livekit.bridge_agent_names",
            "bridge = true needs an agent name to register upstream: configure "
            '[pools."name"] sections or list them in bridge_agent_names',
        )
    raw = lk.get("bridge_job_types", ["room"])
    per_name = raw if isinstance(raw, dict) else dict.fromkeys(names, raw)
    types: dict[str, tuple[str, ...]] = {}
    for name in names:
        t = per_name.get(name, ["room"])
        if (
            not isinstance(t, list)
            or not t
            or not all(isinstance(x, str) and x in BRIDGE_JOB_TYPES for x in t)
        ):
            e.add(
                "livekit.bridge_job_types" + (f".{name}" if isinstance(raw, dict) else ""),
                f"must be a non-empty list of {', '.join(BRIDGE_JOB_TYPES)} (got {t!r}); "
                'or a table of agent name = ["room", ...]',
            )
            t = ["room"]
        types[name] = tuple(dict.fromkeys(t))
    if isinstance(raw, dict):
        for name in raw:
            if name not in names:
                e.add(f"livekit.bridge_job_types.{name}", "is not a bridged agent name")
    window = _get(
        lk, "bridge_answer_window_s", "livekit", e, "number", lambda v: 0.1 <= v <= 9.5,
        "0.1..9.5 seconds (the LiveKit server waits about 2.8 s; keep it below that)",
    )  # fmt: skip
    conns = _get(lk, "bridge_connections", "livekit", e, "int", lambda v: 1 <= v <= 16, "1..16")
    return BridgeSettings(
        agent_names=tuple(dict.fromkeys(names)),
        job_types=types,
        answer_window_s=float(window) if window is not None else 2.5,
        connections=conns if conns is not None else 1,
    )


def parse_config(data: Mapping[str, Any], *, dev: bool = False) -> Config:
    """Build a `Config` from parsed TOML. Raises `ConfigError` listing every
    problem. `dev` adds LiveKit's dev key (devkey/secret) and binds to
    127.0.0.1 unless the file names another loopback host; with `dev`, keys
    in the file or a host that is not loopback are errors. Outside `dev`
    every secret must have at least `MIN_SECRET_BYTES` bytes."""
    e = ErrorCollector()
    sections = ("server", "keys", "livekit", "defaults", "pools", "sip", "autoscale", "store")
    _check_keys(data, (*sections, "kubernetes", "cluster"), "", e)

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
            _check_keys(
                lk, ("url", "api_key", "api_secret", "webhook_grace_s", *_BRIDGE_KEYS), "livekit", e
            )
            grace = _get(
                lk, "webhook_grace_s", "livekit", e, "number", lambda v: 0 <= v <= 300,
                "0..300 seconds",
            )  # fmt: skip
            url = _get(
                lk, "url", "livekit", e, "str",
                lambda v: v.split("://")[0] in ("ws", "wss", "http", "https"),
                "a ws://, wss://, http:// or https:// URL",
            )  # fmt: skip
            key = _get(lk, "api_key", "livekit", e, "str", bool, "a non-empty string")
            secret = _get(lk, "api_secret", "livekit", e, "str", bool, "a non-empty string")
            missing = [k for k in ("url", "api_key", "api_secret") if k not in lk]
            pool_names = data.get("pools", {})
            bridge = _bridge(lk, tuple(pool_names) if isinstance(pool_names, dict) else (), e)
            if url and key and secret:
                livekit = MediaServer(url, key, secret, bridge, grace if grace is not None else 5.0)
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
            if (problem := agent_name_problem(name)) is not None:
                e.add(f"pools.{name[:40]}", problem)
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
    store = _store(data.get("store", {}), e)
    kubernetes = _kubernetes(data.get("kubernetes", {}), e)
    cluster = _cluster(data["cluster"], e) if "cluster" in data else None
    if cluster is not None and (sip is not None or (livekit and livekit.bridge)):
        # Not yet: a SIP call or a bridged job at a member that does not own
        # its pool would be refused, not relayed (docs/cluster.md).
        e.add("cluster", "cannot be combined with [sip] or the LiveKit bridge yet")
    for trunk in sip.trunks if sip is not None and livekit is None else ():
        if trunk.to_livekit:
            # The held call's agent joins LiveKit SIP's room with a token from these keys.
            e.add(f"sip.trunks.{trunk.name}.downstream_kind", "livekit needs [livekit] url/keys")
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
        store=store,
        kubernetes=kubernetes,
        cluster=cluster,
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
    return dataclasses.replace(parse_config(data, dev=dev), source=str(Path(path).absolute()))
