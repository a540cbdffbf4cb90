"""What every HTTP response carries (security headers, no caching of API answers)
and when the dashboard cookie is Secure: over TLS, or behind a configured TLS proxy."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from server.helpers import Srv
from support import KEY, SECRET

from trunkline.auth import admin_token, viewer_token
from trunkline.config import ConfigError, parse_config
from trunkline.server.app import build_app

MakeSrv = Callable[..., Awaitable[Srv]]


@pytest.fixture
async def make_srv() -> AsyncIterator[MakeSrv]:
    """`await make_srv({toml-as-dict}, ssl=ctx)`: an in-process server with the test key."""
    started: list[Srv] = []

    async def make(config: dict[str, Any] | None = None, **start: Any) -> Srv:
        ts = TestServer(build_app(parse_config({"keys": {KEY: SECRET}, **(config or {})})))
        await ts.start_server(**start)
        srv = Srv(ts)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.close()


def assert_secure_headers(path: str, headers: Any) -> None:
    assert headers.get("X-Content-Type-Options") == "nosniff", path
    assert headers.get("X-Frame-Options") == "DENY", path
    assert headers.get("Referrer-Policy") == "no-referrer", path
    assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), path


async def test_every_response_carries_the_security_headers(make_srv: MakeSrv) -> None:
    """nosniff, DENY framing, no referrer and a CSP on every kind of response:
    API 200/401/404, Twirp, /agent refusals, metrics, health, the dashboard page,
    its denied page, static files and the event stream; API answers are no-store."""
    srv = await make_srv()
    admin = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", "/v1/pools", admin, 200),
        ("GET", "/v1/pools", {}, 401),
        ("GET", "/v1/jobs/AJ_none", admin, 404),
        ("GET", "/no/such/route", {}, 404),
        ("POST", "/twirp/livekit.AgentDispatchService/ListDispatch", {}, 401),
        ("GET", "/agent", {"Authorization": "Bearer nope"}, 401),
        ("GET", "/metrics", {}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/", admin, 200),
        ("GET", "/", {}, 401),
        ("GET", "/dashboard/static/dashboard.js", {}, 200),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, hdrs, status in cases:
            async with s.request(method, srv.url + path, headers=hdrs) as r:
                assert r.status == status, (path, r.status)
                assert_secure_headers(path, r.headers)
                if not path.startswith("/dashboard/static/"):
                    assert r.headers.get("Cache-Control") == "no-store", path
        async with s.get(srv.url + "/dashboard/stream", headers=admin) as r:
            assert r.status == 200
            assert_secure_headers("/dashboard/stream", r.headers)
            assert r.headers["Cache-Control"] == "no-store"
        async with s.get(srv.url + "/") as r:
            assert "style=" not in await r.text()  # the denied page obeys the CSP too


async def test_the_dashboard_page_keeps_its_own_policy(make_srv: MakeSrv) -> None:
    """The page's CSP allows its own script, style and feed and nothing inline."""
    srv = await make_srv()
    hdrs = {"Authorization": f"Bearer {viewer_token(KEY, SECRET)}"}
    async with aiohttp.ClientSession() as s, s.get(srv.url + "/", headers=hdrs) as r:
        assert r.status == 200
        csp = r.headers["Content-Security-Policy"]
        for part in ("default-src 'none'", "script-src 'self'", "style-src 'self'"):
            assert part in csp
        assert "unsafe-inline" not in csp


async def cookie_of(url: str, ssl_ctx: ssl.SSLContext | bool = True, **hdrs: str) -> str:
    token = viewer_token(KEY, SECRET)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/?token={token}", allow_redirects=False, ssl=ssl_ctx, headers=hdrs) as r,
    ):
        assert r.status == 303
        assert r.headers["Cache-Control"] == "no-store"
        cookie: str = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        return cookie


async def test_the_cookie_is_not_secure_over_plain_http_by_default(make_srv: MakeSrv) -> None:
    """Plain HTTP without a proxy setting: no Secure flag (the browser would never
    send the cookie back), and X-Forwarded-Proto from the client is not believed."""
    srv = await make_srv()
    assert "Secure" not in await cookie_of(srv.url)
    assert "Secure" not in await cookie_of(srv.url, **{"X-Forwarded-Proto": "https"})


async def test_the_cookie_is_secure_behind_a_tls_proxy(make_srv: MakeSrv) -> None:
    """`[server] behind_tls_proxy = true`: the cookie is Secure although this hop
    is plain HTTP."""
    srv = await make_srv({"server": {"behind_tls_proxy": True}})
    assert "Secure" in await cookie_of(srv.url)


def test_behind_tls_proxy_must_be_a_bool() -> None:
    """A string where a bool belongs is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"server\.behind_tls_proxy: must be true or false"):
        parse_config({"server": {"behind_tls_proxy": "yes"}})
    assert parse_config({}).server.behind_tls_proxy is False


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, ~50 ms)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    args += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_the_cookie_is_secure_over_tls(
    make_srv: MakeSrv, tls_files: tuple[Path, Path]
) -> None:
    """Served over a real TLS listener, the cookie is Secure."""
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = await make_srv(ssl=server_ctx)
    assert srv.url.startswith("https://")
    client_ctx = ssl.create_default_context(cafile=str(cert))
    assert "Secure" in await cookie_of(srv.url, client_ctx)
