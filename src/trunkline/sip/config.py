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
    tls_port = 5061               # SIP over TLS on its own port (off when absent)
    tls_cert = "/etc/trunkline/sip.crt"   # PEM certificate chain (with tls_port)
    tls_key = "/etc/trunkline/sip.key"    # PEM private key (with tls_port)
    invite_rate_per_source = 100  # INVITE/OPTIONS per second per unlisted source IP
    invite_burst_per_source = 200 # token bucket depth for that rate
    max_retransmitting = 1000     # final responses retransmitted on Timer G at once
    tcp_idle_timeout_s = 120      # close a TCP/TLS connection idle this long
    max_tcp_connections_per_source = 32
    max_tcp_connections = 1024
    auth_realm = "trunkline"      # realm of the digest challenges
    auth_nonce_ttl_s = 60         # how long a challenge's nonce may be answered

    [sip.trunks.support]
    numbers = ["+15550100", "+1555*"]  # called number / Request-URI user;
                                       # "prefix*" and "*" are wildcards
    pool = "support"                   # agent pool asked for a job
    max_wait_s = 2.0                   # how long a call may wait for a slot
    downstream = "127.0.0.1:5080"      # media gateway the INVITE is forwarded to
    downstream_transport = "udp"       # or "tcp"
    refusal = 503                      # 503 (default), 486 or 480
    retry_after_s = 5                  # Retry-After on the refusal; 0 = omit
    allowed_addresses = ["203.0.113.0/24", "198.51.100.7"]  # who may call it
    auth_username = "carrier"          # digest credentials the caller must prove
    auth_password = "s3cret-from-the-carrier"
    auth_algorithms = ["SHA-256", "MD5"]  # offered in this order (RFC 8760)
    trusted = false                    # keep the caller's P-Asserted-Identity
    max_call_duration_s = 14400        # end a call (BYE both ways) after this; 0 = never
    downstream_kind = "gateway"        # or "livekit": LiveKit SIP makes the call's room
    room_bind_timeout_s = 10           # livekit: how long a held slot waits for that room

With ``downstream_kind = "livekit"`` the call's job holds its slot without an
offer until the room LiveKit SIP creates for the call is seen (docs/livekit.md);
``[sip] livekit_poll_s`` (default 1) is how long after the INVITE went out,
and how often after that, the room service is polled when no webhook came.

A call matches the trunk listing its number exactly, else the one with the
longest matching prefix wildcard, else a trunk listing ``"*"``. A trunk with
neither ``allowed_addresses`` nor ``auth_username`` takes calls from anyone
(:attr:`Trunk.is_open`); the server warns about each at start.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from trunkline.common.errors import ConfigError, ErrorCollector

__all__ = [
    "AUTH_ALGORITHMS",
    "REFUSAL_CODES",
    "SipConfig",
    "SipConfigError",
    "Trunk",
    "TrunkChanges",
    "check_sip_config",
    "diff_trunks",
    "parse_sip_config",
]

REFUSAL_CODES = (503, 486, 480)
AUTH_ALGORITHMS = ("SHA-256", "MD5")
_SIP_KEYS = (
    "host",
    "port",
    "udp",
    "tcp",
    "advertised_host",
    "tls_port",
    "tls_cert",
    "tls_key",
    "invite_rate_per_source",
    "invite_burst_per_source",
    "max_retransmitting",
    "tcp_idle_timeout_s",
    "max_tcp_connections_per_source",
    "max_tcp_connections",
    "auth_realm",
    "auth_nonce_ttl_s",
    "livekit_poll_s",
    "trunks",
)
_TRUNK_KEYS = (
    "numbers",
    "pool",
    "max_wait_s",
    "downstream",
    "downstream_transport",
    "refusal",
    "retry_after_s",
    "allowed_addresses",
    "auth_username",
    "auth_password",
    "auth_algorithms",
    "trusted",
    "max_call_duration_s",
    "downstream_kind",
    "room_bind_timeout_s",
)
DOWNSTREAM_KINDS = ("gateway", "livekit")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
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
    allowed_addresses: tuple[Network, ...] = ()
    auth_username: str | None = None
    auth_password: str | None = None
    auth_algorithms: tuple[str, ...] = AUTH_ALGORITHMS
    trusted: bool = False
    max_call_duration_s: float = 14400.0
    downstream_kind: str = "gateway"
    room_bind_timeout_s: float = 10.0

    @property
    def to_livekit(self) -> bool:
        """True if the downstream is LiveKit SIP: the call's job is held until
        the room LiveKit SIP makes for it is seen."""
        return self.downstream_kind == "livekit"

    @property
    def is_open(self) -> bool:
        """True if anyone who can reach the port may call this trunk (no ACL, no auth)."""
        return not self.allowed_addresses and self.auth_username is None

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """True if a request from ``address`` passes ``allowed_addresses`` (None:
        the source is not an IP address, admitted only by a trunk without a list)."""
        if not self.allowed_addresses:
            return True
        if address is None:
            return False
        return any(address in net for net in self.allowed_addresses)

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
    tls_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    invite_rate_per_source: float = 100.0
    invite_burst_per_source: int = 200
    max_retransmitting: int = 1000
    tcp_idle_timeout_s: float = 120.0
    max_tcp_connections_per_source: int = 32
    max_tcp_connections: int = 1024
    auth_realm: str = "trunkline"
    auth_nonce_ttl_s: float = 60.0
    livekit_poll_s: float = 1.0

    def match_trunk(self, user: str | None) -> Trunk | None:
        """The trunk for a called number / Request-URI user, or None."""
        best: Trunk | None = None
        rank = -1
        for trunk in self.trunks:
            r = trunk.match_rank(user or "")
            if r > rank:
                best, rank = trunk, r
        return best


@dataclass(frozen=True, slots=True)
class TrunkChanges:
    """How one trunk table differs from another, by trunk name: `changed`
    pairs each kept trunk whose settings differ with the keys that did (key
    names only: a changed password is never echoed)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        """One line for a reload's answer and log."""
        changed = ", ".join(f"{name} ({', '.join(keys)})" for name, keys in self.changed)
        return (
            f"sip.trunks: {len(self.added)} added {list(self.added)}, "
            f"{len(self.removed)} removed {list(self.removed)}, "
            f"{len(self.changed)} changed [{changed}]"
        )


def diff_trunks(old: Sequence[Trunk], new: Sequence[Trunk]) -> TrunkChanges:
    """What replacing trunk table `old` by `new` adds, removes and changes."""
    was = {t.name: t for t in old}
    now = {t.name: t for t in new}
    changed = []
    for name in sorted(set(was) & set(now)):
        a, b = was[name], now[name]
        keys = tuple(
            _TRUNK_KEY_OF.get(f.name, f.name)
            for f in fields(Trunk)
            if getattr(a, f.name) != getattr(b, f.name)
        )
        if keys:
            changed.append((name, tuple(dict.fromkeys(keys))))
    return TrunkChanges(
        added=tuple(sorted(set(now) - set(was))),
        removed=tuple(sorted(set(was) - set(now))),
        changed=tuple(changed),
    )


# Trunk fields named by the config key they come from.
_TRUNK_KEY_OF = {"downstream_host": "downstream", "downstream_port": "downstream"}


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


def _get_number(
    table: Mapping[str, Any],
    key: str,
    path: str,
    default: float,
    low: float,
    high: float,
    e: ErrorCollector,
    *,
    whole: bool = False,
    unit: str = "seconds",
) -> float | None:
    """A number in [low, high] (a whole one with ``whole``), or None after recording why."""
    value = table.get(key, default)
    kind = f"whole {unit}" if whole else unit
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        e.add(f"{path}.{key}", f"expected {kind} between {low:g} and {high:g}, got {value!r}")
        return None
    return float(value)


def _parse_networks(value: object, key: str, e: ErrorCollector) -> tuple[Network, ...]:
    """``allowed_addresses``: IPs and CIDRs; every bad entry is named."""
    if not isinstance(value, list) or not value:
        e.add(
            key,
            'expected a non-empty list of IP addresses or CIDRs such as "203.0.113.7" '
            'or "203.0.113.0/24" (omit the key to accept any source)',
        )
        return ()
    nets: list[Network] = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            detail = f" ({exc})" if "host bits" in str(exc) else ""
            e.add(key, f"{item!r} is not an IP address or CIDR{detail}")
            continue
        nets.append(net)
    return tuple(nets)


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
    nets: tuple[Network, ...] = ()
    if "allowed_addresses" in table:
        nets = _parse_networks(table["allowed_addresses"], f"{path}.allowed_addresses", e)
    username = table.get("auth_username")
    password = table.get("auth_password")
    for key, value in (("auth_username", username), ("auth_password", password)):
        if value is not None and (not isinstance(value, str) or not value or '"' in value):
            e.add(f"{path}.{key}", f"expected a non-empty string without '\"', got {value!r}")
    if (username is None) != (password is None):
        missing = "auth_password" if password is None else "auth_username"
        e.add(f"{path}.{missing}", "auth_username and auth_password go together; set both")
    algorithms = table.get("auth_algorithms", list(AUTH_ALGORITHMS))
    if (
        not isinstance(algorithms, list)
        or not algorithms
        or not all(a in AUTH_ALGORITHMS for a in algorithms)
        or len(set(algorithms)) != len(algorithms)
    ):
        e.add(
            f"{path}.auth_algorithms",
            f"expected a non-empty list of distinct values from {', '.join(AUTH_ALGORITHMS)} "
            f"(most preferred first), got {algorithms!r}",
        )
    trusted = _get_bool(table, "trusted", path, False, e)
    duration = _get_number(table, "max_call_duration_s", path, 14400.0, 0, 604800, e)
    kind = _get_str(table, "downstream_kind", path, "gateway", e)
    if kind is not None and kind not in DOWNSTREAM_KINDS:
        e.add(f"{path}.downstream_kind", f"{kind!r} not allowed; allowed: gateway, livekit")
    bind_s = _get_number(table, "room_bind_timeout_s", path, 10.0, 0.1, 300, e)
    if "room_bind_timeout_s" in table and kind != "livekit":
        e.add(f"{path}.room_bind_timeout_s", 'has no effect without downstream_kind = "livekit"')
    if (
        len(e) > found
        or pool is None
        or transport is None
        or not isinstance(numbers, list)
        or duration is None
        or kind is None
        or bind_s is None
    ):
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
        allowed_addresses=nets,
        auth_username=username,
        auth_password=password,
        auth_algorithms=tuple(algorithms),
        trusted=bool(trusted),
        max_call_duration_s=duration,
        downstream_kind=kind,
        room_bind_timeout_s=bind_s,
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
    tls_port: int | None = None
    tls_cert = tls_key = None
    if "tls_port" in table:
        tls_port = _get_port(table["tls_port"], "sip.tls_port", e)
        tls_cert = _get_str(table, "tls_cert", "sip", None, e)
        tls_key = _get_str(table, "tls_key", "sip", None, e)
        if tls_port is not None and tls_port != 0 and tls_port == port:
            e.add("sip.tls_port", f"must differ from sip.port ({port}); 5061 is usual")
    else:
        for key in ("tls_cert", "tls_key"):
            if key in table:
                e.add(f"sip.{key}", "set only with sip.tls_port (TLS is off without it)")
    rate = _get_number(table, "invite_rate_per_source", "sip", 100.0, 0, 1e6, e, unit="per second")
    burst = _get_number(
        table, "invite_burst_per_source", "sip", 200, 1, 1e6, e, whole=True, unit="requests"
    )
    retrans = _get_number(
        table, "max_retransmitting", "sip", 1000, 0, 1e6, e, whole=True, unit="transactions"
    )
    idle = _get_number(table, "tcp_idle_timeout_s", "sip", 120.0, 1, 86400, e)
    per_source = _get_number(
        table,
        "max_tcp_connections_per_source",
        "sip",
        32,
        1,
        1e5,
        e,
        whole=True,
        unit="connections",
    )
    total = _get_number(
        table, "max_tcp_connections", "sip", 1024, 1, 1e6, e, whole=True, unit="connections"
    )
    realm = _get_str(table, "auth_realm", "sip", "trunkline", e)
    if realm is not None and ('"' in realm or "\\" in realm or not realm.isprintable()):
        e.add("sip.auth_realm", f"must be printable without quotes or backslashes, got {realm!r}")
    ttl = _get_number(table, "auth_nonce_ttl_s", "sip", 60.0, 1, 3600, e)
    poll = _get_number(table, "livekit_poll_s", "sip", 1.0, 0.05, 60, e)
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
    if (
        len(e) > found
        or host is None
        or port is None
        or advertised is None
        or realm is None
        or rate is None
        or burst is None
        or retrans is None
        or idle is None
        or per_source is None
        or total is None
        or ttl is None
        or poll is None
    ):
        return None
    return SipConfig(
        host,
        port,
        bool(udp),
        bool(tcp),
        advertised,
        tuple(trunks),
        tls_port=tls_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        invite_rate_per_source=rate,
        invite_burst_per_source=int(burst),
        max_retransmitting=int(retrans),
        tcp_idle_timeout_s=idle,
        max_tcp_connections_per_source=int(per_source),
        max_tcp_connections=int(total),
        auth_realm=realm,
        auth_nonce_ttl_s=ttl,
        livekit_poll_s=poll,
    )


def parse_sip_config(table: Mapping[str, Any]) -> SipConfig:
    """Validate the ``[sip]`` table and build a SipConfig; raise SipConfigError
    listing every problem, one ``key: problem`` per line."""
    e = ErrorCollector()
    config = check_sip_config(table, e)
    e.raise_if_any(header=None, error=SipConfigError)
    assert config is not None  # no problem recorded
    return config
