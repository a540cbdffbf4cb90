"""The verified-token cache in `trunkline.auth.Authenticator`."""

from __future__ import annotations

import datetime

import pytest
from livekit import api

from trunkline.auth import Authenticator, AuthError

KEY, SECRET = "devkey", "secret"


def token(ttl_s: int = 600, secret: str = SECRET) -> str:
    return (
        api.AccessToken(KEY, secret)
        .with_grants(api.VideoGrants(room_admin=True))
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .to_jwt()
    )


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def counting(authn: Authenticator) -> list[str]:
    """Record every full verification the authenticator performs."""
    calls: list[str] = []
    for key, verifier in list(authn._verifiers.items()):
        real = verifier.verify

        def verify(tok: str, *, _real=real, **kw: object) -> api.access_token.Claims:  # type: ignore[no-untyped-def]
            calls.append(tok)
            return _real(tok)

        verifier.verify = verify  # type: ignore[method-assign]
        authn._verifiers[key] = verifier
    return calls


def test_a_verified_token_is_not_checked_again_until_it_expires() -> None:
    """The same token is fully verified once, then served from the cache until its exp."""
    clock = Clock()
    authn = Authenticator({KEY: SECRET}, clock=clock)
    calls = counting(authn)
    tok = token(ttl_s=60)
    for _ in range(5):
        assert authn.require_admin(f"Bearer {tok}").video.room_admin
    assert len(calls) == 1
    clock.now += 61  # past exp by the cache's clock: the entry is dropped, a full check runs
    authn.require_admin(f"Bearer {tok}")  # (PyJWT checks exp by the wall clock: still valid)
    assert len(calls) == 2


def test_an_expired_token_is_refused() -> None:
    """A token past its exp is refused with a reason that says so."""
    authn = Authenticator({KEY: SECRET})
    with pytest.raises(AuthError, match="expired"):
        authn.verify(token(ttl_s=-120))


def test_a_rejected_token_is_never_cached() -> None:
    """A token with a wrong signature fails every time; nothing about it is remembered."""
    authn = Authenticator({KEY: SECRET})
    bad = token(secret="not-the-secret")
    for _ in range(3):
        with pytest.raises(AuthError):
            authn.verify(bad)
    assert authn._cache == {}


def test_grants_are_still_checked_for_a_cached_token() -> None:
    """Caching the claims does not skip the grant check: an admin token is no agent token."""
    authn = Authenticator({KEY: SECRET})
    tok = token()
    authn.require_admin(f"Bearer {tok}")
    with pytest.raises(AuthError, match=r"video\.agent"):
        authn.require_agent(f"Bearer {tok}")


def test_the_cache_is_bounded() -> None:
    """Past `cache_size` distinct tokens the oldest is forgotten."""
    authn = Authenticator({KEY: SECRET}, cache_size=3)
    tokens = [token(ttl_s=600 + i) for i in range(5)]
    for tok in tokens:
        authn.verify(tok)
    assert len(authn._cache) == 3
    assert list(authn._cache) == tokens[2:]
