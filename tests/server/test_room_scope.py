"""A roomAdmin token scoped to one room sees and acts on that room only."""

from __future__ import annotations

from livekit import api
from server.helpers import Srv
from support import KEY, SECRET


def scoped(room: str) -> dict[str, str]:
    tok = api.AccessToken(KEY, SECRET).with_grants(api.VideoGrants(room_admin=True, room=room))
    return {"Authorization": f"Bearer {tok.to_jwt()}"}


async def _two_rooms(srv: Srv) -> tuple[str, str]:
    a = (await srv.dispatch("sc", room="room-a", max_wait_s=30))["job_id"]
    b = (await srv.dispatch("sc", room="room-b", max_wait_s=30))["job_id"]
    return a, b


async def test_scoped_token_lists_only_its_room(srv: Srv) -> None:
    """GET /v1/jobs with a token scoped to room-a lists room-a's jobs, not room-b's."""
    a, _ = await _two_rooms(srv)
    status, body = await srv.call("GET", "/v1/jobs", headers=scoped("room-a"))
    assert status == 200
    assert [j["job_id"] for j in body["jobs"]] == [a]


async def test_scoped_token_cannot_read_or_delete_another_rooms_job(srv: Srv) -> None:
    """Another room's job is 404 to a scoped token (it learns nothing), its own is 200."""
    a, b = await _two_rooms(srv)
    assert (await srv.call("GET", f"/v1/jobs/{b}", headers=scoped("room-a")))[0] == 404
    assert (await srv.call("DELETE", f"/v1/jobs/{b}", headers=scoped("room-a")))[0] == 404
    assert (await srv.call("GET", f"/v1/jobs/{a}", headers=scoped("room-a")))[0] == 200
    assert (await srv.job(b))["state"] == "queued"  # untouched


async def test_scoped_token_cannot_see_workers_or_pools(srv: Srv) -> None:
    """Workers, pools and drain span every room: 403 for a scoped token, with the reason."""
    for method, path in (("GET", "/v1/workers"), ("GET", "/v1/pools")):
        status, body = await srv.call(method, path, headers=scoped("room-a"))
        assert status == 403
        assert body["code"] == "permission_denied"
        assert "scoped to room 'room-a'" in body["message"]


async def test_twirp_list_with_a_scoped_token_and_no_room_lists_its_room(srv: Srv) -> None:
    """ListDispatch without a room, from a token scoped to room-a, lists room-a only."""
    await _two_rooms(srv)
    status, body = await srv.call(
        "POST",
        "/twirp/livekit.AgentDispatchService/ListDispatch",
        data=b"{}",
        headers={**scoped("room-a"), "Content-Type": "application/json"},
    )
    assert status == 200
    rooms = {d["room"] for d in body.get("agentDispatches", [])}
    assert rooms == {"room-a"}


async def test_dashboard_refuses_a_scoped_token(srv: Srv) -> None:
    """The dashboard shows every room, so a room-scoped token is refused (403)."""
    status, _ = await srv.call("GET", "/", headers=scoped("room-a"))
    assert status == 403
