"""`/agent`: handshake, and a misbehaving worker only ever hurts itself."""

from __future__ import annotations

import datetime
import logging

import aiohttp
import pytest
from livekit import api
from livekit.protocol import agent
from protoworker import ProtoWorker
from server.helpers import Srv
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.server import agent_ws


async def _upgrade_status(srv: Srv, headers: dict[str, str], query: str = "") -> int:
    """HTTP status of a websocket upgrade attempt that the server refuses."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await srv.session.ws_connect(srv.url + "/agent" + query, headers=headers)
    return err.value.status


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _agent_token(key: str, secret: str) -> str:
    return api.AccessToken(key, secret).with_grants(api.VideoGrants(agent=True)).to_jwt()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Basic dXNlcjpwdw=="}, id="not-bearer"),
        pytest.param(_bearer("not.a.jwt"), id="malformed"),
        pytest.param(_bearer(_agent_token(KEY, "wrong-secret")), id="wrong-secret"),
        pytest.param(_bearer(_agent_token("nokey", SECRET)), id="unknown-key"),
    ],
)
async def test_bad_token_gets_401_before_upgrade(srv: Srv, headers: dict[str, str]) -> None:
    """A missing, malformed, wrongly signed or unknown-key token is refused with 401."""
    assert await _upgrade_status(srv, headers) == 401
    assert srv.dispatcher.worker_count() == 0


async def test_expired_token_gets_401(srv: Srv) -> None:
    """An expired agent token is refused with 401 at the upgrade."""
    token = (
        api.AccessToken(KEY, SECRET)
        .with_grants(api.VideoGrants(agent=True))
        .with_ttl(datetime.timedelta(seconds=-60))
        .to_jwt()
    )
    assert await _upgrade_status(srv, _bearer(token)) == 401


async def test_token_without_agent_grant_gets_403(srv: Srv) -> None:
    """A valid token lacking `video.agent` (an admin token) is refused with 403."""
    assert await _upgrade_status(srv, _bearer(admin_token(KEY, SECRET))) == 403


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", ""])
async def test_bad_max_jobs_gets_400(srv: Srv, value: str) -> None:
    """`max_jobs` that is not an integer >= 1 is refused with 400 at the upgrade."""
    headers = _bearer(_agent_token(KEY, SECRET))
    assert await _upgrade_status(srv, headers, f"?max_jobs={value}") == 400


async def test_first_frame_is_register_with_worker_id(srv: Srv) -> None:
    """The first frame the server sends is `ServerMessage.register` with a worker id."""
    w = await srv.connect("a")
    first = w.received[0]
    assert first.WhichOneof("message") == "register"
    assert first.register.worker_id.startswith("AW_")
    assert first.register.server_info.version.startswith("trunkline-")
    assert srv.dispatcher.worker(w.worker_id) is not None


async def test_worker_ping_gets_pong(srv: Srv) -> None:
    """A `WorkerPing` is answered with a `WorkerPong` echoing its timestamp."""
    w = await srv.connect("a")
    await w.barrier()  # raises on timeout if no pong with our timestamp arrives


# ---------------------------------------------------------------- robustness


async def _bad_frame(w: ProtoWorker, kind: str) -> None:
    if kind == "text":
        await w.send_str("hello")
    elif kind == "garbage":
        await w.send_bytes(b"\xff\xff\xff\xff\x0f garbage")
    elif kind == "oversized":
        await w.send_bytes(b"\x00" * (agent_ws.MAX_FRAME_BYTES + 1))
    else:
        await w.register()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("text", "expected a binary protobuf frame"),
        ("garbage", "is not a WorkerMessage"),
        ("oversized", "websocket error"),
        ("second-register", "register sent twice"),
    ],
)
async def test_bad_frame_closes_only_that_worker(
    srv: Srv, caplog: pytest.LogCaptureFixture, kind: str, reason: str
) -> None:
    """A bad frame closes only that worker's connection, with a logged reason."""
    caplog.set_level(logging.INFO, logger="trunkline.agent")
    bad = await srv.connect("a")
    good = await srv.connect("a")
    await _bad_frame(bad, kind)
    code = await bad.wait_closed()
    assert code is not None
    assert code != aiohttp.WSCloseCode.OK
    await _gone(srv, bad.worker_id)
    closed = [r for r in caplog.records if r.getMessage() == "worker disconnected"]
    assert any(getattr(r, "worker_id", None) == bad.worker_id for r in closed)
    why = next(r.why for r in closed if getattr(r, "worker_id", "") == bad.worker_id)
    assert reason in why
    if kind == "oversized":
        # aiohttp enforces the size limit itself and closes with 1009, no text.
        assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    else:
        assert reason in bad.close_reason
    job = await srv.dispatch("a")
    offer = await good.next_offer()
    assert offer.id == job["job_id"]
    assert bad.pending("availability") == 0


async def _gone(srv: Srv, worker_id: str) -> None:
    await wait_until(
        lambda: srv.dispatcher.worker(worker_id) is None, 5, 0.01, f"{worker_id} dropped"
    )


async def test_worker_that_never_registers_is_dropped(
    srv: Srv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that never registers is closed after REGISTER_TIMEOUT_S."""
    caplog.set_level(logging.INFO, logger="trunkline.agent")
    monkeypatch.setattr(agent_ws, "REGISTER_TIMEOUT_S", 0.1)
    silent = srv.worker("a")
    await silent.open()
    code = await silent.wait_closed()
    assert code == aiohttp.WSCloseCode.UNSUPPORTED_DATA
    assert "no register message" in silent.close_reason
    assert any("no register message" in getattr(r, "reason", "") for r in caplog.records)
    assert srv.dispatcher.worker_count() == 0
    w = await srv.connect("a")
    await srv.dispatch("a")
    await w.next_offer()


async def test_first_message_must_be_register(srv: Srv) -> None:
    """A worker whose first message is not a register is closed."""
    w = srv.worker("a")
    await w.open()
    await w.status()
    await w.wait_closed()
    assert "first message must be WorkerMessage.register" in w.close_reason
    assert srv.dispatcher.worker_count() == 0


async def test_unknown_job_status_is_ignored(srv: Srv) -> None:
    """Status for a job the worker does not hold is ignored; the connection stays."""
    w = await srv.connect("a")
    await w.running("AJ_nope")
    await w.succeed("AJ_nope")
    await w.send(agent.WorkerMessage(update_job=agent.UpdateJobStatus(job_id="")))
    await w.barrier()
    assert not w.closed.is_set()
