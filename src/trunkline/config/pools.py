"""`[defaults]`, `[pools."name"]` (scheduling, and with `command` an
autoscaled replica pool and its rollout), `[kubernetes]` and `[autoscale]`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trunkline.common.errors import ErrorCollector
from trunkline.config._fields import _check_keys, _get
from trunkline.core.autoscale import ScaleSpec
from trunkline.core.config import Placement, PoolConfig
from trunkline.core.rollout import RolloutSpec

# Replica provider names a pool's `provider` key may hold. The factories live
# in `trunkline.providers` (a layer above this one); a provider added there is
# named here too, so an unknown name is refused before anything starts.
PROVIDERS: tuple[str, ...] = ("local", "kubernetes")


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


def _autoscale(data: Mapping[str, Any], e: ErrorCollector) -> AutoscaleSettings:
    """`[autoscale]`: run_dir and url, both optional."""
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
    return autoscale
