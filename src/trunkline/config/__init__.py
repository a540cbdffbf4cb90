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
    [cluster]           redis_url, namespace, member, ... (several servers on Redis)
    [sip]               trunks, listen address (`trunkline.sip.config`)

One module per concern: `server` ([server], [keys], --dev), `pools`
([defaults], [pools."name"], rollout, [kubernetes], [autoscale]), `services`
([store], [cluster], [livekit] and its bridge), `loader` (`parse_config`,
`load_config`: every section through one collector). Import from this
package; the submodules are internal.
"""

from __future__ import annotations

from trunkline.common.errors import ConfigError
from trunkline.config.loader import (
    Config,
    load_config,
    parse_config,
)
from trunkline.config.pools import (
    KUBERNETES_OWNER_KINDS,
    PROVIDERS,
    AutoscaleSettings,
    KubernetesSettings,
    ReplicaPoolConfig,
    replica_version,
)
from trunkline.config.server import (
    DEV_KEY,
    DEV_SECRET,
    MIN_SECRET_BYTES,
    ServerConfig,
    data_dir,
    default_data_dir,
    dev_host_problem,
    is_loopback,
)
from trunkline.config.services import (
    BRIDGE_JOB_TYPES,
    STORE_BACKENDS,
    BridgeSettings,
    ClusterConfig,
    MediaServer,
    StoreConfig,
)

__all__ = [
    "BRIDGE_JOB_TYPES",
    "DEV_KEY",
    "DEV_SECRET",
    "KUBERNETES_OWNER_KINDS",
    "MIN_SECRET_BYTES",
    "PROVIDERS",
    "STORE_BACKENDS",
    "AutoscaleSettings",
    "BridgeSettings",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "KubernetesSettings",
    "MediaServer",
    "ReplicaPoolConfig",
    "ServerConfig",
    "StoreConfig",
    "data_dir",
    "default_data_dir",
    "dev_host_problem",
    "is_loopback",
    "load_config",
    "parse_config",
    "replica_version",
]
