"""The ``[sip]`` configuration table: listener and trunks.

Theory of operation: the server's TOML loader hands the ``[sip]`` table (a plain
dict) to :func:`parse_sip_config`, which returns frozen dataclasses or raises
:class:`SipConfigError` naming the offending key (``sip.trunks.support.refusal``)
and what is allowed. Nothing is read from the environment or the file system.

Example::

    [sip]
    host = "0.0.0.0"          # listen address
    port = 5060
    udp = true
    tcp = true
    advertised_host = "10.0.0.5"  # written in Via / Record-Route; default: host,
                                  # or 127.0.0.1 when host is a wildcard

    [sip.trunks.support]
    numbers = ["+15550100", "+1555*"]  # called number / Request-URI user;
                                       # "prefix*" and "*" are wildcards
    pool = "support"                   # agent pool asked for a job
    max_wait_s = 2.0                   # how long a call may wait for a slot
    downstream = "127.0.0.1:5080"      # media gateway the INVITE is forwarded to
    downstream_transport = "udp"       # or "tcp"
    refusal = 503                      # 503 (default), 486 or 480
    retry_after_s = 5                  # Retry-After on the refusal; 0 = omit

A call matches the trunk listing its number exactly, else the one with the
longest matching prefix wildcard, else a trunk listing ``"*"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["REFUSAL_CODES", "SipConfig", "SipConfigError", "Trunk", "parse_sip_config"]

REFUSAL_CODES = (503, 486, 480)
_SIP_KEYS = ("host", "port", "udp", "tcp", "advertised_host", "trunks")
_TRUNK_KEYS = (
    "numbers",
    "pool",
    "max_wait_s",
    "downstream",
    "downstream_transport",
    "refusal",
    "retry_after_s",
)
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class SipConfigError(ValueError):
    """The ``[sip]`` table is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True, slots=True)
class Trunk:
    """Where calls to some numbers go and how they are refused."""

    name: str
    numbers: tuple[str, ...]
    pool: str
    downstream_host: str
    downstream_port: int
    downstream_transport: str = "udp"
    max_wait_s: float = 2.0
    refusal: int = 503
    retry_after_s: int = 5

    def match_rank(self, user: str) -> int:
        """How specifically this trunk matches ``user``: -1 no match, 0 for ``*``,
        1 + prefix length for ``prefix*``, a large number for an exact match."""
        best = -1
        for pattern in self.numbers:
            if pattern == user:
                return 1_000_000
            if pattern.endswith("*") and user.startswith(pattern[:-1]):
                best = max(best, len(pattern) if pattern != "*" else 0)
        return best


@dataclass(frozen=True, slots=True)
class SipConfig:
    """The SIP listener and its trunks."""

    host: str = "0.0.0.0"
    port: int = 5060
    udp: bool = True
    tcp: bool = True
    advertised_host: str = "127.0.0.1"
    trunks: tuple[Trunk, ...] = ()

    def match_trunk(self, user: str | None) -> Trunk | None:
        """The trunk for a called number / Request-URI user, or None."""
        best: Trunk | None = None
        rank = -1
        for trunk in self.trunks:
            r = trunk.match_rank(user or "")
            if r > rank:
                best, rank = trunk, r
        return best


def _fail(key: str, problem: str) -> SipConfigError:
    return SipConfigError(f"{key}: {problem}")


def _get_str(table: Mapping[str, Any], key: str, path: str, default: str | None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise _fail(f"{path}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def _get_bool(table: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{path}.{key}", f"expected true or false, got {value!r}")
    return value


def _get_port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _fail(key, f"expected a port number 0-65535, got {value!r}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(f"{path}.{key}", f"unknown key; allowed: {', '.join(allowed)}")


def _parse_trunk(name: str, table: object) -> Trunk:
    path = f"sip.trunks.{name}"
    if not isinstance(table, Mapping):
        raise _fail(path, "expected a table")
    _check_keys(table, _TRUNK_KEYS, path)
    numbers = table.get("numbers")
    if (
        not isinstance(numbers, list)
        or not numbers
        or not all(isinstance(n, str) and n and "*" not in n[:-1] for n in numbers)
    ):
        raise _fail(
            f"{path}.numbers",
            'expected a non-empty list of numbers such as "+15550100", "+1555*" or "*"',
        )
    pool = _get_str(table, "pool", path, None)
    downstream = _get_str(table, "downstream", path, None)
    host, sep, port_text = downstream.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(f"{path}.downstream", f'expected "host:port", got {downstream!r}')
    transport = _get_str(table, "downstream_transport", path, "udp")
    if transport not in ("udp", "tcp"):
        raise _fail(f"{path}.downstream_transport", f"{transport!r} not allowed; allowed: udp, tcp")
    max_wait = table.get("max_wait_s", 2.0)
    if (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or not math.isfinite(max_wait)
        or not 0 <= max_wait <= 300
    ):
        raise _fail(f"{path}.max_wait_s", f"expected seconds between 0 and 300, got {max_wait!r}")
    refusal = table.get("refusal", 503)
    if isinstance(refusal, bool) or refusal not in REFUSAL_CODES:
        allowed = ", ".join(map(str, REFUSAL_CODES))
        raise _fail(f"{path}.refusal", f"{refusal!r} not allowed; allowed: {allowed}")
    retry = table.get("retry_after_s", 5)
    if isinstance(retry, bool) or not isinstance(retry, int) or not 0 <= retry <= 86400:
        raise _fail(f"{path}.retry_after_s", f"expected whole seconds 0-86400, got {retry!r}")
    return Trunk(
        name=name,
        numbers=tuple(numbers),
        pool=pool,
        downstream_host=host.strip("[]"),
        downstream_port=int(port_text),
        downstream_transport=transport,
        max_wait_s=float(max_wait),
        refusal=int(refusal),
        retry_after_s=retry,
    )


def parse_sip_config(table: Mapping[str, Any]) -> SipConfig:
    """Validate the ``[sip]`` table and build a SipConfig; raise SipConfigError."""
    if not isinstance(table, Mapping):
        raise _fail("sip", "expected a table")
    _check_keys(table, _SIP_KEYS, "sip")
    host = _get_str(table, "host", "sip", "0.0.0.0")
    port = _get_port(table.get("port", 5060), "sip.port")
    udp = _get_bool(table, "udp", "sip", True)
    tcp = _get_bool(table, "tcp", "sip", True)
    if not udp and not tcp:
        raise _fail("sip.udp", "udp and tcp are both false; enable at least one")
    default_adv = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    advertised = _get_str(table, "advertised_host", "sip", default_adv)
    raw_trunks = table.get("trunks", {})
    if not isinstance(raw_trunks, Mapping):
        raise _fail("sip.trunks", "expected a table of trunks, e.g. [sip.trunks.support]")
    trunks = tuple(_parse_trunk(str(name), t) for name, t in raw_trunks.items())
    seen: dict[str, str] = {}
    for trunk in trunks:
        for number in trunk.numbers:
            if number in seen:
                raise _fail(
                    f"sip.trunks.{trunk.name}.numbers",
                    f"{number!r} is already listed by trunk {seen[number]!r}",
                )
            seen[number] = trunk.name
    return SipConfig(host, port, udp, tcp, advertised, trunks)
