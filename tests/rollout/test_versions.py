"""A pool's version (config.replica_version) and where it is kept: the config's
`rollout` keys, the local provider's record, the Kubernetes pod's label and
annotation, the fake's handle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trunkline.config import ConfigError, parse_config, replica_version
from trunkline.core.rollout import RolloutSpec
from trunkline.providers import Launch
from trunkline.providers.kubernetes_pods import PodTemplate, PodView, build_pod
from trunkline.providers.local import LocalProvider


def _pool(**extra: object) -> dict[str, object]:
    return {
        "keys": {"k": "s" * 32},
        "pools": {"p": {"command": ["agent"], "max_jobs_per_worker": 2, **extra}},
    }


def test_the_version_is_a_stable_digest_of_what_starts_a_replica(tmp_path: Path) -> None:
    """Same command and env, same version (any order of env); a changed
    argument, env value or template byte gives another."""
    v = replica_version(("agent", "x"), {"A": "1", "B": "2"}, "local")
    assert v == replica_version(("agent", "x"), {"B": "2", "A": "1"}, "local")
    assert len(v) == 12
    assert v != replica_version(("agent", "y"), {"A": "1", "B": "2"}, "local")
    assert v != replica_version(("agent", "x"), {"A": "1", "B": "3"}, "local")
    tpl = tmp_path / "pod.yaml"
    tpl.write_text("image: a:1\n")
    k1 = replica_version((), {}, "kubernetes", str(tpl))
    tpl.write_text("image: a:2\n")
    assert replica_version((), {}, "kubernetes", str(tpl)) != k1


def test_the_config_carries_the_version_and_the_rollout_settings() -> None:
    """`rollout = {...}` is read whole; defaults without it."""
    config = parse_config(_pool(rollout={"canary_percent": 10, "surge": 2}))
    rp = config.replica_pools["p"]
    assert rp.rollout == RolloutSpec(surge=2, canary_percent=10.0)
    assert rp.version == replica_version(("agent",), {}, "local")
    assert parse_config(_pool()).replica_pools["p"].rollout == RolloutSpec()


@pytest.mark.parametrize(
    ("rollout", "key"),
    [
        ({"surge": 0}, "pools.p.rollout.surge"),
        ({"canary_percent": 100}, "pools.p.rollout.canary_percent"),
        ({"min_calls": "ten"}, "pools.p.rollout.min_calls"),
        ({"canary": 10}, "pools.p.rollout.canary"),
        (10, "pools.p.rollout"),
    ],
)
def test_a_bad_rollout_value_names_its_key(rollout: object, key: str) -> None:
    """Every refused rollout setting is named in the error."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(_pool(rollout=rollout))


async def test_the_local_record_keeps_the_version_for_adoption(tmp_path: Path) -> None:
    """A restarted server's local provider lists a running replica with the
    version it was launched with."""
    first = LocalProvider(tmp_path, exit_with_server=False)
    cmd = (sys.executable, "-c", "import time; time.sleep(60)")  # ok-sleep: the replica's body
    ended: list[str] = []
    h = await first.start(
        Launch("p-1", "p", cmd, {}, "tok", version="v123"), lambda c, d: ended.append(d)
    )
    assert h.describe()["version"] == "v123"
    first.detach()
    await first.aclose(0)
    second = LocalProvider(tmp_path, exit_with_server=False)
    try:
        (found,) = await second.list_existing("p")
        assert found.describe()["version"] == "v123"
        got: list[str] = []
        second.adopt(found, lambda c, d: got.append(d))
    finally:
        await second.aclose(1.0)
        # The replica is this process's child: let the first provider's
        # transport reap it while the loop runs (else its GC warns).
        await first.aclose(0)
    assert got


def test_a_pod_carries_its_version_as_label_and_annotation() -> None:
    """build_pod puts the version on the pod; PodView reads it back."""
    tpl = PodTemplate("t.yaml", {}, {"containers": [{"name": "a", "image": "i"}]})
    pod = build_pod(
        tpl,
        Launch("p-1", "p", (), {}, "tok", version="abc123def456"),
        instance="tl",
        namespace="ns",
        min_grace_s=0,
    )
    assert pod["metadata"]["labels"]["trunkline.dev/version"] == "abc123def456"
    assert pod["metadata"]["annotations"]["trunkline.dev/version"] == "abc123def456"
    assert PodView.of(pod).version == "abc123def456"
    plain = build_pod(
        tpl, Launch("p-2", "p", (), {}, "t"), instance="tl", namespace="ns", min_grace_s=0
    )
    assert "trunkline.dev/version" not in plain["metadata"]["labels"]
    assert PodView.of(plain).version == ""
