"""Who may start a call: the SIP edge's trust boundary for new requests, sans-IO.

Theory of operation: before a new INVITE gets a transaction, a ``100 Trying``
or a job, :meth:`AdmissionPolicy.admit` decides, in this order:

1. The source address must be admitted by at least one trunk (a trunk
   without ``allowed_addresses`` admits every address). Otherwise ``403``,
   before the called number is even looked at, so a stranger learns nothing
   about which numbers exist.
2. The called number must match a trunk (else ``404``), and the trunk's
   ``allowed_addresses`` must admit the source (else ``403``).
3. A trunk with ``auth_username`` requires digest credentials
   (:mod:`trunkline.sip.digest`): none, an unknown nonce or a stale one gets
   ``407`` with fresh challenges; wrong credentials get ``403``.

Every refusal here is a :class:`Refusal` the edge sends once, statelessly: no
transaction, no retransmission timer, no slot, so a refused stranger gets at
most one response per request it sends. The per-source token bucket
(:mod:`trunkline.sip.limits`) runs earlier still, on the raw bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from trunkline.sip.config import SipConfig, Trunk
from trunkline.sip.digest import AuthResult, DigestAuthenticator
from trunkline.sip.limits import IpAddress, RateLimiter, SourceAddresses
from trunkline.sip.message import SipRequest

__all__ = ["AdmissionPolicy", "Refusal"]

_MAX_CACHED = 4096


class Refusal(NamedTuple):
    """A stateless answer to a request the policy turned away."""

    status: int
    phrase: str
    why: str  # for the Reason header and the log
    extra: tuple[tuple[str, str], ...] = ()
    counter: str = "forbidden"  # EdgeStats field to count it in


class AdmissionPolicy:
    """ACLs, digest authentication and rate limits of one edge's trunks."""

    def __init__(self, config: SipConfig, random: Callable[[int], bytes]) -> None:
        self.addresses = SourceAddresses()
        self.digest = DigestAuthenticator(config.auth_realm, config.auth_nonce_ttl_s, random)
        self.limiter = RateLimiter(config.invite_rate_per_source, config.invite_burst_per_source)
        self.use(config)

    def use(self, config: SipConfig) -> None:
        """Decide by ``config``'s trunks from now on (a reload's new table).
        Outstanding digest nonces and the rate buckets are kept: realm, nonce
        lifetime and rates are listener settings, not the trunks'."""
        self.config = config
        self._listed = tuple(net for t in config.trunks for net in t.allowed_addresses)
        self._any_open_acl = any(not t.allowed_addresses for t in config.trunks)
        self._is_listed: dict[str, bool] = {}
        self._trunk_admits: dict[tuple[str, str], bool] = {}

    def listed(self, host: str) -> bool:
        """True if some trunk's ``allowed_addresses`` names ``host``."""
        try:
            return self._is_listed[host]
        except KeyError:
            pass
        addr = self.addresses.parse(host)
        found = addr is not None and any(addr in net for net in self._listed)
        if len(self._is_listed) >= _MAX_CACHED:
            self._is_listed.clear()
        self._is_listed[host] = found
        return found

    def rate_ok(self, host: str, now: float) -> bool:
        """Take a token for an out-of-dialog request from ``host`` (listed: free)."""
        if self.limiter.rate <= 0 or (self._listed and self.listed(host)):
            return True
        return self.limiter.allow(host, now)

    def _admits(self, trunk: Trunk, host: str) -> bool:
        if not trunk.allowed_addresses:
            return True
        key = (trunk.name, host)
        try:
            return self._trunk_admits[key]
        except KeyError:
            pass
        addr: IpAddress | None = self.addresses.parse(host)
        if len(self._trunk_admits) >= _MAX_CACHED:
            self._trunk_admits.clear()
        found = self._trunk_admits[key] = trunk.admits(addr)
        return found

    def reachable(self, host: str) -> bool:
        """True if some trunk admits requests from ``host``."""
        return self._any_open_acl or self.listed(host)

    def admit(
        self, request: SipRequest, host: str, user: str | None, now: float
    ) -> tuple[Trunk | None, Refusal | None]:
        """The trunk a new INVITE from ``host`` for ``user`` may use, or the refusal."""
        if not self.reachable(host):
            return None, Refusal(403, "Forbidden", "source address not allowed")
        trunk = self.config.match_trunk(user)
        if trunk is None:
            return None, Refusal(
                404, "Not Found", f"no trunk lists {user!r}", counter="unknown_number"
            )
        if not self._admits(trunk, host):
            return None, Refusal(403, "Forbidden", "source address not allowed")
        if trunk.auth_username is None or trunk.auth_password is None:
            return trunk, None
        result = self.digest.verify(
            request.headers.get_all("Proxy-Authorization"),
            request.method,
            trunk.auth_username,
            trunk.auth_password,
            trunk.auth_algorithms,
            now,
        )
        if result is AuthResult.OK:
            return trunk, None
        if result is AuthResult.BAD:
            return None, Refusal(403, "Forbidden", "digest credentials not accepted")
        stale = result is AuthResult.STALE
        challenges = self.digest.challenges(now, trunk.auth_algorithms, stale=stale)
        extra = tuple(("Proxy-Authenticate", c) for c in challenges)
        why = "nonce expired or already used" if stale else "digest credentials required"
        return None, Refusal(407, "Proxy Authentication Required", why, extra, "challenged")
