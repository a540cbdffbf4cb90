"""Per-source request limits for the SIP edge: token buckets and address parsing, sans-IO.

Theory of operation: every out-of-dialog request (INVITE, OPTIONS) from a
source costs one token from that source IP's bucket, which refills at
``rate`` tokens per second up to ``burst``. A source listed in some trunk's
``allowed_addresses`` is exempt: it is a carrier the operator named, and may
legitimately send more than any stranger. A request that finds the bucket
empty is dropped before it is parsed, so it costs no transaction, no timer
and no slot; once a second per source the edge answers one of them ``503``
with ``Retry-After`` (sent once) so a real PBX learns to back off or fail
over. Time is a parameter; the table of buckets is bounded (idle, refilled
buckets are forgotten first), so spoofed source addresses cannot grow it
without limit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["IpAddress", "RateLimiter", "SourceAddresses"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_CACHED = 4096


class SourceAddresses:
    """Parses source hosts into IP addresses, with a small cache (the same
    carrier sends thousands of requests from one address)."""

    def __init__(self) -> None:
        self._cache: dict[str, IpAddress | None] = {}

    def parse(self, host: str) -> IpAddress | None:
        """The IP address of ``host`` (IPv4-mapped IPv6 unwrapped), or None."""
        try:
            return self._cache[host]
        except KeyError:
            pass
        addr: IpAddress | None
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            addr = None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[host] = addr
        return addr


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    notice_at: float = float("-inf")


class RateLimiter:
    """One token bucket per source host. ``rate`` 0 disables the limit."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        exempt: Iterable[IpAddress] = (),
        max_sources: int = 65536,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.limited = 0  # requests refused so far
        self._exempt = frozenset(exempt)
        self._max = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def exempt(self, address: IpAddress | None) -> bool:
        """True if ``address`` is never limited (listed by a trunk)."""
        return address is not None and address in self._exempt

    def allow(self, host: str, now: float) -> bool:
        """Take one token for ``host`` at ``now``; False if it has none left."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._evict(now)
            bucket = self._buckets[host] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        self.limited += 1
        return False

    def take_notice(self, host: str, now: float) -> bool:
        """True at most once a second per limited ``host``: answer this one."""
        bucket = self._buckets.get(host)
        if bucket is None or now < bucket.notice_at + 1.0:
            return False
        bucket.notice_at = now
        return True

    def retry_after_s(self) -> int:
        """Whole seconds until a drained bucket holds a burst's worth again."""
        return max(1, round(self.burst / self.rate)) if self.rate > 0 else 1

    def _evict(self, now: float) -> None:
        # Buckets that have refilled are indistinguishable from new ones.
        refill = self.burst / self.rate
        self._buckets = {h: b for h, b in self._buckets.items() if now - b.at < refill}
        if len(self._buckets) >= self._max:
            # Still full: a flood from as many addresses. Keep the newest half.
            keep = list(self._buckets.items())[self._max // 2 :]
            self._buckets = dict(keep)
