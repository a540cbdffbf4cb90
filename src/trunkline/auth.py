"""Access tokens, exactly as LiveKit issues and checks them.

Tokens are JWTs signed HS256 with an API secret; `iss` names the API key.
Several key pairs may be configured: the key is looked up from `iss` before
the signature is checked with `livekit.api.TokenVerifier`. Three kinds:

- a worker's (`video.agent`) for `/agent`;
- an admin's (`video.roomAdmin`, optionally scoped to one room) for every
  REST/Twirp call, reads and writes;
- a viewer's (`video.roomList` without `roomAdmin`) for the dashboard and the
  read-only REST endpoints (`require_reader`): it can watch, never cancel,
  drain or dispatch. `trunkline status --dashboard-url` mints this kind.

Every token that fails verification (not a JWT, unknown key, wrong secret,
expired, missing claims) gets the one message `INVALID_TOKEN`: a stranger
cannot tell a real key name from a made-up one. The precise reason is kept
as `AuthError.detail` for the server's log, which `RefusalLog` writes without
letting a flood of bad tokens flood the log too.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import secrets
import time
from collections.abc import Callable, Mapping

import jwt
from livekit import api
from livekit.api.access_token import Claims

INVALID_TOKEN = (
    "invalid token: it is malformed, has expired, or is not signed with an API key "
    "and secret this server accepts"
)

# The reason of the last refusal raised in this context (each aiohttp request
# runs in its own task, so: of this request). Read by the response hook that
# logs refusals, which only sees the response.
_REFUSAL: contextvars.ContextVar[str] = contextvars.ContextVar("trunkline_refusal", default="")


def refusal_reason() -> str:
    """Why the current request (asyncio task) was last refused ("" if it was not):
    the detail of the last `AuthError` created in this context."""
    return _REFUSAL.get()


class AuthError(Exception):
    """The request carries no valid token for what it asks; `code` is stable.

    `message` is what the client is told; `detail` (defaulting to `message`)
    is the precise reason, for the server's log only."""

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or message
        _REFUSAL.set(self.detail)

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
        refusals: RefusalLog | None = None,
    ) -> None:
        self._verifiers = {k: api.TokenVerifier(k, s) for k, s in keys.items()}
        # Checks a token of an unknown key, so that it costs the same HMAC as a
        # wrong secret: no timing difference tells a real key name either.
        self._decoy = api.TokenVerifier("-", secrets.token_hex(32))
        self._cache: dict[str, tuple[Claims, float]] = {}
        self._cache_size = cache_size
        self._clock = clock
        self.refusals = refusals if refusals is not None else RefusalLog()

    def set_keys(self, keys: Mapping[str, str]) -> None:
        """Serve these keys from now on (a config reload). Remembered tokens
        are forgotten, so one signed with a removed key stops working at once."""
        self._verifiers = {k: api.TokenVerifier(k, s) for k, s in keys.items()}
        self._cache.clear()

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
            raise _invalid("not a valid JWT") from None
        issuer = unverified.get("iss")
        verifier = self._verifiers.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            with contextlib.suppress(jwt.PyJWTError):
                self._decoy.verify(token)
            raise _invalid(f"unknown API key {_clip(repr(issuer))} in token 'iss'")
        try:
            claims = verifier.verify(token)
        except jwt.ExpiredSignatureError:
            raise _invalid(f"expired (key {issuer!r})") from None
        except jwt.PyJWTError as exc:
            raise _invalid(f"rejected for key {issuer!r}: {_clip(str(exc))}") from None
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
        """Claims of an admin token (`video.roomAdmin`) that may act on `room`."""
        claims = self.verify_header(header)
        video = claims.video
        if not video or not video.room_admin:
            raise AuthError("permission_denied", "token lacks the video.roomAdmin grant")
        self.check_room(claims, room)
        return claims

    def require_reader(
        self, header: str | None, room: str = "", *, all_rooms: bool = False
    ) -> Claims:
        """Claims of a token that may read: an admin token or a viewer token
        (`video.roomList`). Use it for endpoints that change nothing. A token
        scoped to a room may read only that room, and nothing that spans
        every room (`all_rooms`: workers, pools, the dashboard)."""
        return self.check_reader(self.verify_header(header), room, all_rooms=all_rooms)

    @classmethod
    def check_reader(cls, claims: Claims, room: str = "", *, all_rooms: bool = False) -> Claims:
        """`claims` if verified claims may read (see `require_reader`), else `AuthError`."""
        video = claims.video
        if not video or not (video.room_admin or video.room_list):
            raise AuthError(
                "permission_denied", "token lacks the video.roomAdmin or roomList grant"
            )
        if all_rooms and room_scope(claims):
            raise AuthError(
                "permission_denied",
                f"token is scoped to room {room_scope(claims)!r}; this view spans every room "
                "and needs a token without a room",
            )
        cls.check_room(claims, room)
        return claims

    @staticmethod
    def check_room(claims: Claims, room: str) -> None:
        """Raise `AuthError` unless admin `claims` may act on `room`: a token
        scoped to one room may act only there. Lets a handler check the token
        before reading the body and the room scope after, verifying once."""
        video = claims.video
        if room and video and video.room and video.room != room:
            raise AuthError("permission_denied", f"token is scoped to room {video.room!r}")


def _invalid(detail: str) -> AuthError:
    return AuthError("unauthenticated", INVALID_TOKEN, detail)


def _clip(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters: a reason read from a token goes into a
    log line and must not make it arbitrarily long."""
    return text if len(text) <= limit else text[:limit] + "..."


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


def viewer_token(api_key: str, api_secret: str, ttl_s: int = 600) -> str:
    """A read-only token (`video.roomList`, no `roomAdmin`) for the dashboard and
    the REST reads; it cannot cancel jobs, drain workers or dispatch."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_grants(api.VideoGrants(room_list=True))
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


class RefusalLog:
    """Refused requests in the log, at a rate a flood cannot raise.

    Every refusal is logged at DEBUG with its reason. At WARNING each source
    address gets at most one line per `interval_s`, carrying how many of its
    refusals were not logged since its previous line (`suppressed`); and at
    most `max_lines` WARNING lines are written per interval in all, so that
    an attack spread over many addresses is bounded too (what it drops is
    counted in the next line's `suppressed_elsewhere`). At most `max_sources`
    addresses are remembered; the longest-quiet one is forgotten first, its
    count going to `suppressed_elsewhere`. Cost: O(1) per refusal.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        interval_s: float = 60.0,
        max_lines: int = 20,
        max_sources: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger or logging.getLogger("trunkline.auth")
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_sources = max_sources
        self.clock = clock
        # source -> [when it may log again, refusals not logged since its last line]
        self._sources: dict[str, list[float]] = {}
        self._window_end = float("-inf")
        self._lines = 0
        self._elsewhere = 0

    def refused(self, source: str, status: int, path: str, reason: str = "") -> None:
        """Record that a request from `source` to `path` was refused with
        `status` (401 or 403) for `reason`; log it if its turn has come."""
        fields = {"remote": source, "status": status, "path": _clip(path), "reason": reason}
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("request refused", extra=fields)
        now = self.clock()
        if now >= self._window_end:
            self._window_end = now + self.interval_s
            self._lines = 0
        entry = self._sources.get(source)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return
        if self._lines >= self.max_lines:
            if entry is not None:
                entry[1] += 1
            else:
                self._elsewhere += 1
            return
        suppressed = int(entry[1]) if entry is not None else 0
        self._sources.pop(source, None)
        while len(self._sources) >= self.max_sources:
            oldest = next(iter(self._sources))
            self._elsewhere += int(self._sources.pop(oldest)[1])
        self._sources[source] = [now + self.interval_s, 0]  # newest last: eviction order
        self._lines += 1
        self.log.warning(
            "request refused",
            extra={**fields, "suppressed": suppressed, "suppressed_elsewhere": self._elsewhere},
        )
        self._elsewhere = 0
