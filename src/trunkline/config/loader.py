"""`parse_config` and `load_config`: every section through one
`ErrorCollector`, then one `Config` or one `ConfigError` listing it all."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trunkline.common.errors import ConfigError, ErrorCollector
from trunkline.config._fields import _check_keys
from trunkline.config.pools import (
    AutoscaleSettings,
    KubernetesSettings,
    ReplicaPoolConfig,
    _autoscale,
    _kubernetes,
    _pool,
    _replica_pool,
)
from trunkline.config.server import ServerConfig, _keys, _server
from trunkline.config.services import (
    ClusterConfig,
    MediaServer,
    StoreConfig,
    _cluster,
    _livekit,
    _store,
)
from trunkline.core.config import PoolConfig, agent_name_problem
from trunkline.sip.config import SipConfig, check_sip_config


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    # The section defaults are frozen dataclasses (ruff cannot see that across modules).
    server: ServerConfig = ServerConfig()  # noqa: RUF009
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    livekit: MediaServer | None = None
    defaults: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(agent_name=""))
    pools: Mapping[str, PoolConfig] = dataclasses.field(default_factory=dict)
    dev: bool = False
    sip: SipConfig | None = None
    replica_pools: Mapping[str, ReplicaPoolConfig] = dataclasses.field(default_factory=dict)
    autoscale: AutoscaleSettings = AutoscaleSettings()  # noqa: RUF009
    store: StoreConfig = StoreConfig()  # noqa: RUF009
    kubernetes: KubernetesSettings = KubernetesSettings()  # noqa: RUF009
    cluster: ClusterConfig | None = None  # None: one process, no Redis
    source: str = ""  # the file it was read from ("" = none): what a reload re-reads


def parse_config(data: Mapping[str, Any], *, dev: bool = False) -> Config:
    """Build a `Config` from parsed TOML. Raises `ConfigError` listing every
    problem. `dev` adds LiveKit's dev key (devkey/secret) and binds to
    127.0.0.1 unless the file names another loopback host; with `dev`, keys
    in the file or a host that is not loopback are errors. Outside `dev`
    every secret must have at least `MIN_SECRET_BYTES` bytes."""
    e = ErrorCollector()
    sections = ("server", "keys", "livekit", "defaults", "pools", "sip", "autoscale", "store")
    _check_keys(data, (*sections, "kubernetes", "cluster"), "", e)

    server = _server(data, dev, e)
    keys = _keys(data, dev, e)
    livekit = _livekit(data, e)

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
    autoscale = _autoscale(data, e)
    store = _store(data.get("store", {}), e)
    kubernetes = _kubernetes(data.get("kubernetes", {}), e)
    cluster = _cluster(data["cluster"], e) if "cluster" in data else None
    for trunk in sip.trunks if cluster is not None and sip is not None else ():
        if trunk.to_livekit:
            # A held call's room binding runs where the call came in, not at the owner.
            e.add(
                f"sip.trunks.{trunk.name}.downstream_kind",
                'livekit cannot be combined with [cluster] yet; use "gateway"',
            )
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
