"""kubectl, a reference client, against the fake API server: what a real client
sends (discovery, strategic/merge patches, DeleteOptions in the body, watches
with field selectors) is answered as a real API server would, so the fake is
not shaped only by the provider it tests.

kubectl comes from Debian's kubernetes-client (scripts/bootstrap --test). It
sends no bearer token over plain HTTP, so this cluster runs without auth.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from providers.k8s.harness import Cluster, fake_cluster

from trunkline.providers import Launch

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None and not os.environ.get("CI"),
    reason="kubectl not installed (scripts/bootstrap --test installs kubernetes-client)",
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with fake_cluster(tmp_path, simulated=True, token="") as c:
        yield c


async def kubectl(c: Cluster, *args: str) -> tuple[int, str, str]:
    assert KUBECTL is not None, "kubectl is missing: run scripts/bootstrap --test"
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(c.kubeconfig),
        "--cache-dir",
        str(c.tmp / "kubectl-cache"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


POD = """apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers: [{name: a, image: "x:1", command: [serve]}]
"""


async def test_kubectl_creates_lists_patches_and_deletes_as_on_a_real_cluster(
    cluster: Cluster,
) -> None:
    """kubectl create (201, then AlreadyExists), get with a label selector,
    annotate (a merge patch), replace with a stale resourceVersion (409),
    create of an invalid pod (422 with the field) and delete --grace-period
    (DeleteOptions in the body: the pod gets a deletionTimestamp and goes once
    its container has stopped)."""
    manifest = cluster.tmp / "pod.yaml"
    manifest.write_text(POD)
    rc, out, err = await kubectl(cluster, "create", "--validate=false", "-f", str(manifest))
    assert rc == 0, err
    assert "pod/web created" in out
    rc, _, err = await kubectl(cluster, "create", "--validate=false", "-f", str(manifest))
    assert rc == 1
    assert 'pods "web" already exists' in err

    rc, out, err = await kubectl(cluster, "get", "pods", "-l", "app=web", "-o", "json")
    assert rc == 0, err
    assert [p["metadata"]["name"] for p in json.loads(out)["items"]] == ["web"]
    rc, out, _ = await kubectl(cluster, "get", "pods", "-l", "app!=web", "-o", "json")
    assert json.loads(out)["items"] == []

    rc, out, err = await kubectl(cluster, "annotate", "pod", "web", "team=voice")
    assert rc == 0, err
    pod = cluster.api.store.get("pods", "default", "web")
    assert pod is not None
    assert pod["metadata"]["annotations"] == {"team": "voice"}
    patches = [r for r in cluster.api.requests if r.method == "PATCH"]
    assert patches[-1].content_type == "application/merge-patch+json"

    stale = dict(pod, metadata={**pod["metadata"], "resourceVersion": "0000000000000001"})
    stale_file = cluster.tmp / "stale.json"
    stale_file.write_text(json.dumps(stale))
    rc, _, err = await kubectl(cluster, "replace", "--validate=false", "-f", str(stale_file))
    assert rc == 1
    assert "the object has been modified" in err

    bad = cluster.tmp / "bad.yaml"
    bad.write_text(POD.replace("name: web", "name: Web_1"))
    rc, _, err = await kubectl(cluster, "create", "--validate=false", "-f", str(bad))
    assert rc == 1
    assert "is invalid" in err
    assert "metadata.name" in err

    await cluster.wait_pod("web", lambda p: p is not None and p["status"]["phase"] == "Running")
    rc, _, err = await kubectl(cluster, "delete", "pod", "web", "--grace-period=7", "--wait=false")
    assert rc == 0, err
    delete = cluster.api.deletes()[-1]
    assert delete.body["gracePeriodSeconds"] == 7
    assert "gracePeriodSeconds" not in delete.query
    await cluster.wait_pod("web", lambda p: p is None)


async def test_kubectl_sees_the_providers_pods_and_its_delete_ends_the_replica(
    cluster: Cluster,
) -> None:
    """Pods the provider made are listed by kubectl with the provider's label
    selector; `kubectl delete` (a graceful delete by someone else) ends the
    replica, reported once to the provider's caller."""
    p = cluster.provider({"support": cluster.template()})
    ends: list[tuple[int | None, str]] = []
    try:
        la = Launch("support-1", "support", ("agent",), {}, "tok-1")
        h = await p.start(la, lambda code, detail: ends.append((code, detail)))
        selector = "app.kubernetes.io/managed-by=trunkline,trunkline.dev/pool=support"
        rc, out, err = await kubectl(cluster, "get", "pods", "-l", selector, "-o", "json")
        assert rc == 0, err
        assert [x["metadata"]["name"] for x in json.loads(out)["items"]] == [h.pod]
        await cluster.wait_pod(h.pod, lambda x: x is not None and x["status"]["phase"] == "Running")
        rc, _, err = await kubectl(cluster, "delete", "pod", h.pod, "--grace-period=2")
        assert rc == 0, err  # kubectl waited (a watch by field selector) until it was gone
        await cluster.wait_for(lambda: ends, what="the replica's end")
        assert ends == [(0, "exited with code 0")]
    finally:
        await p.aclose(1)
