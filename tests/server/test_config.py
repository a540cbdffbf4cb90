"""Config validation: every problem named by key with what is allowed, all at once,
and `trunkline serve` refusing to start on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trunkline.cli import main
from trunkline.config import PROVIDERS, ConfigError, load_config, parse_config
from trunkline.core.config import Placement


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    first, *lines = str(err.value).splitlines()
    assert first == "invalid configuration:"
    return [line.strip() for line in lines]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            {"severs": {}},
            "severs: unknown key; allowed: server, keys, livekit, defaults, pools, sip, autoscale",
            id="unknown-top-key",
        ),
        pytest.param(
            {"server": {"hots": "x"}},
            "server.hots: unknown key; allowed: host, port, log_level, log_format, history_size",
            id="unknown-server-key",
        ),
        pytest.param(
            {"pools": {"a": {"max_jobs": 4}}},
            "pools.a.max_jobs: unknown key; allowed: max_jobs_per_worker,",
            id="unknown-pool-key",
        ),
        pytest.param(
            {"server": {"port": 70000}}, "server.port: must be 0..65535 (got 70000)", id="port"
        ),
        pytest.param(
            {"server": {"port": "7880"}},
            "server.port: must be 0..65535 (got '7880')",
            id="port-str",
        ),
        pytest.param(
            {"pools": {"a": {"placement": "round-robin"}}},
            "pools.a.placement: must be 'pack' or 'spread' (got 'round-robin')",
            id="placement",
        ),
        pytest.param(
            {"pools": {"a": {"max_jobs_per_worker": "4"}}},
            "pools.a.max_jobs_per_worker: must be an integer >= 1 (got '4')",
            id="wrong-type",
        ),
        pytest.param(
            {"pools": {"a": {"max_jobs_per_worker": True}}},
            "pools.a.max_jobs_per_worker: must be an integer >= 1 (got True)",
            id="bool-is-not-int",
        ),
        pytest.param(
            {"defaults": {"availability_timeout_s": 0}},
            "defaults.availability_timeout_s: must be a number > 0 (got 0)",
            id="timeout-zero",
        ),
        pytest.param(
            {"pools": {"a": {"redispatch_on_worker_loss": 1}}},
            "pools.a.redispatch_on_worker_loss: must be true or false (got 1)",
            id="bool",
        ),
        pytest.param(
            {"pools": {"a": {"load_threshold": 1.5}}},
            "pools.a.load_threshold: must be a number in (0, 1] (got 1.5)",
            id="threshold",
        ),
        pytest.param(
            {"server": {"log_level": "loud"}},
            "server.log_level: must be one of debug, info, warning, error (got 'loud')",
            id="log-level",
        ),
        pytest.param({"keys": {"k": ""}}, "keys.k: must be a non-empty secret string", id="key"),
        pytest.param({"pools": {"a": 3}}, "pools.a: must be a table", id="pool-not-table"),
        pytest.param(
            {"livekit": {"url": "wss://lk.example.com"}},
            "livekit: needs url, api_key and api_secret together (missing: api_key, api_secret)",
            id="livekit-url-only",
        ),
        pytest.param(
            {"livekit": {"api_key": "k", "api_secret": "s"}},
            "livekit: needs url, api_key and api_secret together (missing: url)",
            id="livekit-no-url",
        ),
    ],
)
def test_config_error_names_key_and_allowed(data: dict[str, Any], expected: str) -> None:
    """A wrong value is refused with its key path and what is allowed."""
    errors = _errors(data)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_config_lists_all_problems_at_once() -> None:
    """Every problem in the file is reported in one error, not just the first."""
    errors = _errors(
        {
            "bogus": 1,
            "server": {"port": -1},
            "pools": {
                "a": {"placement": "random", "queue_max_wait_s": -5},
                "b": {"max_strikes": 0},
            },
        }
    )
    keys = [line.split(":", 1)[0] for line in errors]
    assert sorted(keys) == sorted(
        [
            "bogus",
            "server.port",
            "pools.a.placement",
            "pools.a.queue_max_wait_s",
            "pools.b.max_strikes",
        ]
    )


def test_sip_errors_are_reported_with_the_other_sections() -> None:
    """[sip] problems join those of [server] and [pools.x] in the one error, every
    one of them, not only the first of [sip]."""
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "server": {"port": -1},
                "pools": {"a": {"max_strikes": 0}},
                "sip": {
                    "port": 70000,
                    "colour": "red",
                    "trunks": {"main": {"numbers": [], "pool": "p", "downstream": "gw"}},
                },
            }
        )
    assert str(err.value).splitlines()[0] == "invalid configuration:"
    keys = sorted(line.split(":", 1)[0] for line in err.value.errors)
    assert keys == [
        "pools.a.max_strikes",
        "server.port",
        "sip.colour",
        "sip.port",
        "sip.trunks.main.downstream",
        "sip.trunks.main.numbers",
    ]
    assert "sip.port: expected a port number 0-65535, got 70000" in err.value.errors


def test_replica_pool_provider_defaults_to_local() -> None:
    """A replica pool without `provider` is started by the local provider; naming it works too."""
    pool = {"command": "agent", "max_jobs_per_worker": 2}
    cfg = parse_config({"pools": {"a": pool, "b": pool | {"provider": "local"}}})
    assert cfg.replica_pools["a"].provider == "local"
    assert cfg.replica_pools["b"].provider == "local"
    assert PROVIDERS == ("local", "kubernetes")


def test_unknown_provider_is_refused_with_the_allowed_names() -> None:
    """An unknown `provider` names the key and every provider there is."""
    pool = {"command": "agent", "max_jobs_per_worker": 2, "provider": "k8s"}
    assert _errors({"pools": {"a": pool}}) == [
        "pools.a.provider: must be one of the replica providers: local, kubernetes (got 'k8s')"
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"pools": {"a": {"provider": "local"}}}, "pools.a.provider: needs `command`"),
        ({"defaults": {"provider": "local"}}, "defaults.provider: only allowed in a [pools."),
    ],
)
def test_provider_belongs_to_a_replica_pool(data: dict[str, Any], expected: str) -> None:
    """`provider` means nothing without `command`, and [defaults] cannot hold it."""
    (error,) = _errors(data)
    assert error.startswith(expected), error


def test_limit_keys_are_validated_together() -> None:
    """The limit keys of [server] and of a pool are checked like the others, every problem
    listed at once, and pool names follow the agent-name rule."""
    data = {
        "server": {
            "max_worker_jobs": 0,
            "max_trace_events": 3,
            "max_queued": -1,
            "worker_outbound_limit_bytes": 10,
        },
        "pools": {"bad name": {"max_queued": -1, "terminate_timeout_s": 0}},
    }
    assert _errors(data) == [
        "server.max_worker_jobs: must be an integer >= 1 (got 0)",
        "server.max_trace_events: must be an integer >= 10 (got 3)",
        "server.max_queued: must be an integer >= 0 (got -1)",
        "server.worker_outbound_limit_bytes: must be an integer >= 65536 (bytes) (got 10)",
        "pools.bad name: agent name 'bad name' has characters outside A-Z a-z 0-9 . _ - "
        '(use only those, or "" for the default agent)',
        "pools.bad name.max_queued: must be an integer >= 0 (got -1)",
        "pools.bad name.terminate_timeout_s: must be a number > 0 (got 0)",
    ]


def test_limit_keys_have_defaults_and_apply() -> None:
    """Unset, the limits take their documented defaults; set, they reach the config."""
    cfg = parse_config({}, dev=True)
    srv = cfg.server
    assert (srv.max_worker_jobs, srv.max_trace_events, srv.max_queued) == (1000, 200, 10_000)
    assert srv.worker_outbound_limit_bytes == 4 << 20
    assert (cfg.defaults.max_queued, cfg.defaults.terminate_timeout_s) == (1000, 10.0)
    cfg = parse_config(
        {
            "server": {"max_worker_jobs": 8, "max_queued": 0},
            "defaults": {"max_queued": 5},
            "pools": {"p": {"terminate_timeout_s": 2}},
        },
        dev=True,
    )
    assert (cfg.server.max_worker_jobs, cfg.server.max_queued) == (8, 0)
    assert cfg.pools["p"].max_queued == 5
    assert cfg.pools["p"].terminate_timeout_s == 2.0


def test_valid_config_builds_pools() -> None:
    """A valid config yields typed pool settings, defaults inherited per pool."""
    cfg = parse_config(
        {
            "server": {"port": 9000},
            "keys": {"k": "s" * 32},
            "defaults": {"queue_max_wait_s": 2},
            "pools": {"a": {"max_jobs_per_worker": 4, "placement": "spread"}},
        }
    )
    pool = cfg.pools["a"]
    assert (pool.max_jobs_per_worker, pool.placement) == (4, Placement.SPREAD)
    assert pool.queue_max_wait_s == 2.0
    assert cfg.server.port == 9000
    assert dict(cfg.keys) == {"k": "s" * 32}


def test_dev_adds_dev_key_and_binds_loopback() -> None:
    """`dev` adds devkey/secret and binds to 127.0.0.1 (or another loopback host
    the file names; anything else is refused, see tests/test_auth_dev.py)."""
    cfg = parse_config({}, dev=True)
    assert cfg.keys["devkey"] == "secret"
    assert cfg.server.host == "127.0.0.1"
    assert parse_config({"server": {"host": "::1"}}, dev=True).server.host == "::1"


def test_load_config_not_toml(tmp_path: Path) -> None:
    """A file that is not TOML is refused with its path named."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


BAD_TOML = """
[server]
port = 99999
[pools.support]
placement = "fastest"
max_jobs_per_worker = 0
"""


def test_serve_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`trunkline serve --config bad.toml` returns 2 with every problem on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "trunkline: invalid configuration:" in err
    assert "server.port: must be 0..65535 (got 99999)" in err
    assert "pools.support.placement: must be 'pack' or 'spread' (got 'fastest')" in err
    assert "pools.support.max_jobs_per_worker: must be an integer >= 1 (got 0)" in err


def test_serve_bad_config_process_exit_code(tmp_path: Path) -> None:
    """The real `python -m trunkline serve` process exits 2 on a bad config."""
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    proc = subprocess.run(
        [sys.executable, "-m", "trunkline", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "pools.support.placement" in proc.stderr
    assert "server.port" in proc.stderr
    assert proc.stdout == ""


def test_serve_without_keys_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`trunkline serve` with no keys and no --dev refuses to start (exit 2)."""
    cfg = tmp_path / "nokeys.toml"
    cfg.write_text("[server]\nport = 0\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "no API keys configured" in capsys.readouterr().err


def test_serve_with_an_unusable_pod_template_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Kubernetes pool whose pod template is not a Pod or PodTemplate stops
    `trunkline serve` with exit 2 and the provider's reason, not a traceback."""
    (tmp_path / "bad.yaml").write_text("kind: Deployment\nspec: {}\n")
    cfg = tmp_path / "k8s.toml"
    cfg.write_text(
        '[keys]\nk = "0123456789abcdef0123456789abcdef"\n'
        '[server]\nport = 0\n[autoscale]\nurl = "ws://127.0.0.1:1"\n'
        f'[pools.a]\nprovider = "kubernetes"\npod_template = "{tmp_path / "bad.yaml"}"\n'
        "max_jobs_per_worker = 2\n"
    )
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "trunkline: pod template" in err
    assert "kind must be Pod or PodTemplate (got 'Deployment')" in err
