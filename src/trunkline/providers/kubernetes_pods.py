"""Pods for the Kubernetes provider, as data: built from a template, read back.

Pure functions over JSON-shaped dicts (no client library, no I/O beyond
reading the template file), so the rules are tested without a cluster:

- `load_template(path)`: a Pod or PodTemplate manifest (YAML) -> its pod
  metadata and spec, checked for what trunkline needs (a container).
- `build_pod(...)`: the pod one replica runs in. Named after the replica
  (`<instance>-<replica id>`, so a create retried after a lost answer finds
  its own pod instead of making a second one), labelled with the instance,
  pool and replica, the launch's environment added to the first container,
  `restartPolicy: Never` (the autoscaler replaces failed replicas itself),
  `terminationGracePeriodSeconds` raised to at least the pool's drain limit,
  and `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`.
- `PodView.of(pod)`: the few facts the provider keeps per pod (a watch of
  1,000 pods holds 1,000 of these, not 1,000 pod objects).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trunkline.common.exits import describe_exit
from trunkline.providers.protocol import Launch, ProviderError

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "trunkline.dev/instance"
LABEL_POOL = "trunkline.dev/pool"
LABEL_REPLICA = "trunkline.dev/replica"
LABEL_VERSION = "trunkline.dev/version"
# Label values are limited to 63 characters of [A-Za-z0-9_.-]; the exact pool
# name and replica id are kept in annotations too.
ANNOTATION_POOL = "trunkline.dev/pool"
ANNOTATION_REPLICA = "trunkline.dev/replica-id"
ANNOTATION_VERSION = "trunkline.dev/version"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
TOKEN_ENV = "TRUNKLINE_REPLICA_TOKEN"

# Waiting reasons after which a container will not start without a change
# from someone (an image that cannot be pulled, a bad container config).
FATAL_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class PodTemplate:
    """A pool's pod, as its template file gives it."""

    path: str
    metadata: Mapping[str, Any]
    spec: Mapping[str, Any]


def load_template(path: str | Path) -> PodTemplate:
    """Read a Pod or PodTemplate manifest; `ProviderError` saying what is wrong."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - installed with trunkline[kubernetes]
        raise ProviderError(
            "the Kubernetes provider needs PyYAML: pip install 'trunkline[kubernetes]'"
        ) from None
    where = f"pod template {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProviderError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ProviderError(f"{where}: not valid YAML: {exc}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ProviderError(f"{where}: must hold one object (a Pod or a PodTemplate)")
    doc = docs[0]
    kind = doc.get("kind")
    if kind == "Pod":
        meta, spec = doc.get("metadata") or {}, doc.get("spec")
    elif kind == "PodTemplate":
        tpl = doc.get("template") or {}
        meta, spec = tpl.get("metadata") or {}, tpl.get("spec")
    else:
        raise ProviderError(f"{where}: kind must be Pod or PodTemplate (got {kind!r})")
    if not isinstance(meta, dict):
        raise ProviderError(f"{where}: metadata must be a mapping")
    if not isinstance(spec, dict):
        raise ProviderError(f"{where}: has no pod spec")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ProviderError(f"{where}: spec.containers must list at least one container")
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name") or not c.get("image"):
            raise ProviderError(f"{where}: spec.containers[{i}] needs a name and an image")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise ProviderError(f"{where}: metadata.{field} must map names to strings")
    return PodTemplate(str(path), meta, spec)


def label_value(text: str) -> str:
    """`text` if it is a valid label value, else a stable 20-character digest
    (label selectors match it; the exact text is in an annotation)."""
    if _LABEL_VALUE.match(text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:18]


def pod_name(instance: str, replica_id: str) -> str:
    """A DNS-1123 name for the replica's pod: `<instance>-<replica id>`, lower-cased,
    other characters replaced; a digest suffix keeps distinct ids distinct."""
    raw = f"{instance}-{replica_id}"
    name = _DNS_LABEL.sub("-", raw.lower()).strip("-")
    if name != raw or len(name) > 63:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    return name


def selector(instance: str, pool: str | None = None) -> str:
    """The label selector for this instance's pods (of one pool, or all)."""
    parts = [f"{LABEL_MANAGED_BY}=trunkline", f"{LABEL_INSTANCE}={label_value(instance)}"]
    if pool is not None:
        parts.append(f"{LABEL_POOL}={label_value(pool)}")
    return ",".join(parts)


def build_pod(
    template: PodTemplate,
    launch: Launch,
    *,
    instance: str,
    namespace: str,
    min_grace_s: float,
    owner: Mapping[str, Any] | None = None,
) -> Obj:
    """The pod for `launch`; see the module docstring."""
    meta = template.metadata
    spec: Obj = copy.deepcopy(dict(template.spec))
    labels = {
        **(meta.get("labels") or {}),
        LABEL_MANAGED_BY: "trunkline",
        LABEL_INSTANCE: label_value(instance),
        LABEL_POOL: label_value(launch.pool),
        LABEL_REPLICA: label_value(launch.replica_id),
    }
    if launch.version:
        labels[LABEL_VERSION] = label_value(launch.version)
    annotations = {
        **(meta.get("annotations") or {}),
        ANNOTATION_POOL: launch.pool,
        ANNOTATION_REPLICA: launch.replica_id,
        SAFE_TO_EVICT: "false",
    }
    if launch.version:
        annotations[ANNOTATION_VERSION] = launch.version
    metadata: Obj = {
        "name": pod_name(instance, launch.replica_id),
        "namespace": namespace,
        "labels": labels,
        "annotations": annotations,
    }
    if owner:
        metadata["ownerReferences"] = [dict(owner)]
    spec["restartPolicy"] = "Never"
    grace = spec.get("terminationGracePeriodSeconds")
    floor = math.ceil(min_grace_s)
    spec["terminationGracePeriodSeconds"] = max(grace if isinstance(grace, int) else 30, floor)
    container = spec["containers"][0]
    if launch.command:
        container["command"] = list(launch.command)
        container.pop("args", None)
    ours = {**launch.env, TOKEN_ENV: launch.token}
    env = [e for e in container.get("env") or [] if e.get("name") not in ours]
    env += [{"name": k, "value": v} for k, v in ours.items()]
    container["env"] = env
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(slots=True)
class PodView:
    """What the provider keeps of one pod."""

    name: str
    uid: str
    pool: str
    replica_id: str
    token: str
    phase: str
    node: str
    deleting: bool
    version: str
    # Set once the container will not run (again): (exit code, how it ended).
    ended: tuple[int | None, str] | None
    # Why the pod cannot start (a fatal waiting reason), if so.
    start_failure: str
    # Why it is not scheduled (reason: message), while it is not.
    unschedulable: str
    waiting: str  # the container's current waiting reason, if any

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @classmethod
    def of(cls, pod: Obj) -> PodView:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        ann = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        token = ""
        containers = spec.get("containers") or []
        if containers:
            for e in containers[0].get("env") or []:
                if e.get("name") == TOKEN_ENV:
                    token = str(e.get("value", ""))
        phase = str(status.get("phase", "Pending"))
        statuses = status.get("containerStatuses") or []
        first = statuses[0] if statuses else {}
        state = first.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or {}
        ended: tuple[int | None, str] | None = None
        if phase in ("Succeeded", "Failed"):
            ended = _how_it_ended(terminated, status)
        start_failure = ""
        reason = str(waiting.get("reason", ""))
        if reason in FATAL_WAITING:
            start_failure = _reason(reason, waiting.get("message"))
        unschedulable = ""
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                unschedulable = _reason(
                    str(cond.get("reason", "Unschedulable")), cond.get("message")
                )
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            pool=str(ann.get(ANNOTATION_POOL, labels.get(LABEL_POOL, ""))),
            replica_id=str(ann.get(ANNOTATION_REPLICA, labels.get(LABEL_REPLICA, ""))),
            token=token,
            version=str(ann.get(ANNOTATION_VERSION, labels.get(LABEL_VERSION, ""))),
            phase=phase,
            node=str(spec.get("nodeName", "")),
            deleting=bool(meta.get("deletionTimestamp")),
            ended=ended,
            start_failure=start_failure,
            unschedulable=unschedulable,
            waiting=reason,
        )


def _reason(reason: str, message: Any) -> str:
    return f"{reason}: {message}" if message else reason


def _how_it_ended(
    terminated: Mapping[str, Any], status: Mapping[str, Any]
) -> tuple[int | None, str]:
    if not terminated:
        reason = status.get("reason")  # e.g. Evicted, DeadlineExceeded
        text = _reason(str(reason), status.get("message")) if reason else "pod finished"
        return None, f"{text} (exit status unknown)"
    code = terminated.get("exitCode")
    code = code if isinstance(code, int) else None
    reason = str(terminated.get("reason", ""))
    if reason == "OOMKilled":
        return code, f"OOMKilled (exit code {code})"
    if reason in ("StartError", "ContainerCannotRun"):
        return code, _reason(f"failed to start: {reason}", terminated.get("message"))
    return code, describe_exit(code)
