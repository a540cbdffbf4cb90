"""Small pure parts of the autoscale adapters: replica URL and exit descriptions."""

from __future__ import annotations

import dataclasses

import pytest

from trunkline.common.exits import describe_exit
from trunkline.config import AutoscaleSettings, parse_config
from trunkline.runtime.autoscaler import replica_url


def test_replica_url_reaches_an_unspecified_bind_address_on_loopback() -> None:
    """0.0.0.0 / :: become loopback; an explicit [autoscale] url wins; port 0 is refused."""
    cfg = parse_config({"server": {"port": 7000}})
    assert replica_url(cfg) == "ws://127.0.0.1:7000"
    v6 = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, host="::"))
    assert replica_url(v6) == "ws://[::1]:7000"
    own = dataclasses.replace(cfg, autoscale=AutoscaleSettings(url="wss://lb.example:443"))
    assert replica_url(own) == "wss://lb.example:443"
    zero = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))
    with pytest.raises(ValueError, match="port"):
        replica_url(zero)


def test_exit_descriptions_name_the_signal() -> None:
    """Exit codes are described the way operators read them."""
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "exit status unknown"
