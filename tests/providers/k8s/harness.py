"""A fake cluster for a test: the fake API server, its kubelet, a kubeconfig
pointing at it, and pod templates; plus providers built against it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from providers.k8s.apiserver import FakeApiServer, write_kubeconfig
from providers.k8s.kubelet import FakeKubelet
from providers.k8s.store import Obj

from trunkline.providers.kubernetes import KubernetesProvider, PodPool
from trunkline.providers.kubernetes_api import Backoff

FAST = Backoff(base_s=0.02, cap_s=0.2)


@dataclasses.dataclass
class Cluster:
    api: FakeApiServer
    kubelet: FakeKubelet
    kubeconfig: Path
    tmp: Path

    def template(
        self,
        name: str = "agent",
        *,
        image: str = "registry.example/agent:1",
        node_selector: dict[str, str] | None = None,
        memory_limit: str | None = None,
        kind: str = "Pod",
        grace: int | None = None,
    ) -> Path:
        """A pod template file (YAML) for the fake kubelet."""
        lines = [f"image: {json.dumps(image)}"]
        if memory_limit:
            lines.append(f"resources: {{limits: {{memory: {memory_limit}}}}}")
        spec = ["containers:", "  - name: agent", *(f"    {line}" for line in lines)]
        spec += ["    env: [{name: FROM_TEMPLATE, value: 'yes'}]"]
        if node_selector:
            spec.append(f"nodeSelector: {json.dumps(node_selector)}")
        if grace is not None:
            spec.append(f"terminationGracePeriodSeconds: {grace}")
        meta = ["labels: {team: voice}", "annotations: {note: from-template}"]
        if kind == "Pod":
            body = ["apiVersion: v1", "kind: Pod", "metadata:", *(f"  {m}" for m in meta)]
            body += ["spec:", *(f"  {s}" for s in spec)]
        else:
            body = ["apiVersion: v1", "kind: PodTemplate", "metadata: {name: agents}", "template:"]
            body += ["  metadata:", *(f"    {m}" for m in meta)]
            body += ["  spec:", *(f"    {s}" for s in spec)]
        path = self.tmp / f"{name}.yaml"
        path.write_text("\n".join(body) + "\n")
        return path

    def provider(self, pools: dict[str, Path | PodPool], **kw: Any) -> KubernetesProvider:
        """A provider on this cluster (fast backoff, short budgets, pods deleted
        at `aclose`)."""
        kw.setdefault("backoff", FAST)
        kw.setdefault("request_budget_s", 2.0)
        kw.setdefault("confirm_s", 5.0)
        kw.setdefault("on_shutdown", "delete")  # the protocol's aclose: tests clean up
        return KubernetesProvider(
            pools={p: v if isinstance(v, PodPool) else PodPool(str(v)) for p, v in pools.items()},
            kubeconfig=str(self.kubeconfig),
            **kw,
        )

    async def wait_pod(
        self, name: str, check: Callable[[Obj | None], bool], within: float = 10.0
    ) -> Obj | None:
        """Wait until the stored pod `name` (None once gone) passes `check`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            pod = self.api.store.get("pods", "default", name)
            if check(pod):
                return pod
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"pod {name}: condition not met within {within} s: {pod}")
            changed = self.api.store.changed
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    async def wait_for(self, check: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
        """Wait until `check()` is truthy, re-checking on every stored change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = check()
            if value:
                return value
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"not within {within} s: {what or check}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self.api.store.changed.wait(), min(left, 0.2))


def phase(pod: Obj | None) -> str:
    return "" if pod is None else str(pod.get("status", {}).get("phase", ""))


@asynccontextmanager
async def fake_cluster(
    tmp: Path,
    *,
    simulated: bool = False,
    bookmark_interval_s: float = 1.0,
    token: str = "fake-token",
    **kubelet_kw: Any,
) -> AsyncIterator[Cluster]:
    """`token=""`: no authentication (kubectl sends no bearer token over plain HTTP)."""
    async with FakeApiServer(bookmark_interval_s=bookmark_interval_s, token=token) as api:
        kubelet = FakeKubelet(api, tmp / "kubelet", simulated=simulated, **kubelet_kw)
        try:
            yield Cluster(api, kubelet, write_kubeconfig(tmp / "kubeconfig", api), tmp)
        finally:
            await kubelet.aclose()
