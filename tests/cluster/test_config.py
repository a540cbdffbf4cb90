"""`[cluster]` in the config, and single-process mode never importing redis."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trunkline.common.errors import ConfigError
from trunkline.config import parse_config

SECRET = "x" * 32


def test_cluster_section_parsed_with_defaults() -> None:
    """redis_url alone gives the defaults: trunkline, 1 s leases, 0.25 s timeouts, 0.5 s settle."""
    cfg = parse_config({"keys": {"k": SECRET}, "cluster": {"redis_url": "redis://r:6379/0"}})
    assert cfg.cluster is not None
    assert cfg.cluster.redis_url == "redis://r:6379/0"
    c = cfg.cluster
    assert (c.namespace, c.lease_ttl_s, c.timeout_s, c.settle_s) == ("trunkline", 1.0, 0.25, 0.5)
    assert parse_config({"keys": {"k": SECRET}}).cluster is None


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({}, "cluster.redis_url"),
        ({"redis_url": "http://r"}, "cluster.redis_url"),
        ({"redis_url": "redis://r", "lease_ttl_s": 0.1}, "cluster.lease_ttl_s"),
        ({"redis_url": "redis://r", "lease_ttl_s": 1, "timeout_s": 0.9}, "cluster.timeout_s"),
        ({"redis_url": "redis://r", "lease_ttl_s": 0.4}, "cluster.timeout_s"),  # 0.25 default
        ({"redis_url": "redis://r", "settle_s": -1}, "cluster.settle_s"),
        ({"redis_url": "redis://r", "namespace": "a b"}, "cluster.namespace"),
        ({"redis_url": "redis://r", "member": "x" * 65}, "cluster.member"),
        ({"redis_url": "redis://r", "advertise_url": "ftp://x"}, "cluster.advertise_url"),
        ({"redis_url": "redis://r", "bogus": 1}, "cluster.bogus"),
    ],
)
def test_bad_cluster_values_are_named(table: dict[str, object], where: str) -> None:
    """Each invalid [cluster] value is refused with its key named."""
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        parse_config({"keys": {"k": SECRET}, "cluster": table})


def test_cluster_with_sip_is_accepted_but_not_with_a_livekit_sip_trunk() -> None:
    """[cluster] with [sip] parses (calls at any member, jobs at the pool's owner); a
    trunk with downstream_kind = "livekit" is refused with its key named."""
    trunk = {"numbers": ["*"], "pool": "p", "downstream": "127.0.0.1:5080"}
    base = {
        "keys": {"k": SECRET},
        "cluster": {"redis_url": "redis://r"},
        "sip": {"host": "127.0.0.1", "port": 5099, "trunks": {"t": trunk}},
    }
    assert parse_config(base).sip is not None
    lk = {**trunk, "downstream_kind": "livekit"}
    with pytest.raises(ConfigError, match=r"sip\.trunks\.t\.downstream_kind"):
        parse_config(
            {
                **base,
                "livekit": {"url": "ws://lk", "api_key": "k", "api_secret": SECRET},
                "sip": {"host": "127.0.0.1", "port": 5099, "trunks": {"t": lk}},
            }
        )


def test_single_process_server_never_imports_redis() -> None:
    """Building and importing the whole server without [cluster] leaves redis unimported."""
    code = (
        "import sys\n"
        "from trunkline.config import parse_config\n"
        "from trunkline.server.app import build_app\n"
        f"build_app(parse_config({{'keys': {{'k': '{SECRET}'}}}}))\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
