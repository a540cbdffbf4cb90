"""Idempotency-Key: the bounded key map, and REST / Twirp retries in one process."""

from __future__ import annotations

import json

import pytest
from server.conftest import MakeServer
from server.helpers import Srv
from support import KEY, SECRET

from trunkline.auth import admin_token
from trunkline.runtime.idempotency import (
    DispatchSpec,
    IdempotencyKeys,
    IdempotencyMismatch,
    key_problem,
    scoped_key,
)

TWIRP = "/twirp/livekit.AgentDispatchService/CreateDispatch"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _keys(ttl_s: float = 10.0, max_keys: int = 3) -> tuple[IdempotencyKeys, _Clock]:
    clock = _Clock()
    return IdempotencyKeys(None, ttl_s=ttl_s, max_keys=max_keys, clock=clock), clock  # type: ignore[arg-type]


def test_map_binds_until_its_ttl() -> None:
    """A binding is found until its ttl has passed, then it is gone."""
    keys, clock = _keys(ttl_s=10.0)
    keys.bind("a", "AJ_1", "fp")
    clock.t = 9.9
    assert keys.get("a") == ("AJ_1", "fp")
    clock.t = 10.0
    assert keys.get("a") is None
    assert len(keys) == 0


def test_map_is_bounded_oldest_first() -> None:
    """Beyond max_keys the oldest binding goes first; expired ones go before that."""
    keys, clock = _keys(ttl_s=10.0, max_keys=3)
    for i in range(4):
        clock.t = float(i)
        keys.bind(f"k{i}", f"AJ_{i}", "fp")
    assert len(keys) == 3
    assert keys.get("k0") is None
    assert keys.get("k3") == ("AJ_3", "fp")
    clock.t = 12.5  # k1 (t=1) and k2 (t=2) expired: swept on the next bind
    keys.bind("k4", "AJ_4", "fp")
    assert len(keys) == 2
    assert keys.get("k3") == ("AJ_3", "fp")


def test_unbind_needs_the_bound_job() -> None:
    """unbind frees a key only for the job it is bound to."""
    keys, _ = _keys()
    keys.bind("a", "AJ_1", "fp")
    keys.unbind("a", "AJ_2")
    assert keys.get("a") == ("AJ_1", "fp")
    keys.unbind("a", "AJ_1")
    assert keys.get("a") is None


def test_scope_separates_tenants_and_hides_the_key() -> None:
    """The same key under another API key, identity or room scope is another binding."""
    base = scoped_key("key1", "", "", "k")
    assert base != scoped_key("key2", "", "", "k")
    assert base != scoped_key("key1", "alice", "", "k")
    assert base != scoped_key("key1", "", "room-1", "k")
    assert scoped_key("key1", "", "", "k") == base
    assert len(base) == 40  # a hash of it all: no caller text reaches the store
    assert set(base) <= set("0123456789abcdef")


def test_fingerprint_names_the_fields_that_differ() -> None:
    """A mismatch names exactly the fields that changed."""
    a = DispatchSpec("support", "r", "m", {"x": "1"}, None)
    b = DispatchSpec("support", "r", "m2", {"x": "2"}, None)
    assert a.fingerprint() == DispatchSpec("support", "r", "m", {"x": "1"}, None).fingerprint()
    from trunkline.runtime.idempotency import _differ

    assert _differ(a.fingerprint(), b.fingerprint()) == ["metadata", "attributes"]
    exc = IdempotencyMismatch("k", "AJ_1", ["metadata"])
    assert "metadata" in exc.message
    assert "AJ_1" in exc.message


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a\nb"])
def test_bad_keys_have_a_problem(key: str) -> None:
    """Empty, over 255 characters, non-ASCII or unprintable keys are refused."""
    assert key_problem(key) is not None
    assert key_problem("order-42:attempt") is None


async def _post(srv: Srv, body: dict[str, object], key: str, token: str = "") -> tuple[int, dict]:  # type: ignore[type-arg]
    headers = {**srv.auth, "Idempotency-Key": key}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with srv.session.post(srv.url + "/v1/dispatches", json=body, headers=headers) as r:
        got = await r.json()
        got["_replayed"] = r.headers.get("Idempotent-Replayed")
        return r.status, got


async def test_rest_retry_gets_the_same_job(srv: Srv) -> None:
    """Retries with the same key get the first job (its current state), never a second."""
    w = await srv.connect("ik", max_jobs=1)
    body = {"agent_name": "ik", "room": "r1", "metadata": "m"}
    status, first = await _post(srv, body, "order-1")
    assert status == 201, first
    assert first["_replayed"] is None
    offer = await w.next_offer()
    assert offer.id == first["job_id"]
    await w.accept(offer.id)
    await w.next_assignment()
    await w.running(offer.id)
    await srv.wait_state(offer.id, "running")
    status, again = await _post(srv, body, "order-1")
    assert status == 201, again
    assert again["_replayed"] == "true"
    assert again["job_id"] == first["job_id"]
    assert again["state"] == "running"
    await w.succeed(offer.id)
    await srv.wait_state(offer.id, "succeeded")
    status, ended = await _post(srv, body, "order-1")
    assert (status, ended["job_id"], ended["state"]) == (201, first["job_id"], "succeeded")
    assert srv.dispatcher.live_job_count() == 0
    status, other = await _post(srv, body, "order-2")  # a new key: a new job
    assert status == 201
    assert other["job_id"] != first["job_id"]
    assert (await w.next_offer()).id == other["job_id"]
    assert w.offers == [first["job_id"], other["job_id"]]  # each job offered once


async def test_rest_same_key_other_body_is_422_naming_fields(srv: Srv) -> None:
    """The key reused with another request is 422 idempotency_key_reused, naming the fields."""
    status, first = await _post(srv, {"agent_name": "ik", "room": "r1"}, "k1")
    assert status == 201, first
    status, err = await _post(srv, {"agent_name": "ik", "room": "r2"}, "k1")
    assert status == 422, err
    assert err["code"] == "idempotency_key_reused"
    assert "room" in err["message"]
    assert first["job_id"] in err["message"]
    status, err = await _post(srv, {"agent_name": "ik", "room": "r1", "wait": False}, "k1")
    assert status == 201
    assert err["job_id"] == first["job_id"]


async def test_rest_keys_are_scoped_per_api_key(make_server: MakeServer) -> None:
    """Another API key's request with the same key string gets its own job, not the first."""
    other_secret = SECRET[::-1]
    srv = await make_server({"keys": {KEY: SECRET, "tenant2": other_secret}})
    body = {"agent_name": "ik", "room": "r1"}
    status, mine = await _post(srv, body, "shared-key")
    assert status == 201
    token = admin_token("tenant2", other_secret)
    status, theirs = await _post(srv, body, "shared-key", token=token)
    assert status == 201, theirs
    assert theirs["job_id"] != mine["job_id"]
    assert theirs["_replayed"] is None


async def test_rest_bad_key_is_400(srv: Srv) -> None:
    """A malformed Idempotency-Key is 400 invalid_argument, and no job is made."""
    status, err = await _post(srv, {"agent_name": "ik"}, "x" * 300)
    assert status == 400
    assert err["code"] == "invalid_argument"
    assert "Idempotency-Key" in err["message"]
    assert srv.dispatcher.live_job_count() == 0


async def test_rest_queue_full_frees_the_key(make_server: MakeServer) -> None:
    """A keyed request refused queue_full binds nothing: the retry tries again."""
    srv = await make_server({"pools": {"ik": {"max_queued": 1}}})
    status, _ = await _post(srv, {"agent_name": "ik"}, "a")
    assert status == 201
    status, err = await _post(srv, {"agent_name": "ik"}, "b")
    assert status == 429
    assert err["code"] == "queue_full"
    w = await srv.connect("ik", max_jobs=2)
    await w.next_offer()  # the queue has room again
    status, ok = await _post(srv, {"agent_name": "ik"}, "b")
    assert status == 201, ok
    assert ok["_replayed"] is None


async def test_twirp_retry_gets_the_same_dispatch(srv: Srv) -> None:
    """CreateDispatch retried with the same Idempotency-Key answers the same dispatch."""
    headers = {**srv.auth, "Content-Type": "application/json", "Idempotency-Key": "tw-1"}
    body = json.dumps({"agentName": "tw", "room": "room-t", "metadata": "x"})
    s1, first = await srv.call("POST", TWIRP, data=body, headers=headers)
    s2, again = await srv.call("POST", TWIRP, data=body, headers=headers)
    assert (s1, s2) == (200, 200), (first, again)
    assert again["id"] == first["id"]
    assert again["state"]["jobs"][0]["id"] == first["state"]["jobs"][0]["id"]
    assert srv.dispatcher.live_job_count() == 1
    other = json.dumps({"agentName": "tw", "room": "room-u", "metadata": "x"})
    s3, err = await srv.call("POST", TWIRP, data=other, headers=headers)
    assert s3 == 409, err
    assert err["code"] == "already_exists"
    job_id = first["state"]["jobs"][0]["id"]
    srv.dispatcher.cancel(job_id, "test")
    await srv.wait_state(job_id, "cancelled")
    s4, ended = await srv.call("POST", TWIRP, data=body, headers=headers)
    assert s4 == 200, ended
    assert ended["state"]["jobs"][0]["id"] == job_id
    assert ended["state"]["jobs"][0]["state"]["status"] == "JS_FAILED"
