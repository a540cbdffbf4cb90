"""Access tokens, exactly as LiveKit issues and checks them.

Tokens are JWTs signed HS256 with an API secret; `iss` names the API key.
Several key pairs may be configured: the key is looked up from `iss` before
the signature is checked with `livekit.api.TokenVerifier`. A worker needs the
`video.agent` grant; the REST/Twirp API needs `video.roomAdmin` (optionally
scoped to one room).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping

import jwt
from livekit import api
from livekit.api.access_token import Claims


class AuthError(Exception):
    """The request carries no valid token for what it asks; `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """401 when no valid identity was shown, 403 when it may not do this."""
        return 401 if self.code == "unauthenticated" else 403


class Authenticator:
    """Checks tokens against the configured keys.

    A token that verified is remembered (up to `cache_size` of them) until its
    own `exp`, keyed by the exact token string: API clients reuse one token for
    many requests, and a full check costs more than placing the job (it was
    30 % of the server's time in the dispatch benchmark). A remembered token
    is exactly as valid as it was when checked; nothing outlives its expiry.
    """

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifiers = {k: api.TokenVerifier(k, s) for k, s in keys.items()}
        self._cache: dict[str, tuple[Claims, float]] = {}
        self._cache_size = cache_size
        self._clock = clock

    def verify_header(self, header: str | None) -> Claims:
        """Claims of an `Authorization: Bearer <jwt>` header, or `AuthError`."""
        if not header:
            raise AuthError("unauthenticated", "missing Authorization header (Bearer token)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("unauthenticated", "Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Claims:
        cached = self._cache.get(token)
        if cached is not None:
            if self._clock() < cached[1]:
                return cached[0]
            del self._cache[token]
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("unauthenticated", "token is not a valid JWT") from None
        issuer = unverified.get("iss")
        verifier = self._verifiers.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            raise AuthError("unauthenticated", f"unknown API key {issuer!r} in token 'iss'")
        try:
            claims = verifier.verify(token)
        except jwt.ExpiredSignatureError:
            raise AuthError("unauthenticated", "token has expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError("unauthenticated", f"token rejected: {exc}") from None
        exp = unverified.get("exp")  # TokenVerifier requires it
        if isinstance(exp, int | float) and self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # oldest first
            self._cache[token] = (claims, float(exp))
        return claims

    def require_agent(self, header: str | None) -> Claims:
        claims = self.verify_header(header)
        if not claims.video or not claims.video.agent:
            raise AuthError("permission_denied", "token lacks the video.agent grant")
        return claims

    def require_admin(self, header: str | None, room: str = "") -> Claims:
        claims = self.verify_header(header)
        video = claims.video
        if not video or not video.room_admin:
            raise AuthError("permission_denied", "token lacks the video.roomAdmin grant")
        self.check_room(claims, room)
        return claims

    @staticmethod
    def check_room(claims: Claims, room: str) -> None:
        """Raise `AuthError` unless admin `claims` may act on `room`: a token
        scoped to one room may act only there. Lets a handler check the token
        before reading the body and the room scope after, verifying once."""
        video = claims.video
        if room and video and video.room and video.room != room:
            raise AuthError("permission_denied", f"token is scoped to room {video.room!r}")


def room_scope(claims: Claims) -> str:
    """The one room a token is limited to ("" for a token without a room)."""
    return claims.video.room or "" if claims.video else ""


def admin_token(api_key: str, api_secret: str, ttl_s: int = 600) -> str:
    """A short-lived token for the REST API (used by the CLI and tests)."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_grants(api.VideoGrants(room_admin=True, room_list=True))
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .to_jwt()
    )


def agent_token(api_key: str, api_secret: str) -> str:
    """A worker's token for `/agent`."""
    return api.AccessToken(api_key, api_secret).with_grants(api.VideoGrants(agent=True)).to_jwt()


def room_token(
    api_key: str,
    api_secret: str,
    room: str,
    identity: str,
    name: str = "",
    metadata: str = "",
    attributes: Mapping[str, str] | None = None,
) -> str:
    """The token a job's agent joins its room with (agent kind, join grant)."""
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room, agent=True))
        .with_ttl(datetime.timedelta(hours=6))
    )
    if name:
        token = token.with_name(name)
    if metadata:
        token = token.with_metadata(metadata)
    if attributes:
        token = token.with_attributes(dict(attributes))
    return token.to_jwt()
