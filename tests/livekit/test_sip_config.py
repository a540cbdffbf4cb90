"""The keys of SIP calls through LiveKit SIP: `[sip.trunks] downstream_kind` and
`room_bind_timeout_s`, `[sip] livekit_poll_s`, and the `[livekit]` they need."""

from __future__ import annotations

from typing import Any

import pytest

from trunkline.common.errors import ConfigError
from trunkline.config import parse_config
from trunkline.sip.config import SipConfigError, parse_sip_config


def sip(**trunk: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"numbers": ["+1555*"], "pool": "p", "downstream": "lk:5060"}
    t.update(trunk)
    return {"trunks": {"main": t}}


def test_defaults_are_a_gateway_downstream() -> None:
    """Without the keys a trunk is an ordinary gateway; polls default to 1 s."""
    cfg = parse_sip_config(sip())
    (t,) = cfg.trunks
    assert (t.downstream_kind, t.to_livekit, t.room_bind_timeout_s) == ("gateway", False, 10.0)
    assert cfg.livekit_poll_s == 1.0


def test_a_livekit_trunk_parses() -> None:
    """downstream_kind = "livekit" with its timeout, and the poll interval."""
    cfg = parse_sip_config(
        {**sip(downstream_kind="livekit", room_bind_timeout_s=3), "livekit_poll_s": 0.5}
    )
    (t,) = cfg.trunks
    assert (t.to_livekit, t.room_bind_timeout_s, cfg.livekit_poll_s) == (True, 3.0, 0.5)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (sip(downstream_kind="asterisk"), "downstream_kind: 'asterisk' not allowed"),
        (sip(downstream_kind="livekit", room_bind_timeout_s=0), "room_bind_timeout_s: expected"),
        (sip(room_bind_timeout_s=5), 'has no effect without downstream_kind = "livekit"'),
        ({**sip(), "livekit_poll_s": 0}, "livekit_poll_s: expected seconds between 0.05 and 60"),
    ],
    ids=["unknown kind", "zero timeout", "timeout without livekit", "zero poll"],
)
def test_bad_values_are_named(table: dict[str, Any], message: str) -> None:
    """Each bad value is reported with its key and what is allowed."""
    with pytest.raises(SipConfigError, match=message):
        parse_sip_config(table)


def test_a_livekit_trunk_needs_the_livekit_table() -> None:
    """The held call's agent gets a room token from [livekit]'s key: without it, an error."""
    data = {"keys": {"k": "s" * 32}, "sip": sip(downstream_kind="livekit")}
    with pytest.raises(ConfigError, match=r"sip.trunks.main.downstream_kind: livekit needs"):
        parse_config(data)
    data["livekit"] = {"url": "wss://lk.example.com", "api_key": "k", "api_secret": "s"}
    assert parse_config(data).sip is not None
