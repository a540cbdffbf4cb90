"""What trunkline talks to: `[store]` (the job history), `[cluster]` (Redis,
several servers) and `[livekit]` (the media server, and the bridge that
registers there as a worker)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from typing import Any

from trunkline.common.errors import ErrorCollector
from trunkline.config._fields import _check_keys, _get

STORE_BACKENDS = ("memory", "sqlite", "postgresql")
STORE_WRITERS = ("process", "thread")


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    """`[store]`: where ended jobs are kept (docs/history.md). `url` is the
    PostgreSQL URL (backend "postgresql" only); `retention_days` and
    `max_records` bound the history by age and by size (0: no bound).
    Backend "memory" keeps `[server] history_size` records, none on restart.
    `writer` says where a SQL store's writes run: "process" (a child process,
    off the server's CPU) or "thread" (a thread of the server)."""

    backend: str = "sqlite"
    url: str = ""
    retention_days: float = 90.0
    max_records: int = 1_000_000
    writer: str = "process"


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: several servers on one Redis (docs/cluster.md). `member`
    names this server ("" = host-pid-random); `advertise_url` is where the
    others send clients to it ("" = http://<host>:<port>); leases of pools
    last `lease_ttl_s`; store calls time out after `timeout_s`; a new owner
    waits up to `settle_s` for the old owner's workers to migrate."""

    redis_url: str
    namespace: str = "trunkline"
    member: str = ""
    advertise_url: str = ""
    lease_ttl_s: float = 1.0
    timeout_s: float = 0.25
    settle_s: float = 0.5


_CLUSTER_KEYS = (
    "redis_url", "namespace", "member", "advertise_url", "lease_ttl_s", "timeout_s", "settle_s",
)  # fmt: skip
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
    settle = _get(table, "settle_s", "cluster", e, "number", lambda v: 0 <= v <= 60, "0..60")
    if "redis_url" not in table:
        e.add("cluster.redis_url", "is required in [cluster] (redis://host:port/db)")
    elif url is not None and importlib.util.find_spec("redis") is None:
        e.add("cluster.redis_url", "cluster mode needs redis-py: pip install 'trunkline[cluster]'")
    default = ClusterConfig(redis_url="")
    eff_ttl = ttl if ttl is not None else default.lease_ttl_s
    eff_tmo = tmo if tmo is not None else default.timeout_s
    if (ttl is not None or tmo is not None) and eff_tmo * 2 > eff_ttl:
        e.add("cluster.timeout_s", f"{eff_tmo} must be at most half of lease_ttl_s ({eff_ttl})")
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
        settle_s=float(settle) if settle is not None else base.settle_s,
    )


def _store(table: Any, e: ErrorCollector) -> StoreConfig:
    """`[store]`: a backend name, or a PostgreSQL `url` (which implies it)."""
    if not isinstance(table, dict):
        e.add("store", "must be a table")
        return StoreConfig()
    _check_keys(table, ("backend", "url", "retention_days", "max_records", "writer"), "store", e)
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
    writer = _get(
        table, "writer", "store", e, "str", lambda v: v in STORE_WRITERS,
        "one of " + ", ".join(STORE_WRITERS),
    )  # fmt: skip
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
        writer=writer or base.writer,
    )


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


def _livekit(data: Mapping[str, Any], e: ErrorCollector) -> MediaServer | None:
    """`[livekit]` (None when absent): url and keys together, and the bridge."""
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
    return livekit
