"""Config for Kubernetes pools: `provider = "kubernetes"`, `pod_template` and
`[kubernetes]`, validated with every error reported at once; the server wires
the provider from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from trunkline.config import ConfigError, parse_config
from trunkline.providers import ProviderError
from trunkline.providers.kubernetes import KubernetesProvider
from trunkline.server.app import build_app
from trunkline.server.keys import AUTOSCALER

KEYS = {"k": "s" * 32}


def _template(tmp_path: Path, body: str | None = None) -> Path:
    path = tmp_path / "pod.yaml"
    path.write_text(
        body or "kind: Pod\napiVersion: v1\nspec:\n  containers:\n  - {name: agent, image: 'a:1'}\n"
    )
    return path


def test_a_kubernetes_pool_may_leave_the_command_to_its_template(tmp_path: Path) -> None:
    """A pool with provider "kubernetes" and a pod template is autoscaled even
    without `command`; `[kubernetes]` keys are read with their defaults."""
    tpl = _template(tmp_path)
    config = parse_config(
        {
            "keys": KEYS,
            "kubernetes": {"namespace": "voice", "owner": "Deployment/trunkline"},
            "pools": {
                "support": {
                    "provider": "kubernetes",
                    "pod_template": str(tpl),
                    "max_jobs_per_worker": 4,
                    "drain_timeout_s": 120,
                }
            },
        }
    )
    rp = config.replica_pools["support"]
    assert (rp.provider, rp.pod_template, rp.command) == ("kubernetes", str(tpl), ())
    k = config.kubernetes
    assert (k.namespace, k.owner, k.instance, k.unschedulable_timeout_s) == (
        "voice",
        "Deployment/trunkline",
        "trunkline",
        0.0,
    )


def test_every_kubernetes_config_error_is_reported_at_once(tmp_path: Path) -> None:
    """Missing or misplaced pod templates, a template file that is not there and
    each bad `[kubernetes]` value are all named in one ConfigError."""
    tpl = _template(tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "keys": KEYS,
                "kubernetes": {
                    "namespace": "Not_A_Namespace",
                    "owner": "Service/x",
                    "instance": "-bad-",
                    "unschedulable_timeout_s": -1,
                    "kubeconfig": str(tmp_path / "missing"),
                    "cluster": "x",
                    "on_shutdown": "keep",
                },
                "pools": {
                    "a": {"provider": "kubernetes", "max_jobs_per_worker": 1},
                    "b": {"command": "agent", "pod_template": str(tpl), "max_jobs_per_worker": 1},
                    "c": {
                        "provider": "kubernetes",
                        "pod_template": str(tmp_path / "nope.yaml"),
                        "max_jobs_per_worker": 1,
                    },
                },
            }
        )
    text = str(info.value)
    for expected in (
        'pools.a.pod_template: is required with provider = "kubernetes"',
        'pools.b.pod_template: only applies with provider = "kubernetes"',
        "pools.c.pod_template: no such file",
        "kubernetes.namespace: must be a namespace name",
        'kubernetes.owner: must be "Kind/name" with Kind one of Deployment, StatefulSet, ConfigMap',
        "kubernetes.instance: must be a label value",
        "kubernetes.unschedulable_timeout_s: must be a number >= 0",
        "kubernetes.kubeconfig: no such file",
        "kubernetes.cluster: unknown key",
        'kubernetes.on_shutdown: must be "leave" (the next server adopts the pods) or "delete"',
    ):
        assert expected in text, (expected, text)


def test_the_server_builds_one_kubernetes_provider_from_the_config(tmp_path: Path) -> None:
    """build_app gives the Kubernetes pools one provider with their templates and
    drain limits and the `[kubernetes]` settings; nothing connects yet."""
    tpl = _template(tmp_path)
    config = parse_config(
        {
            "keys": KEYS,
            "server": {"port": 7999},
            "kubernetes": {"instance": "blue", "unschedulable_timeout_s": 30},
            "pools": {
                p: {
                    "provider": "kubernetes",
                    "pod_template": str(tpl),
                    "max_jobs_per_worker": 2,
                    "drain_timeout_s": d,
                }
                for p, d in (("a", 60), ("b", 900))
            },
        }
    )
    app = build_app(config)
    provider = app[AUTOSCALER].providers["kubernetes"]
    assert isinstance(provider, KubernetesProvider)
    assert (provider.instance, provider.unschedulable_timeout_s) == ("blue", 30.0)
    assert provider._grace == {"a": 60.0, "b": 900.0}
    assert provider.api is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("kind: Deployment\n", "kind must be Pod or PodTemplate"),
        ("kind: Pod\nspec: {containers: []}\n", "must list at least one container"),
        ("kind: Pod\nspec:\n  containers: [{name: a}]\n", "needs a name and an image"),
        ("kind: [\n", "not valid YAML"),
        ("kind: Pod\n---\nkind: Pod\n", "must hold one object"),
    ],
)
def test_a_bad_pod_template_is_refused_when_the_provider_is_made(
    tmp_path: Path, body: str, problem: str
) -> None:
    """A template that is not one Pod or PodTemplate with a container is refused
    with the file's name and what is wrong, before anything is created."""
    tpl = _template(tmp_path, body)
    from trunkline.providers.kubernetes import PodPool

    with pytest.raises(ProviderError, match=problem) as info:
        KubernetesProvider(pools={"a": PodPool(str(tpl))})
    assert str(tpl) in str(info.value)
