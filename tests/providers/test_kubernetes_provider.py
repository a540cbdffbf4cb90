"""The Kubernetes provider against the fake API server: the pod it builds, how
each replica's end is read from the pod's status, and what it does when the
watch drops or expires, the API server throttles, fails or goes away.

Replicas here are simulated containers (the fake kubelet runs no process) so
that each scenario takes milliseconds; the contract suite and the burst test
run real processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import certifi
import pytest
from providers.k8s.apiserver import write_kubeconfig
from providers.k8s.harness import Cluster, fake_cluster, phase

from trunkline.providers import ExitCallback, Launch, ProviderError
from trunkline.providers import kubernetes_api as kapi
from trunkline.providers.kubernetes import KubernetesProvider, KubernetesReplica, PodPool


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with fake_cluster(tmp_path, simulated=True, bookmark_interval_s=0.05) as c:
        yield c


class Ends:
    """Each replica's reported ends, in order."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int | None, str]]] = {}
        self.changed = asyncio.Event()

    def cb(self, rid: str) -> ExitCallback:
        def on_exit(code: int | None, detail: str) -> None:
            self.calls.setdefault(rid, []).append((code, detail))
            self.changed.set()

        return on_exit

    async def wait(self, rid: str, within: float = 5.0) -> tuple[int | None, str]:
        async def _wait() -> None:
            while rid not in self.calls:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(_wait(), within)
        return self.calls[rid][0]


def launch(rid: str, pool: str = "support", **env: str) -> Launch:
    return Launch(rid, pool, ("agent", "--serve"), {"TRUNKLINE_REPLICA_ID": rid, **env}, f"t-{rid}")


async def running(c: Cluster, h: KubernetesReplica) -> None:
    await c.wait_pod(h.pod, lambda p: phase(p) == "Running")


async def test_the_pod_is_built_from_the_template_with_labels_env_grace_and_owner(
    cluster: Cluster,
) -> None:
    """The replica's pod keeps the template's labels, annotations and env, adds
    the pool/replica labels, the launch env with its token, safe-to-evict
    "false", restartPolicy Never, a grace of at least the drain limit, the
    owner reference (uid looked up) and the pool's command."""
    owner = cluster.api.store.create(
        "deployments", "default", {"kind": "Deployment", "metadata": {"name": "trunkline"}}
    )
    tpl = cluster.template(kind="PodTemplate", grace=45)
    p = cluster.provider({"support": PodPool(str(tpl), 120.0)}, owner="Deployment/trunkline")
    try:
        h = await p.start(launch("support-7", LIVEKIT_URL="ws://x/replica/t"), Ends().cb("s"))
        pod = cluster.api.store.get("pods", "default", h.pod)
        assert pod is not None
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"] == {
            "team": "voice",
            "app.kubernetes.io/managed-by": "trunkline",
            "trunkline.dev/instance": "trunkline",
            "trunkline.dev/pool": "support",
            "trunkline.dev/replica": "support-7",
        }
        assert meta["annotations"]["note"] == "from-template"
        assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert meta["annotations"]["trunkline.dev/replica-id"] == "support-7"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "trunkline",
                "uid": owner["metadata"]["uid"],
                "controller": False,
                "blockOwnerDeletion": False,
            }
        ]
        assert spec["restartPolicy"] == "Never"
        assert spec["terminationGracePeriodSeconds"] == 120
        (c,) = spec["containers"]
        assert c["command"] == ["agent", "--serve"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env == {
            "FROM_TEMPLATE": "yes",
            "TRUNKLINE_REPLICA_ID": "support-7",
            "LIVEKIT_URL": "ws://x/replica/t",
            "TRUNKLINE_REPLICA_TOKEN": "t-support-7",
        }
        assert h.describe()["kind"] == "pod"
        assert h.location == f"pod {h.pod}"
    finally:
        await p.aclose(1)


async def test_each_end_is_reported_once_with_the_reason_from_the_pod_status(
    cluster: Cluster,
) -> None:
    """OOMKilled, an exit code, ImagePullBackOff and Unschedulable each end their
    replica once with that reason (the last two as failed starts), and the
    finished or failed pods are deleted."""
    good = cluster.template("good")
    bad_image = cluster.template("bad", image="registry.invalid/agent:1")
    nowhere = cluster.template("nowhere", node_selector={"gpu": "h100"})
    p = cluster.provider({"good": good, "bad": bad_image, "nowhere": nowhere})
    ends = Ends()
    try:
        oom = await p.start(launch("good-1", "good"), ends.cb("good-1"))
        code3 = await p.start(launch("good-2", "good"), ends.cb("good-2"))
        pull = await p.start(launch("bad-1", "bad"), ends.cb("bad-1"))
        sched = await p.start(launch("nowhere-1", "nowhere"), ends.cb("nowhere-1"))
        await running(cluster, oom)
        await running(cluster, code3)
        cluster.kubelet.oom_kill(oom.pod)
        cluster.kubelet.exit(code3.pod, 3)
        assert await ends.wait("good-1") == (137, "OOMKilled (exit code 137)")
        assert await ends.wait("good-2") == (3, "exited with code 3")
        code, detail = await ends.wait("bad-1")
        assert code is None
        assert detail.startswith("failed to start: ImagePullBackOff: Back-off pulling image"), (
            detail
        )
        code, detail = await ends.wait("nowhere-1")
        assert code is None
        assert detail.startswith("failed to start: Unschedulable: 0/1 nodes are available"), detail
        for h in (oom, code3, pull, sched):
            await cluster.wait_pod(h.pod, lambda pod: pod is None)
        await asyncio.sleep(0)  # nothing more is queued behind the deletions
        assert all(len(v) == 1 for v in ends.calls.values()), ends.calls
    finally:
        await p.aclose(1)


async def test_unschedulable_counts_only_after_its_timeout(cluster: Cluster) -> None:
    """With unschedulable_timeout_s, a pending pod's start fails only when that
    long has passed (a node autoscaler gets its chance)."""
    p = cluster.provider(
        {"x": cluster.template(node_selector={"gpu": "h100"})}, unschedulable_timeout_s=0.3
    )
    ends = Ends()
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        h = await p.start(launch("x-1", "x"), ends.cb("x-1"))
        _, detail = await ends.wait("x-1")
        assert loop.time() - t0 >= 0.3
        assert "Unschedulable" in detail
        assert "Unschedulable" in str(h.describe()["waiting"])
    finally:
        await p.aclose(1)


async def test_a_dropped_watch_resumes_from_its_version_and_reports_the_end_once(
    cluster: Cluster,
) -> None:
    """A stream cut while a pod ends is resumed from the last version seen (no
    relist); the end that happened meanwhile is reported exactly once."""
    p = cluster.provider({"support": cluster.template()})
    ends = Ends()
    try:
        h = await p.start(launch("support-1"), ends.cb("support-1"))
        await running(cluster, h)
        await cluster.wait_for(lambda: p._rv == cluster.api.store.version, what="caught up")
        watches = [r for r in cluster.api.requests if r.query.get("watch")]
        assert cluster.api.drop_watches() == 1
        cluster.kubelet.exit(h.pod, 0)
        assert await ends.wait("support-1") == (0, "exited with code 0")
        resumed = [r for r in cluster.api.requests if r.query.get("watch")][len(watches) :]
        assert resumed, "no new watch after the drop"
        assert resumed[0].query["resourceVersion"], resumed[0].query
        assert p.stats["relists"] == 1
        assert ends.calls == {"support-1": [(0, "exited with code 0")]}
    finally:
        await p.aclose(1)


@pytest.mark.parametrize("as_event", [False, True], ids=["http-410", "error-event"])
async def test_an_expired_watch_relists_and_judges_what_went_missing(
    cluster: Cluster, as_event: bool
) -> None:
    """A 410 (as an HTTP status or as an ERROR event in the stream) makes the
    provider relist: a pod deleted while it was not watching is reported gone
    once; a live one is not reported."""
    cluster.api.expired_as_event = as_event
    p = cluster.provider({"support": cluster.template()})
    ends = Ends()
    try:
        live = await p.start(launch("support-1"), ends.cb("support-1"))
        gone = await p.start(launch("support-2"), ends.cb("support-2"))
        await running(cluster, live)
        await running(cluster, gone)
        await cluster.wait_for(lambda: p._rv == cluster.api.store.version, what="caught up")
        async with cluster.api.unreachable():
            cluster.api.store.remove("pods", "default", gone.pod)
            # history gone too: only the version after the removal is still valid
            cluster.api.compact()
        code, detail = await ends.wait("support-2")
        assert code is None
        assert "watch was down" in detail, detail
        await cluster.wait_for(lambda: p.stats["relists"] == 2, what="one relist")
        assert "support-1" not in ends.calls
        assert not live.done
    finally:
        await p.aclose(1)


async def test_bookmarks_keep_the_watch_version_fresh(cluster: Cluster) -> None:
    """Bookmarks move the watch's version past changes it does not select, so
    a watch resumed after the history was compacted needs no relist."""
    p = cluster.provider({"support": cluster.template()})
    try:
        await p.list_existing()
        for i in range(5):  # someone else's pods: not this watch's business
            cluster.api.store.create(
                "pods", "default", {"metadata": {"name": f"other-{i}"}, "spec": {"containers": []}}
            )
        await cluster.wait_for(lambda: p._rv == cluster.api.store.version, what="a bookmark")
        cluster.api.compact()
        cluster.api.drop_watches()
        await cluster.wait_for(lambda: cluster.api.open_watches == 1, what="the watch resumed")
        assert p.stats["relists"] == 1
    finally:
        await p.aclose(1)


async def test_throttling_server_errors_and_conflicts_are_retried(cluster: Cluster) -> None:
    """A create answered 429 (with Retry-After), 500 and 409 Conflict is retried
    with backoff and makes exactly one pod."""
    p = cluster.provider({"support": cluster.template()})
    for status in (429, 500, 409):
        cluster.api.inject(status, method="POST", path="/pods", retry_after=0)
    try:
        h = await p.start(launch("support-1"), Ends().cb("support-1"))
        posts = [r for r in cluster.api.requests if r.method == "POST"]
        assert [r.status for r in posts] == [429, 500, 409, 201]
        assert [x["metadata"]["name"] for x in cluster.api.pods()] == [h.pod]
        assert p.api is not None
        assert p.api.retries >= 3
    finally:
        await p.aclose(1)


async def test_a_create_whose_answer_was_lost_takes_its_own_pod(cluster: Cluster) -> None:
    """The server made the pod but its answer was lost: the retry meets 409
    AlreadyExists with this launch's token and takes that pod, no second one."""
    p = cluster.provider({"support": cluster.template()})
    cluster.api.inject(503, method="POST", path="/pods", after=True)
    try:
        h = await p.start(launch("support-1"), Ends().cb("support-1"))
        assert [x["metadata"]["name"] for x in cluster.api.pods()] == [h.pod]
        assert h.uid == cluster.api.pods()[0]["metadata"]["uid"]
    finally:
        await p.aclose(1)


async def test_a_start_while_the_api_server_is_unreachable_fails_and_leaves_nothing(
    cluster: Cluster,
) -> None:
    """A start that cannot reach the API server raises ProviderError; if the
    create was carried out after all (its answers lost), that pod is deleted
    once the server answers, and no end is ever reported for it."""
    p = cluster.provider({"support": cluster.template()}, request_budget_s=0.5)
    ends = Ends()
    try:
        await p.list_existing()
        async with cluster.api.unreachable():
            with pytest.raises(ProviderError, match="cannot create pod"):
                await p.start(launch("support-1"), ends.cb("support-1"))
        assert cluster.api.pods() == []
        cluster.api.inject(503, count=100, method="POST", path="/pods", after=True)
        with pytest.raises(ProviderError, match="deleted once the API server answers"):
            await p.start(launch("support-2"), ends.cb("support-2"))
        cluster.api.faults.clear()
        await cluster.wait_for(lambda: cluster.api.pods() == [], what="the orphan pod deleted")
        assert ends.calls == {}
    finally:
        await p.aclose(1)


async def test_an_outage_loses_no_bookkeeping_and_stops_are_carried_out_after_it(
    cluster: Cluster,
) -> None:
    """While the API server is unreachable no replica is reported gone; a stop
    asked meanwhile returns and is carried out when it answers again; the pod
    that ended during the outage and the stopped one are each reported once,
    the third keeps running."""
    p = cluster.provider({"support": cluster.template()})
    ends = Ends()
    try:
        hs = [await p.start(launch(f"support-{i}"), ends.cb(f"support-{i}")) for i in (1, 2, 3)]
        for h in hs:
            await running(cluster, h)
        await cluster.api.outage()
        cluster.kubelet.exit(hs[0].pod, 1)
        await asyncio.wait_for(p.stop(hs[1], 1), 5)
        await cluster.wait_pod(hs[0].pod, lambda pod: phase(pod) == "Failed")
        assert ends.calls == {}
        assert hs[1].describe()["phase"] == "Running"
        await cluster.api.restore()
        assert await ends.wait("support-1") == (1, "exited with code 1")
        assert await ends.wait("support-2") == (0, "exited with code 0")
        await cluster.wait_pod(hs[1].pod, lambda pod: pod is None)
        assert not hs[2].done
        assert all(len(v) == 1 for v in ends.calls.values()), ends.calls
    finally:
        await p.aclose(1)


async def test_a_restarted_provider_adopts_live_pods_and_deletes_finished_ones(
    cluster: Cluster,
) -> None:
    """After a restart, list_existing returns the live pods of this instance
    (not another instance's) with pool, id and token, and deletes the pods
    that finished while no server watched them."""
    tpl = cluster.template()
    old = cluster.provider({"support": tpl})
    other = cluster.provider({"support": tpl}, instance="blue")
    live = await old.start(launch("support-1"), Ends().cb("x"))
    done = await old.start(launch("support-2"), Ends().cb("x"))
    theirs = await other.start(launch("support-1"), Ends().cb("x"))
    for h in (live, done, theirs):
        await running(cluster, h)
    old.detach()
    other.detach()
    cluster.kubelet.exit(done.pod, 0)
    await cluster.wait_pod(done.pod, lambda pod: phase(pod) == "Succeeded")
    new = cluster.provider({"support": tpl})
    try:
        listed = await new.list_existing("support")
        assert [(h.replica_id, h.pool, h.token) for h in listed] == [
            ("support-1", "support", "t-support-1")
        ]
        await cluster.wait_pod(done.pod, lambda pod: pod is None)
        assert cluster.api.store.get("pods", "default", theirs.pod) is not None
    finally:
        for p in (new, old, other):
            await p.aclose(1)


async def test_credentials_and_namespace_come_from_the_kubeconfig_context(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The namespace is the kubeconfig context's unless `namespace` is set; a
    missing kubeconfig is refused naming where credentials are looked for."""
    cluster.api.store.create("namespaces", "", {"metadata": {"name": "voice"}})
    cluster.api.namespaces.add("voice")
    kc = write_kubeconfig(tmp_path / "voice.kubeconfig", cluster.api, namespace="voice")
    tpl = cluster.template()
    p = KubernetesProvider(pools={"support": PodPool(str(tpl))}, kubeconfig=str(kc))
    q = KubernetesProvider(
        pools={"support": PodPool(str(tpl))}, kubeconfig=str(kc), namespace="default"
    )
    try:
        h = await p.start(launch("support-1"), Ends().cb("x"))
        assert h.namespace == "voice"
        assert cluster.api.store.get("pods", "voice", h.pod) is not None
        assert (await q.start(launch("support-2"), Ends().cb("y"))).namespace == "default"
    finally:
        await p.aclose(1)
        await q.aclose(1)
    missing = KubernetesProvider(
        pools={"support": PodPool(str(tpl))}, kubeconfig=str(tmp_path / "none")
    )
    with pytest.raises(ProviderError, match=r"no Kubernetes credentials.*KUBECONFIG"):
        await missing.list_existing()


async def test_in_a_pod_the_service_account_gives_credentials_and_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a cluster (KUBERNETES_SERVICE_HOST and a mounted service account)
    the token, CA and namespace come from the service account."""
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("voice\n")
    shutil.copy(certifi.where(), sa / "ca.crt")  # any valid CA bundle
    monkeypatch.setattr(kapi, "SERVICE_ACCOUNT_DIR", sa)
    from kubernetes_asyncio.config import incluster_config

    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(sa / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(sa / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert kapi.in_cluster()
    api = await kapi.connect(backoff=kapi.Backoff())
    try:
        assert api.namespace == "voice"
        cfg = api.api_client.configuration
        assert cfg.host == "https://10.0.0.1:443"
        assert "sa-token" in str(cfg.api_key)
    finally:
        await api.close()
    assert os.environ["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"


async def test_by_default_shutdown_leaves_the_pods_for_the_next_server(cluster: Cluster) -> None:
    """With on_shutdown "leave" (the default), aclose deletes no pod and reports
    no end: the next provider lists them for adoption."""
    ends = Ends()
    p = cluster.provider({"support": cluster.template()}, on_shutdown="leave")
    h = await p.start(launch("support-1"), ends.cb("support-1"))
    await running(cluster, h)
    await p.aclose(1)
    assert ends.calls == {}
    assert cluster.api.deletes() == []
    nxt = cluster.provider({"support": cluster.template()})
    try:
        assert [x.replica_id for x in await nxt.list_existing()] == ["support-1"]
    finally:
        await nxt.aclose(1)
