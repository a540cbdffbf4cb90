"""What the operator commands share: where the server is, an HTTP client for
the REST API, exit codes and error printing.

Server and keys come from, in order: the flags `--url --api-key --api-secret`,
`TRUNKLINE_URL`, LiveKit's `LIVEKIT_URL`, `LIVEKIT_API_KEY` and
`LIVEKIT_API_SECRET`, and finally the dev defaults (`http://127.0.0.1:7880`,
devkey / secret). A `ws://` or `wss://` URL (as LiveKit tools use) is read as
`http://` / `https://`.

Exit codes, for scripts:

- 0 (`OK`): done;
- 1 (`FAILED`): the job ended badly, or what was named does not exist;
- 2 (`USAGE`): bad flags or configuration (argparse also exits 2);
- 3 (`UNREACHABLE`): cannot reach the server, or it refused our credentials.

Every error goes to stderr as one line naming the cause; when the server
answered, its JSON `message` and `code` are printed as it sent them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

OK = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3

DEFAULT_URL = "http://127.0.0.1:7880"
DEFAULT_KEY = "devkey"
DEFAULT_SECRET = "secret"
TIMEOUT_S = 10.0


class CliError(Exception):
    """A failure the command reports with one stderr line and `exit_code`."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass(frozen=True, slots=True)
class Target:
    """Where the server is and how to sign requests to it."""

    url: str
    api_key: str
    api_secret: str


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """Add `--url --api-key --api-secret --json` to a subcommand's parser."""
    g = parser.add_argument_group("server")
    g.add_argument(
        "--url",
        help=f"server URL (default: $TRUNKLINE_URL, $LIVEKIT_URL, {DEFAULT_URL})",
    )
    g.add_argument("--api-key", help="API key (default: $LIVEKIT_API_KEY, devkey)")
    g.add_argument("--api-secret", help="API secret (default: $LIVEKIT_API_SECRET, secret)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON (for scripts)")


def normalize_url(raw: str) -> str:
    """`raw` as an http(s) base URL without a trailing slash; `CliError`
    (USAGE) if it is not an http, https, ws or wss URL with a host."""
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise CliError(USAGE, f"server URL {raw!r} is not an http(s):// or ws(s):// URL")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def resolve_target(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Target:
    """The server and credentials for `args`, falling back on the environment
    and then the dev defaults (see the module docstring)."""
    env = os.environ if env is None else env
    url = args.url or env.get("TRUNKLINE_URL") or env.get("LIVEKIT_URL") or DEFAULT_URL
    key = args.api_key or env.get("LIVEKIT_API_KEY") or DEFAULT_KEY
    secret = args.api_secret or env.get("LIVEKIT_API_SECRET") or DEFAULT_SECRET
    return Target(normalize_url(url), key, secret)


def sign_admin_token(target: Target, ttl_s: int = 600) -> str:
    """A roomAdmin token for `target`'s key, valid `ttl_s` seconds."""
    return _sign(target, ttl_s, viewer=False)


def sign_viewer_token(target: Target, ttl_s: int = 600) -> str:
    """A read-only token (roomList, no roomAdmin) for `target`'s key, valid
    `ttl_s` seconds: it opens the dashboard and the REST reads, and cannot
    cancel, drain or dispatch."""
    return _sign(target, ttl_s, viewer=True)


def _sign(target: Target, ttl_s: int, *, viewer: bool) -> str:
    # Imported here: livekit-api (and PyJWT) are only needed once a request
    # is really made.
    from jwt.warnings import InsecureKeyLengthWarning

    from trunkline.auth import admin_token, viewer_token

    make = viewer_token if viewer else admin_token
    with warnings.catch_warnings():
        # LiveKit's dev secret is shorter than PyJWT likes: not the user's fault.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return make(target.api_key, target.api_secret, ttl_s=ttl_s)


class Client:
    """The REST API of one server. Use as `async with Client(target) as c`."""

    def __init__(self, target: Target, timeout_s: float = TIMEOUT_S) -> None:
        self.target = target
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self) -> dict[str, str]:
        token = sign_admin_token(self.target)
        return {"Authorization": f"Bearer {token}"}

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """The decoded JSON answer of a 2xx response. Anything else raises
        `CliError`: no connection or 401/403 → UNREACHABLE, 404 → FAILED,
        400 → USAGE, other statuses → FAILED, with the server's message."""
        assert self._session is not None, "use Client as an async context manager"
        url = self.target.url + path
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                params=params,
                headers=self._headers(),
                timeout=timeout or self._timeout,
            ) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise CliError(
                UNREACHABLE, f"cannot reach trunkline at {self.target.url}: {exc.os_error}"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise CliError(UNREACHABLE, f"request to {url} failed: {what}") from None
        try:
            data = json.loads(text) if text else None
        except json.JSONDecodeError:
            data = None
        if 200 <= status < 300:
            if data is None:
                raise CliError(FAILED, f"{url} answered {status} without a JSON body")
            return data
        raise _http_error(status, data, text, url)


def _http_error(status: int, data: Any, text: str, url: str) -> CliError:
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        message = data["message"]
        if isinstance(data.get("code"), str):
            message += f" ({data['code']})"
    else:
        snippet = " ".join(text.split())[:200]
        message = f"{url} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    if status in (401, 403):
        return CliError(UNREACHABLE, f"server refused the credentials: {message}")
    if status == 400:
        return CliError(USAGE, message)
    return CliError(FAILED, message)


def run(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Resolve the target from `args`, run `body` with a connected client and
    return its exit code; a `CliError` is printed to stderr and its code
    returned."""
    prog = f"trunkline {args.command}" if getattr(args, "command", None) else "trunkline"

    async def main() -> int:
        async with Client(resolve_target(args)) as client:
            return await body(client)

    try:
        return asyncio.run(main())
    except CliError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (the `--json` output)."""
    print(json.dumps(data, indent=2, sort_keys=False))


def console() -> Any:
    """A rich console for stdout (rich is imported only by table output)."""
    from rich.console import Console

    return Console(highlight=False)
