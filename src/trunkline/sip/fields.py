"""Structured SIP header values the edge needs: Via, tags, URI users, Reason.

Theory of operation: the parser keeps header values as strings; these helpers
read the few structured parts that transaction matching and call routing depend
on, and build the values the edge writes. Every reader raises
:class:`~trunkline.sip.message.SipParseError` on a value it cannot read, so the
caller has one error type to catch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trunkline.sip.message import SipParseError

__all__ = [
    "MAGIC_COOKIE",
    "Via",
    "addr_spec",
    "header_tag",
    "quote",
    "uri_host_port",
    "uri_user",
    "with_tag",
]

MAGIC_COOKIE = "z9hG4bK"
_VIA = re.compile(r"SIP\s*/\s*2\.0\s*/\s*([A-Za-z]+)\s+([^;\s]+)\s*(.*)", re.DOTALL)
_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


@dataclass(slots=True)
class Via:
    """One Via value: ``SIP/2.0/<transport> <host>[:<port>];params``."""

    transport: str
    host: str
    port: int | None
    params: list[tuple[str, str | None]] = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> Via:
        """Parse a single Via value; raise SipParseError if malformed."""
        m = _VIA.fullmatch(value.strip())
        if m is None:
            raise SipParseError("malformed Via")
        transport, hostport, rest = m.groups()
        hp = _HOSTPORT.fullmatch(hostport)
        if hp is None:
            raise SipParseError("malformed Via sent-by")
        port = int(hp.group(2)) if hp.group(2) else None
        if port is not None and not 0 < port < 65536:
            raise SipParseError("malformed Via port")
        params: list[tuple[str, str | None]] = []
        for raw in rest.split(";"):
            raw = raw.strip()
            if not raw:
                continue
            name, eq, val = raw.partition("=")
            params.append((name.strip().lower(), val.strip() if eq else None))
        if rest.strip() and not rest.strip().startswith(";"):
            raise SipParseError("malformed Via parameters")
        return cls(transport.upper(), hp.group(1).lower(), port, params)

    def param(self, name: str) -> str | None:
        """The value of parameter ``name`` ('' for a flag parameter), or None if absent."""
        for n, v in self.params:
            if n == name:
                return "" if v is None else v
        return None

    def set_param(self, name: str, value: str | None) -> None:
        """Set (or add) a parameter."""
        for i, (n, _) in enumerate(self.params):
            if n == name:
                self.params[i] = (name, value)
                return
        self.params.append((name, value))

    @property
    def branch(self) -> str | None:
        """The branch parameter, or None."""
        return self.param("branch") or None

    @property
    def sent_by(self) -> str:
        """``host:port`` with the transport's default port filled in, for matching."""
        default = 5061 if self.transport == "TLS" else 5060
        return f"{self.host}:{self.port or default}"

    def response_address(self, source_host: str) -> tuple[str, int]:
        """Where responses go (RFC 3261 18.2.2 with RFC 3581 rport)."""
        host = self.param("received") or self.host
        rport = self.param("rport")
        if rport and rport.isdigit():
            return host or source_host, int(rport)
        return host or source_host, self.port or 5060

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        params = "".join(f";{n}" if v is None else f";{n}={v}" for n, v in self.params)
        return f"SIP/2.0/{self.transport} {self.host}{port}{params}"


def _params_part(value: str) -> str:
    """The header-parameter part of a name-addr or addr-spec value."""
    close = value.rfind(">")
    if close >= 0:
        return value[close + 1 :]
    semi = value.find(";")
    return value[semi:] if semi >= 0 else ""


def header_tag(value: str) -> str | None:
    """The ``tag`` parameter of a From/To value, or None."""
    for raw in _params_part(value).split(";"):
        name, eq, val = raw.strip().partition("=")
        if eq and name.strip().lower() == "tag":
            return val.strip() or None
    return None


def with_tag(value: str, tag: str) -> str:
    """A To value with ``tag`` added, unless it already has one."""
    if header_tag(value) is not None:
        return value
    return f"{value};tag={tag}"


def _addr_spec(value: str) -> str:
    start = value.find("<")
    if start >= 0:
        end = value.find(">", start)
        if end < 0:
            raise SipParseError("unterminated <URI>")
        return value[start + 1 : end].strip()
    # A bare URI: header parameters can only follow the host part, which the
    # callers cut at ';' themselves.
    return value.strip()


def addr_spec(value: str) -> str:
    """The URI of a name-addr (``"Bob" <sip:bob@h>;tag=x`` gives ``sip:bob@h``) or
    of a bare URI (header parameters cut off); raise SipParseError if unterminated."""
    uri = _addr_spec(value)
    if "<" not in value:
        uri = uri.split(";", 1)[0] if uri.lower().startswith(("sip:", "sips:")) else uri
    return uri


def uri_user(value: str) -> str | None:
    """The user part of a SIP/SIPS/tel URI or a name-addr holding one.

    ``sip:+15550100;npdi@gw.example;user=phone`` gives ``+15550100``;
    ``tel:+15550100`` gives ``+15550100``; a URI without a user gives None.
    """
    uri = _addr_spec(value)
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise SipParseError("URI without scheme")
    scheme = scheme.lower()
    if scheme == "tel":
        return rest.split(";", 1)[0] or None
    if scheme not in ("sip", "sips"):
        return None
    if "@" not in rest:
        return None
    userinfo = rest.rsplit("@", 1)[0]
    user = userinfo.split(":", 1)[0].split(";", 1)[0]
    return user or None


def uri_host_port(value: str) -> tuple[str, int | None]:
    """Host (lower case) and port of a SIP URI or a name-addr holding one."""
    uri = _addr_spec(value)
    _, _, rest = uri.partition(":")
    hostpart = rest.rsplit("@", 1)[-1].split(";", 1)[0].split("?", 1)[0]
    m = _HOSTPORT.fullmatch(hostpart)
    if m is None:
        raise SipParseError("malformed URI host")
    return m.group(1).lower(), int(m.group(2)) if m.group(2) else None


def quote(text: str) -> str:
    """A SIP quoted-string holding ``text`` (for Reason's text parameter)."""
    cleaned = "".join(ch for ch in text if ch.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'
