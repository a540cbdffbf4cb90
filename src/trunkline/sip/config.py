"""The ``[sip]`` configuration table: listener and trunks.

Theory of operation: the server's TOML loader hands the ``[sip]`` table (a plain
dict) to :func:`check_sip_config` with the one
:class:`~trunkline.common.errors.ErrorCollector` it uses for every section, so
each problem (``sip.trunks.support.refusal: ...``, naming the key and what is
allowed) is reported together with those of the other sections.
:func:`parse_sip_config` is the standalone form: frozen dataclasses back, or
one :class:`SipConfigError` listing every problem, one per line. Nothing is
read from the environment or the file system.

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

from trunkline.common.errors import ConfigError, ErrorCollector

__all__ = [
    "REFUSAL_CODES",
    "SipConfig",
    "SipConfigError",
    "Trunk",
    "check_sip_config",
    "parse_sip_config",
]

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


class SipConfigError(ConfigError):
    """The ``[sip]`` table is invalid; each line of the message names a key and
    what is allowed."""


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


def _get_str(
    table: Mapping[str, Any], key: str, path: str, default: str | None, e: ErrorCollector
) -> str | None:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        e.add(f"{path}.{key}", f"expected a non-empty string, got {value!r}")
        return None
    return value


def _get_bool(
    table: Mapping[str, Any], key: str, path: str, default: bool, e: ErrorCollector
) -> bool | None:
    value = table.get(key, default)
    if not isinstance(value, bool):
        e.add(f"{path}.{key}", f"expected true or false, got {value!r}")
        return None
    return value


def _get_port(value: object, key: str, e: ErrorCollector) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        e.add(key, f"expected a port number 0-65535, got {value!r}")
        return None
    return value


def _check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], path: str, e: ErrorCollector
) -> None:
    for key in table:
        if key not in allowed:
            e.add(f"{path}.{key}", f"unknown key; allowed: {', '.join(allowed)}")


def _parse_trunk(name: str, table: object, e: ErrorCollector) -> Trunk | None:
    """The trunk, or None after recording every problem it has in `e`."""
    path = f"sip.trunks.{name}"
    if not isinstance(table, Mapping):
        e.add(path, "expected a table")
        return None
    found = len(e)
    _check_keys(table, _TRUNK_KEYS, path, e)
    numbers = table.get("numbers")
    if (
        not isinstance(numbers, list)
        or not numbers
        or not all(isinstance(n, str) and n and "*" not in n[:-1] for n in numbers)
    ):
        e.add(
            f"{path}.numbers",
            'expected a non-empty list of numbers such as "+15550100", "+1555*" or "*"',
        )
    pool = _get_str(table, "pool", path, None, e)
    downstream = _get_str(table, "downstream", path, None, e)
    host = port_text = ""
    if downstream is not None:
        host, sep, port_text = downstream.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            e.add(f"{path}.downstream", f'expected "host:port", got {downstream!r}')
    transport = _get_str(table, "downstream_transport", path, "udp", e)
    if transport is not None and transport not in ("udp", "tcp"):
        e.add(f"{path}.downstream_transport", f"{transport!r} not allowed; allowed: udp, tcp")
    max_wait = table.get("max_wait_s", 2.0)
    if (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or not math.isfinite(max_wait)
        or not 0 <= max_wait <= 300
    ):
        e.add(f"{path}.max_wait_s", f"expected seconds between 0 and 300, got {max_wait!r}")
    refusal = table.get("refusal", 503)
    if isinstance(refusal, bool) or refusal not in REFUSAL_CODES:
        allowed = ", ".join(map(str, REFUSAL_CODES))
        e.add(f"{path}.refusal", f"{refusal!r} not allowed; allowed: {allowed}")
    retry = table.get("retry_after_s", 5)
    if isinstance(retry, bool) or not isinstance(retry, int) or not 0 <= retry <= 86400:
        e.add(f"{path}.retry_after_s", f"expected whole seconds 0-86400, got {retry!r}")
    if len(e) > found or pool is None or transport is None or not isinstance(numbers, list):
        return None
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


def check_sip_config(table: Mapping[str, Any], e: ErrorCollector) -> SipConfig | None:
    """Validate the ``[sip]`` table, recording every problem in `e`; the
    SipConfig when it has none, else None (the caller raises from `e`)."""
    if not isinstance(table, Mapping):
        e.add("sip", "expected a table")
        return None
    found = len(e)
    _check_keys(table, _SIP_KEYS, "sip", e)
    host = _get_str(table, "host", "sip", "0.0.0.0", e)
    port = _get_port(table.get("port", 5060), "sip.port", e)
    udp = _get_bool(table, "udp", "sip", True, e)
    tcp = _get_bool(table, "tcp", "sip", True, e)
    if udp is False and tcp is False:
        e.add("sip.udp", "udp and tcp are both false; enable at least one")
    default_adv = "127.0.0.1" if host is None or host in _WILDCARD_HOSTS else host
    advertised = _get_str(table, "advertised_host", "sip", default_adv, e)
    raw_trunks = table.get("trunks", {})
    trunks: list[Trunk] = []
    if isinstance(raw_trunks, Mapping):
        for name, raw in raw_trunks.items():
            trunk = _parse_trunk(str(name), raw, e)
            if trunk is not None:
                trunks.append(trunk)
    else:
        e.add("sip.trunks", "expected a table of trunks, e.g. [sip.trunks.support]")
    seen: dict[str, str] = {}
    for trunk in trunks:
        for number in trunk.numbers:
            if number in seen:
                e.add(
                    f"sip.trunks.{trunk.name}.numbers",
                    f"{number!r} is already listed by trunk {seen[number]!r}",
                )
            seen[number] = trunk.name
    if len(e) > found or host is None or port is None or advertised is None:
        return None
    return SipConfig(host, port, bool(udp), bool(tcp), advertised, tuple(trunks))


def parse_sip_config(table: Mapping[str, Any]) -> SipConfig:
    """Validate the ``[sip]`` table and build a SipConfig; raise SipConfigError
    listing every problem, one ``key: problem`` per line."""
    e = ErrorCollector()
    config = check_sip_config(table, e)
    e.raise_if_any(header=None, error=SipConfigError)
    assert config is not None  # no problem recorded
    return config
