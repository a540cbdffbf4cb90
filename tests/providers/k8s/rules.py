"""What the fake API server checks: object validation (422 Invalid), label and
field selectors, patches. Only what the provider and kubectl exercise, but
each rule as the real API server states it (apimachinery validation)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

Obj = dict[str, Any]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_RESTART = ("Always", "OnFailure", "Never")
_MAX_ANNOTATIONS = 256 * 1024


def _qualified_name_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errs = []
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        errs.append(f"prefix part must be a DNS subdomain: {prefix!r}")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        errs.append(f"name part must be <= 63 alphanumeric, '-', '_' or '.' characters: {name!r}")
    return errs


def _label_value_ok(v: Any) -> bool:
    return isinstance(v, str) and (v == "" or (len(v) <= 63 and bool(_LABEL_NAME.match(v))))


def validate_metadata(meta: Any, causes: list[tuple[str, str]]) -> None:
    if not isinstance(meta, dict):
        causes.append(("metadata", "Required value"))
        return
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        causes.append(("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain"))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        causes.append(("metadata.labels", "must be a map of strings"))
    else:
        for k, v in labels.items():
            for err in _qualified_name_errors(k):
                causes.append((f"metadata.labels[{k}]", f"Invalid value: {err}"))
            if not _label_value_ok(v):
                causes.append((f"metadata.labels[{k}]", f"Invalid value: {v!r}: a valid label"))
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        causes.append(("metadata.annotations", "must be a map of strings"))
    else:
        for k in ann:
            for err in _qualified_name_errors(k):
                causes.append((f"metadata.annotations[{k}]", f"Invalid value: {err}"))
        if sum(len(k) + len(v) for k, v in ann.items()) > _MAX_ANNOTATIONS:
            causes.append(("metadata.annotations", "Too long: must have at most 262144 bytes"))
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(field):
                causes.append((f"metadata.ownerReferences[{i}].{field}", "Required value"))


def validate_pod(pod: Obj) -> list[tuple[str, str]]:
    """The (field, message) causes of a 422 Invalid; empty if the pod is valid."""
    causes: list[tuple[str, str]] = []
    validate_metadata(pod.get("metadata"), causes)
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [*causes, ("spec", "Required value")]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        causes.append(("spec.containers", "Required value"))
        containers = []
    seen: set[str] = set()
    for i, c in enumerate(containers):
        where = f"spec.containers[{i}]"
        if not isinstance(c, dict):
            causes.append((where, "must be an object"))
            continue
        name = c.get("name")
        if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
            causes.append((f"{where}.name", f"Invalid value: {name!r}: a DNS-1123 label"))
        elif name in seen:
            causes.append((f"{where}.name", f"Duplicate value: {name!r}"))
        else:
            seen.add(name)
        if not isinstance(c.get("image"), str) or not c["image"].strip():
            causes.append((f"{where}.image", "Required value"))
        for field in ("command", "args"):
            v = c.get(field)
            if v is not None and not (isinstance(v, list) and all(isinstance(a, str) for a in v)):
                causes.append((f"{where}.{field}", "must be a list of strings"))
        for j, e in enumerate(c.get("env") or []):
            ename = e.get("name") if isinstance(e, dict) else None
            if not isinstance(ename, str) or not _ENV_NAME.match(ename):
                causes.append((f"{where}.env[{j}].name", f"Invalid value: {ename!r}"))
            elif "value" in e and not isinstance(e["value"], str):
                causes.append((f"{where}.env[{j}].value", "must be a string"))
    rp = spec.get("restartPolicy", "Always")
    if rp not in _RESTART:
        causes.append(("spec.restartPolicy", f"Unsupported value: {rp!r}: one of {_RESTART}"))
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(tgps, int) or isinstance(tgps, bool) or tgps < 0:
        causes.append(("spec.terminationGracePeriodSeconds", "must be an integer >= 0"))
    return causes


def pod_update_causes(old: Obj, new: Obj) -> list[tuple[str, str]]:
    """Pod spec is immutable but for container images (and a few fields we do not model)."""
    a, b = copy.deepcopy(old.get("spec", {})), copy.deepcopy(new.get("spec", {}))
    for s in (a, b):
        for c in s.get("containers", []):
            if isinstance(c, dict):
                c.pop("image", None)
    if a != b:
        return [("spec", "Forbidden: pod updates may not change fields other than image")]
    return validate_pod(new)


# ------------------------------------------------------------------ selectors

Matcher = Callable[[Mapping[str, str]], bool]
_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_terms(sel: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return terms


def label_selector(sel: str) -> Matcher:
    """A matcher for a label selector string; ValueError if it cannot be parsed."""
    checks: list[Matcher] = []
    for raw in _split_terms(sel):
        term = raw.strip()
        m = _SET_RE.match(term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda lab, k=key, vs=vals: lab.get(k) in vs)
            else:
                checks.append(lambda lab, k=key, vs=vals: lab.get(k) not in vs)
        elif "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            checks.append(lambda lab, k=k, v=v: lab.get(k) != v)
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if not k:
                raise ValueError(f"bad selector term {term!r}")
            checks.append(lambda lab, k=k, v=v: lab.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            checks.append(lambda lab, k=absent: k not in lab)
        elif term and not any(c in term for c in " ()"):
            checks.append(lambda lab, k=term: k in lab)
        else:
            raise ValueError(f"bad selector term {term!r}")
    return lambda labels: all(c(labels) for c in checks)


def field_selector(sel: str) -> Callable[[Obj], bool]:
    """metadata.name / metadata.namespace / status.phase / spec.nodeName, = and !=."""
    paths = {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "status.phase": ("status", "phase"),
        "spec.nodeName": ("spec", "nodeName"),
    }
    checks: list[Callable[[Obj], bool]] = []
    for term in filter(None, (t.strip() for t in sel.split(","))):
        neg = "!=" in term
        k, v = (s.strip() for s in term.replace("==", "=").replace("!=", "=").split("=", 1))
        if k not in paths:
            raise ValueError(f'"{k}" is not a known field selector: only {", ".join(paths)}')
        a, b = paths[k]

        def check(o: Obj, a: str = a, b: str = b, v: str = v, neg: bool = neg) -> bool:
            return ((o.get(a) or {}).get(b, "") == v) != neg

        checks.append(check)
    return lambda o: all(c(o) for c in checks)


# -------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patch is treated the same for
    the maps a client patches here: labels, annotations)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: Obj, ops: list[Any]) -> Obj:
    """RFC 6902 add / replace / remove / test on object paths (no array indices)."""
    out = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = out
        for p in parts[:-1]:
            parent = parent.setdefault(p, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            parent[last] = op["value"]
        elif op["op"] == "remove":
            if last not in parent:
                raise ValueError(f"path {op['path']} does not exist")
            del parent[last]
        elif op["op"] == "test":
            if parent.get(last) != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise ValueError(f"unsupported op {op['op']!r}")
    return out
