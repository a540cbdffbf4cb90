"""Digest authentication of inbound INVITEs (RFC 3261 section 22, RFC 7616, RFC 8760), sans-IO.

Theory of operation: the edge challenges an INVITE for a trunk with
``auth_username`` the way LiveKit SIP's inbound trunks do, as a proxy:
``407 Proxy Authentication Required`` with one ``Proxy-Authenticate`` per
algorithm the trunk allows (``SHA-256`` before ``MD5`` unless configured
otherwise, RFC 8760 section 2.4), each with ``qop="auth"``. The caller sends the
INVITE again with ``Proxy-Authorization``.

Nonces cost nothing to hand out: a nonce is the issue time, random bytes from
the injected source and an HMAC over both with a per-edge secret, so a
challenge flood stores nothing and only this edge's fresh nonces verify.
State is kept only for nonces that were answered with the right password:
with ``qop=auth`` the nonce-count must grow with every use, without qop the
nonce works once. A nonce older than ``ttl_s``, or a count already seen, with
otherwise correct credentials is ``STALE`` (the edge re-challenges with
``stale=true`` so the caller retries without asking its user); an unknown or
forged nonce gets a fresh challenge; a wrong username, realm, algorithm or
response is ``BAD`` (``403``). Time is a parameter.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trunkline.sip.message import SipParseError

__all__ = [
    "AuthResult",
    "Credentials",
    "DigestAuthenticator",
    "digest_response",
    "parse_credentials",
]

_HASHES: dict[str, Callable[[str], str]] = {
    "MD5": lambda text: hashlib.md5(text.encode(), usedforsecurity=False).hexdigest(),
    "SHA-256": lambda text: hashlib.sha256(text.encode()).hexdigest(),
}
_MAX_TRACKED = 65536


class AuthResult(enum.Enum):
    """What :meth:`DigestAuthenticator.verify` found."""

    OK = "credentials valid for a fresh nonce"
    MISSING = "no credentials for this realm: challenge"
    UNKNOWN_NONCE = "nonce not issued by this edge: challenge again"
    STALE = "right password, but the nonce expired or was used already: challenge, stale=true"
    BAD = "wrong username, realm, algorithm or response: refuse"


@dataclass(frozen=True, slots=True)
class Credentials:
    """The parameters of one ``Digest`` credentials value."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None


def _split_params(text: str) -> dict[str, str]:
    """``a=b, c="d, e"`` into a dict (names lower case, quotes removed)."""
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,\t":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            if text[i:].strip():
                raise SipParseError("malformed digest parameter")
            break
        name = text[i:eq].strip().lower()
        if not name or name in params:
            raise SipParseError("malformed digest parameter")
        i = eq + 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            value: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            if i >= n:
                raise SipParseError("unterminated quoted digest parameter")
            i += 1
            params[name] = "".join(value)
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            params[name] = text[i:end].strip()
            i = end
    return params


def parse_credentials(value: str) -> Credentials:
    """Parse ``Digest username=..., ...``; raise SipParseError if it is not one."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise SipParseError(f"unsupported authentication scheme {scheme[:20]!r}")
    p = _split_params(rest)
    try:
        return Credentials(
            username=p["username"],
            realm=p["realm"],
            nonce=p["nonce"],
            uri=p["uri"],
            response=p["response"].lower(),
            algorithm=p.get("algorithm", "MD5").upper(),
            qop=p.get("qop"),
            nc=p.get("nc"),
            cnonce=p.get("cnonce"),
        )
    except KeyError as exc:
        raise SipParseError(f"digest credentials without {exc.args[0]}") from None


def digest_response(
    creds: Credentials, method: str, password: str, *, username: str | None = None
) -> str | None:
    """The response a client knowing ``password`` sends for ``creds``; None if the
    algorithm or qop is not supported (RFC 7616 section 3.4.1)."""
    hx = _HASHES.get(creds.algorithm)
    if hx is None or creds.qop not in (None, "auth"):
        return None
    ha1 = hx(f"{username or creds.username}:{creds.realm}:{password}")
    ha2 = hx(f"{method}:{creds.uri}")
    if creds.qop == "auth":
        return hx(f"{ha1}:{creds.nonce}:{creds.nc}:{creds.cnonce}:auth:{ha2}")
    return hx(f"{ha1}:{creds.nonce}:{ha2}")


class DigestAuthenticator:
    """Issues and checks nonces for one edge. Not thread-safe."""

    def __init__(self, realm: str, ttl_s: float, random: Callable[[int], bytes]) -> None:
        self.realm = realm
        self.ttl_s = ttl_s
        self._random = random
        self._secret = random(32)
        # nonce -> (highest nonce-count used, -1 for a used qop-less nonce; issued at)
        self._used: dict[str, tuple[int, float]] = {}
        # Nonces issued at or before this time count as used (see _remember).
        self._floor = float("-inf")

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()[:24]

    def nonce(self, now: float) -> str:
        """A new nonce, valid for ``ttl_s`` from ``now``."""
        body = f"{max(0, round(now * 1000)):x}.{self._random(9).hex()}"
        return f"{body}.{self._mac(body)}"

    def challenges(
        self, now: float, algorithms: Sequence[str], *, stale: bool = False
    ) -> list[str]:
        """``Proxy-Authenticate`` values, one per algorithm, most preferred first."""
        nonce = self.nonce(now)
        tail = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{tail}'
            for alg in algorithms
        ]

    def _issued_at(self, nonce: str) -> float | None:
        body, _, mac = nonce.rpartition(".")
        stamp, _, _ = body.partition(".")
        if not body or not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            return int(stamp, 16) / 1000
        except ValueError:
            return None

    def verify(
        self,
        values: Sequence[str],
        method: str,
        username: str,
        password: str,
        algorithms: Sequence[str],
        now: float,
    ) -> AuthResult:
        """Check the ``Proxy-Authorization`` values of a request against one trunk's
        credentials; a valid answer uses its nonce up (see the module docstring)."""
        creds: Credentials | None = None
        for value in values:
            try:
                c = parse_credentials(value)
            except SipParseError:
                continue
            if c.realm == self.realm:
                creds = c
                break
        if creds is None:
            return AuthResult.MISSING
        issued = self._issued_at(creds.nonce)
        if issued is None:
            return AuthResult.UNKNOWN_NONCE
        if creds.algorithm not in algorithms:
            return AuthResult.BAD
        expected = digest_response(creds, method, password, username=username)
        if (
            expected is None
            or not hmac.compare_digest(creds.username.encode(), username.encode())
            or not hmac.compare_digest(expected, creds.response)
        ):
            return AuthResult.BAD
        if now - issued > self.ttl_s:
            return AuthResult.STALE
        if creds.qop == "auth":
            try:
                count = int(creds.nc or "", 16)
            except ValueError:
                return AuthResult.BAD
        else:
            count = -1
        seen = self._used.get(creds.nonce)
        if seen is None and issued <= self._floor:
            return AuthResult.STALE
        if seen is not None and (count == -1 or seen[0] == -1 or count <= seen[0]):
            return AuthResult.STALE  # a replay (or a client reusing a one-time nonce)
        self._remember(creds.nonce, count, issued, now)
        return AuthResult.OK

    def _remember(self, nonce: str, count: int, issued: float, now: float) -> None:
        if len(self._used) >= _MAX_TRACKED:
            self._used = {k: v for k, v in self._used.items() if now - v[1] <= self.ttl_s}
            if len(self._used) >= _MAX_TRACKED:
                # Only callers with the password get here, and each entry lives
                # ttl_s at most; still bounded: forget the older half, and treat
                # every nonce issued until then as used, so none can be replayed.
                times = sorted(v[1] for v in self._used.values())
                self._floor = times[len(times) // 2]
                self._used = {k: v for k, v in self._used.items() if v[1] > self._floor}
        self._used[nonce] = (count, issued)

    def __len__(self) -> int:
        return len(self._used)
