"""[sip] table validation: good tables parse, bad keys are named with what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from trunkline.common.errors import ConfigError
from trunkline.sip.config import SipConfigError, parse_sip_config


def table(**trunk: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"numbers": ["+1555*"], "pool": "p", "downstream": "gw:5080"}
    t.update(trunk)
    return {"trunks": {"main": t}}


def test_defaults_and_trunk_fields() -> None:
    """Omitted keys take documented defaults; downstream splits into host and port."""
    cfg = parse_sip_config(table())
    assert (cfg.host, cfg.port, cfg.udp, cfg.tcp, cfg.advertised_host) == (
        "0.0.0.0",
        5060,
        True,
        True,
        "127.0.0.1",
    )
    (t,) = cfg.trunks
    assert (t.downstream_host, t.downstream_port, t.refusal, t.retry_after_s) == (
        "gw",
        5080,
        503,
        5,
    )


def test_trust_defaults_and_values() -> None:
    """Trust keys: open, untrusted, 4 h calls by default; lists parse into networks."""
    cfg = parse_sip_config(table())
    (t,) = cfg.trunks
    assert t.is_open
    assert (t.trusted, t.max_call_duration_s, t.auth_algorithms) == (
        False,
        14400.0,
        ("SHA-256", "MD5"),
    )
    assert (cfg.tls_port, cfg.invite_rate_per_source, cfg.invite_burst_per_source) == (
        None,
        100.0,
        200,
    )
    assert (cfg.max_retransmitting, cfg.tcp_idle_timeout_s) == (1000, 120.0)
    assert (cfg.max_tcp_connections_per_source, cfg.max_tcp_connections) == (32, 1024)
    assert (cfg.auth_realm, cfg.auth_nonce_ttl_s) == ("trunkline", 60.0)
    cfg = parse_sip_config(
        table(
            allowed_addresses=["203.0.113.0/24", "2001:db8::1"],
            auth_username="u",
            auth_password="p",
        )
    )
    (t,) = cfg.trunks
    assert not t.is_open
    assert [str(n) for n in t.allowed_addresses] == ["203.0.113.0/24", "2001:db8::1/128"]


def test_trunk_matching_prefers_exact_then_longest_prefix_then_star() -> None:
    """Exact numbers beat prefixes; longer prefixes beat shorter; '*' catches the rest."""
    cfg = parse_sip_config(
        {
            "trunks": {
                "star": {"numbers": ["*"], "pool": "a", "downstream": "h:1"},
                "short": {"numbers": ["+1*"], "pool": "b", "downstream": "h:1"},
                "long": {"numbers": ["+1555*"], "pool": "c", "downstream": "h:1"},
                "exact": {"numbers": ["+15550100"], "pool": "d", "downstream": "h:1"},
            }
        }
    )

    def name(user: str | None) -> str | None:
        trunk = cfg.match_trunk(user)
        return trunk.name if trunk else None

    assert name("+15550100") == "exact"
    assert name("+15550199") == "long"
    assert name("+1212") == "short"
    assert name("44") == "star"
    assert name(None) == "star"


@pytest.mark.parametrize(
    ("tbl", "key", "allowed"),
    [
        (table(refusal=404), "sip.trunks.main.refusal", "503, 486, 480"),
        (table(downstream="gw"), "sip.trunks.main.downstream", "host:port"),
        (table(downstream_transport="tls"), "sip.trunks.main.downstream_transport", "udp, tcp"),
        (table(max_wait_s=-1), "sip.trunks.main.max_wait_s", "between 0 and 300"),
        (table(retry_after_s=1.5), "sip.trunks.main.retry_after_s", "whole seconds"),
        (table(numbers=[]), "sip.trunks.main.numbers", "non-empty list"),
        (table(colour="red"), "sip.trunks.main.colour", "allowed: numbers"),
        ({"prot": 1}, "sip.prot", "allowed: host, port"),
        ({"port": 70000}, "sip.port", "0-65535"),
        ({"udp": False, "tcp": False}, "sip.udp", "enable at least one"),
        (table(allowed_addresses=["10.0.0.300"]), "sip.trunks.main.allowed_addresses", "CIDR"),
        (table(allowed_addresses=["10.0.0.1/8"]), "sip.trunks.main.allowed_addresses", "host bits"),
        (table(allowed_addresses=[]), "sip.trunks.main.allowed_addresses", "omit the key"),
        (table(auth_username="u"), "sip.trunks.main.auth_password", "set both"),
        (table(auth_algorithms=["SHA-512"]), "sip.trunks.main.auth_algorithms", "SHA-256, MD5"),
        (table(trusted="yes"), "sip.trunks.main.trusted", "true or false"),
        (table(max_call_duration_s=-1), "sip.trunks.main.max_call_duration_s", "between 0"),
        ({"tls_port": 5061}, "sip.tls_cert", "non-empty string"),
        ({"tls_cert": "c.pem"}, "sip.tls_cert", "only with sip.tls_port"),
        (
            {"port": 5061, "tls_port": 5061, "tls_cert": "c", "tls_key": "k"},
            "sip.tls_port",
            "differ",
        ),
        ({"invite_rate_per_source": -1}, "sip.invite_rate_per_source", "per second"),
        ({"invite_burst_per_source": 0.5}, "sip.invite_burst_per_source", "whole requests"),
        ({"max_retransmitting": -1}, "sip.max_retransmitting", "whole transactions"),
        ({"tcp_idle_timeout_s": 0}, "sip.tcp_idle_timeout_s", "between 1"),
        ({"max_tcp_connections_per_source": 0}, "sip.max_tcp_connections_per_source", "between 1"),
        ({"auth_realm": 'a"b'}, "sip.auth_realm", "without quotes"),
        ({"auth_nonce_ttl_s": 0}, "sip.auth_nonce_ttl_s", "between 1"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(
    tbl: dict[str, Any], key: str, allowed: str
) -> None:
    """Each invalid value raises SipConfigError naming its key path and the allowed values."""
    with pytest.raises(SipConfigError) as err:
        parse_sip_config(tbl)
    assert str(err.value).startswith(key + ":")
    assert allowed in str(err.value)


def test_a_number_listed_twice_names_both_trunks() -> None:
    """The same exact number on two trunks is ambiguous and refused."""
    with pytest.raises(SipConfigError, match="already listed by trunk 'a'"):
        parse_sip_config(
            {
                "trunks": {
                    "a": {"numbers": ["+1"], "pool": "p", "downstream": "h:1"},
                    "b": {"numbers": ["+1"], "pool": "p", "downstream": "h:1"},
                }
            }
        )


def test_every_problem_is_reported_at_once() -> None:
    """parse_sip_config lists all problems, one `key: problem` per line, not just the first."""
    with pytest.raises(SipConfigError) as err:
        parse_sip_config(
            {
                "port": "5060",
                "udp": 1,
                "trunks": {
                    "a": {"numbers": ["+1"], "pool": "", "downstream": "h:1", "refusal": 404},
                    "b": "not a table",
                },
            }
        )
    assert isinstance(err.value, ConfigError)
    lines = str(err.value).splitlines()
    assert lines == list(err.value.errors)
    assert [line.split(":", 1)[0] for line in lines] == [
        "sip.port",
        "sip.udp",
        "sip.trunks.a.pool",
        "sip.trunks.a.refusal",
        "sip.trunks.b",
    ]
