"""Auth hygiene at start: `--dev` stays a loopback-only toy, and real API secrets
are long enough to resist guessing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trunkline import config
from trunkline.config import ConfigError, parse_config

MIN_SECRET_BYTES = 32

LONG = "x" * MIN_SECRET_BYTES


def serve(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`python -m trunkline serve ARGS`, which must exit on its own (a refusal)."""
    return subprocess.run(
        [sys.executable, "-m", "trunkline", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def errors(data: dict[str, object], *, dev: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, dev=dev)
    return list(err.value.errors)


# ------------------------------------------------------------------ --dev


def test_dev_refuses_keys_from_the_config_file(tmp_path: Path) -> None:
    """`serve --dev --config` with a [keys] section exits 2 naming both ways out,
    instead of serving the public devkey/secret next to the production keys."""
    cfg = tmp_path / "prod.toml"
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\n[keys]\nprod = "{LONG}"\n')
    proc = serve("--dev", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "keys: --dev" in proc.stderr
    assert "remove --dev" in proc.stderr
    assert "remove the [keys] section" in proc.stderr
    assert LONG not in proc.stderr  # a secret is never echoed


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
def test_dev_refuses_a_non_loopback_host_in_the_file(host: str) -> None:
    """A [server] host that is not loopback is a config error under --dev: the dev
    key is public, so a dev server must not be reachable from the network."""
    found = errors({"server": {"host": host}}, dev=True)
    assert len(found) == 1, found
    assert found[0].startswith("server.host: --dev binds to loopback only"), found[0]
    assert "127.0.0.1" in found[0]


def test_dev_reports_keys_and_host_together() -> None:
    """Both --dev problems (and any other) come in one error."""
    found = errors({"server": {"host": "0.0.0.0", "port": -1}, "keys": {"prod": LONG}}, dev=True)
    assert sorted(e.split(":", 1)[0] for e in found) == ["keys", "server.host", "server.port"]


def test_dev_refuses_a_non_loopback_host_flag(tmp_path: Path) -> None:
    """`serve --dev --host 0.0.0.0` exits 2 before binding, naming the fix."""
    proc = serve("--dev", "--host", "0.0.0.0", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert "--dev binds to loopback only" in proc.stderr
    assert "remove --dev" in proc.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_dev_still_runs_on_loopback(host: str) -> None:
    """Loopback addresses and `localhost` are fine under --dev, and the dev key is added."""
    cfg = parse_config({"server": {"host": host}, "pools": {"a": {}}}, dev=True)
    assert cfg.server.host == host
    assert dict(cfg.keys) == {"devkey": "secret"}


def test_dev_without_a_config_binds_loopback() -> None:
    """Plain --dev: the dev key on 127.0.0.1."""
    cfg = parse_config({}, dev=True)
    assert (cfg.server.host, dict(cfg.keys)) == ("127.0.0.1", {"devkey": "secret"})


# ---------------------------------------------------------------- secrets


def test_short_secrets_are_refused_all_at_once() -> None:
    """Outside --dev every secret shorter than 32 bytes is an error naming its key
    and how to make a good one; all of them (and other problems) are reported at once."""
    found = errors(
        {"keys": {"a": "s", "b": "x" * (MIN_SECRET_BYTES - 1), "ok": LONG}, "server": {"port": -1}}
    )
    assert sorted(e.split(":", 1)[0] for e in found) == ["keys.a", "keys.b", "server.port"]
    short = next(e for e in found if e.startswith("keys.a:"))
    assert f"at least {MIN_SECRET_BYTES} bytes" in short
    assert "openssl rand" in short
    assert "'s'" not in short  # the secret itself is not echoed


def test_a_long_secret_is_accepted() -> None:
    """32 bytes (UTF-8) is enough."""
    assert dict(parse_config({"keys": {"k": LONG}}).keys) == {"k": LONG}
    assert config.MIN_SECRET_BYTES == MIN_SECRET_BYTES


def test_serve_refuses_a_one_byte_secret(tmp_path: Path) -> None:
    """`trunkline serve` with `k = "s"` exits 2 before listening."""
    cfg = tmp_path / "short.toml"
    cfg.write_text('[server]\nhost = "127.0.0.1"\nport = 0\n[keys]\nk = "s"\n')
    proc = serve("--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "keys.k:" in proc.stderr
