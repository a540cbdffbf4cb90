"""Config validation of autoscaled pools: keys, types, and messages that name the fix."""

from __future__ import annotations

from typing import Any

import pytest

from trunkline.config import ConfigError, parse_config


def pools(**table: Any) -> dict[str, Any]:
    return {"pools": {"voice": table}}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_full_pool_is_parsed() -> None:
    """A pool with command and every scaling key becomes a ReplicaPoolConfig."""
    cfg = parse_config(
        pools(
            command="trunkline worker agent:entry --max-jobs 4",
            env={"A": "1"},
            max_jobs_per_worker=4,
            min_replicas=2,
            max_replicas=6,
            spare_slots=3,
            scale_down_delay_s=20,
            drain_timeout_s=120,
            start_timeout_s=30,
        )
        | {"autoscale": {"run_dir": "/tmp/x", "url": "ws://10.0.0.1:7880"}}
    )
    rp = cfg.replica_pools["voice"]
    assert rp.command == ("trunkline", "worker", "agent:entry", "--max-jobs", "4")
    assert rp.env == {"A": "1"}
    s = rp.scale
    assert (s.slots_per_replica, s.min_replicas, s.max_replicas, s.spare_slots) == (4, 2, 6, 3)
    assert (s.scale_down_delay_s, s.drain_timeout_s, s.start_timeout_s) == (20.0, 120.0, 30.0)
    assert cfg.autoscale.run_dir == "/tmp/x"
    assert cfg.pools["voice"].max_jobs_per_worker == 4


def test_list_command_and_defaults() -> None:
    """A list command is kept as is; unset keys take the documented defaults."""
    cfg = parse_config(pools(command=["python", "a b.py"], max_jobs_per_worker=2))
    rp = cfg.replica_pools["voice"]
    assert rp.command == ("python", "a b.py")
    assert (rp.scale.min_replicas, rp.scale.max_replicas) == (1, 10)
    assert parse_config(pools(max_jobs_per_worker=2)).replica_pools == {}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"command": "x", "min_replicas": 3, "max_replicas": 2, "max_jobs_per_worker": 1},
         "pools.voice.min_replicas: must be <= max_replicas (3 > 2)"),
        ({"command": "x"}, "pools.voice.max_jobs_per_worker: is required in a pool with `command`"),
        ({"min_replicas": 1}, "pools.voice.min_replicas: needs `command`"),
        ({"command": [], "max_jobs_per_worker": 1}, "pools.voice.command: must be a non-empty"),
        ({"command": "x", "max_jobs_per_worker": 1, "env": {"A": 1}}, "pools.voice.env: must be"),
        ({"command": "x", "max_jobs_per_worker": 1, "max_replicas": 0},
         "pools.voice.max_replicas: must be an integer >= 1"),
        ({"command": "x", "max_jobs_per_worker": 1, "spare_slots": -1},
         "pools.voice.spare_slots: must be an integer >= 0"),
        ({"command": "x", "max_jobs_per_worker": 1, "drain_timeout_s": "1"},
         "pools.voice.drain_timeout_s: must be a number >= 0"),
    ],
)  # fmt: skip
def test_invalid_pool_names_key_and_allowed_values(table: dict[str, Any], expected: str) -> None:
    """Every refusal names the key and what is allowed."""
    assert expected in error(pools(**table))


def test_scaling_keys_are_refused_in_defaults() -> None:
    """[defaults] cannot hold a command: each replica pool names its own."""
    assert "defaults.command: only allowed in a [pools." in error({"defaults": {"command": "x"}})


def test_autoscale_section_is_checked() -> None:
    """[autoscale] allows run_dir and url only."""
    msg = error({"autoscale": {"url": "tcp://x", "dir": "y"}})
    assert "autoscale.dir: unknown key" in msg
    assert "autoscale.url: must be a ws://" in msg
