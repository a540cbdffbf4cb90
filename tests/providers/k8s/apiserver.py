"""A fake Kubernetes API server on loopback (aiohttp), for the provider's tests.

It serves the part of the core/v1 and apps/v1 API that trunkline's provider
and `kubectl` use, keeping the conventions clients rely on:

- opaque resource versions (see store.py); `PUT` with a stale
  `metadata.resourceVersion`, and `DELETE` with failed preconditions, answer
  409 Conflict; a create under a taken name answers 409 AlreadyExists;
- invalid objects answer 422 Invalid with the causes (rules.py);
- graceful deletion: `gracePeriodSeconds` from the query or the
  DeleteOptions body (kubectl sends the body, lightkube the query), default
  the pod's `terminationGracePeriodSeconds`; a bound pod gets
  `deletionTimestamp` and stays until its kubelet confirms the containers
  are gone; a second delete can shorten the grace, never lengthen it; an
  unbound or finished pod goes at once;
- list with `labelSelector`, `fieldSelector`, `limit`/`continue` (pages of
  one consistent snapshot); watch with bookmarks, `timeoutSeconds`, and an
  expired resource version answered 410 either as an HTTP status or as an
  ERROR event inside a 200 stream (`expired_as_event`); a watch without a
  version starts with synthetic ADDED events for what exists;
- faults: `inject(status, count, ...)` answers the next matching requests
  with 429 (with Retry-After) or 500; `drop_watches()` cuts every open
  stream; `outage()` closes the listening socket (connection refused) until
  `restore()`.

Tests drive it through real clients only (kubernetes-asyncio, kubectl); only
fault injection and the kubelet's process controls are called directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from providers.k8s.rules import (
    field_selector,
    json_patch,
    label_selector,
    merge_patch,
    pod_update_causes,
    validate_metadata,
    validate_pod,
)
from providers.k8s.store import Event, Expired, Obj, Store, now_rfc3339

_RESOURCES = {
    ("", "v1", "pods"): ("Pod", True),
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("apps", "v1", "deployments"): ("Deployment", True),
}
_BODY = web.RequestKey("body", object)
_TRUE = ("1", "t", "T", "true", "TRUE", "True")  # Go's strconv.ParseBool
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclasses.dataclass
class Fault:
    """Answer the next `count` requests that match with `status`."""

    status: int
    count: int = 1
    method: str | None = None  # "POST", "DELETE", ... (None: any)
    path: str = ""  # a regex searched in the path
    watch: bool | None = None  # only watches (True), never watches (False)
    retry_after: int | None = None
    after: bool = False  # carry the request out, then answer with the fault (a lost answer)


@dataclasses.dataclass
class Request:
    """One request as the fake saw it (for tests to check what clients send)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    content_type: str
    status: int = 0
    at: float = dataclasses.field(default_factory=time.time)  # wall clock, when it arrived


def status_body(code: int, reason: str, message: str, **details: Any) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.body = status_body(code, reason, message, **details)
        self.code = code


class _Watch:
    def __init__(self, resp: web.StreamResponse, request: web.Request) -> None:
        self.resp = resp
        self.request = request
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()
        self.dropped = False


class FakeApiServer:
    """See the module docstring. `async with FakeApiServer() as api:`; `api.url`."""

    def __init__(self, *, bookmark_interval_s: float = 1.0, token: str = "fake-token") -> None:
        self.store = Store()
        self.namespaces = {"default"}
        self.bookmark_interval_s = bookmark_interval_s
        self.token = token
        self.expired_as_event = False
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.record_requests = True
        self.kubelet: Any = None  # set by the kubelet that attaches itself
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        self.down = False
        for ns in self.namespaces:
            self.store.create("namespaces", "", {"metadata": {"name": ns}})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- life

    async def __aenter__(self) -> FakeApiServer:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._route)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def outage(self) -> None:
        """Stop answering: the port is closed and every open stream cut."""
        self.down = True
        self.drop_watches()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # Closing the listening socket leaves kept-alive connections open: an
        # unreachable server answers on none of them.
        server = self._runner.server if self._runner is not None else None
        for proto in list(server.connections if server is not None else ()):
            if proto.transport is not None:
                proto.transport.abort()

    async def restore(self) -> None:
        """Listen again on the same port."""
        self.down = False
        if self._site is None:
            await self._listen()

    @contextlib.asynccontextmanager
    async def unreachable(self) -> AsyncIterator[None]:
        await self.outage()
        try:
            yield
        finally:
            await self.restore()

    def inject(self, status: int, count: int = 1, **match: Any) -> Fault:
        f = Fault(status, count, **match)
        self.faults.append(f)
        return f

    def drop_watches(self) -> int:
        """Cut every open watch stream mid-way (the client sees a broken stream)."""
        n = 0
        for w in list(self._watches):
            w.dropped = True
            w.queue.put_nowait(None)
            transport = w.request.transport
            if transport is not None:
                transport.abort()
            n += 1
        return n

    def compact(self) -> None:
        """Forget the change history: watches from older versions get 410."""
        self.store.compact()
        self._snapshots.clear()

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def pods(self, ns: str = "default") -> list[Obj]:
        return self.store.items("pods", ns)

    def deletes(self) -> list[Request]:
        return [r for r in self.requests if r.method == "DELETE" and "/pods/" in r.path]

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return _json(
                    status_body(400, "BadRequest", "the request body is not JSON"), status=400
                )
        rec = Request(request.method, request.path, dict(request.query), body, request.content_type)
        if self.record_requests:
            self.requests.append(rec)
        auth = request.headers.get("Authorization", "")
        if self.token and auth != f"Bearer {self.token}":
            rec.status = 401
            return _json(status_body(401, "Unauthorized", "Unauthorized"), status=401)
        is_watch = request.query.get("watch") in _TRUE
        for f in self.faults:
            if f.count <= 0:
                continue
            if f.method and f.method != request.method:
                continue
            if f.path and not re.search(f.path, request.path):
                continue
            if f.watch is not None and f.watch != is_watch:
                continue
            f.count -= 1
            rec.status = f.status
            if f.after:
                request[_BODY] = copy.deepcopy(body)
                with contextlib.suppress(ApiError):
                    await handler(request)
            reason = {
                409: "Conflict",
                429: "TooManyRequests",
                500: "InternalError",
                503: "ServiceUnavailable",
            }
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
            return _json(
                status_body(f.status, reason.get(f.status, "InternalError"), "injected fault"),
                status=f.status,
                headers=headers,
            )
        request[_BODY] = body
        try:
            resp: web.StreamResponse = await handler(request)
        except ApiError as exc:
            rec.status = exc.code
            return _json(exc.body, status=exc.code)
        rec.status = resp.status
        return resp

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path in ("/version", "/version/"):
            return _json({"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake"})
        if path == "/api":
            return _json({"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            return _json(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": "apps",
                            "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                            "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
                        }
                    ],
                }
            )
        m = re.match(r"^/(?:api/(v1)|apis/(apps)/(v1))(/.*)?$", path)
        if not m:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        group = m.group(2) or ""
        version = m.group(1) or m.group(3)
        rest = (m.group(4) or "").strip("/").split("/") if m.group(4) else []
        if not rest:
            return self._discovery(group, version)
        ns = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        resource = rest[0]
        if (group, version, resource) not in _RESOURCES:
            raise ApiError(404, "NotFound", f"the server could not find the resource {resource}")
        name = rest[1] if len(rest) > 1 else ""
        if len(rest) > 2:
            raise ApiError(404, "NotFound", f"no subresource {rest[2]} here")
        if ns and ns not in self.namespaces and request.method == "POST":
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', kind="namespaces")
        m_ = request.method
        if m_ == "GET" and not name:
            if request.query.get("watch") in _TRUE:
                return await self._watch(request, group, version, resource, ns)
            return self._list(request, group, version, resource, ns)
        if m_ == "GET":
            return _json(self._get(resource, ns, name))
        if m_ == "POST" and not name:
            return self._create(request, group, version, resource, ns)
        if m_ == "DELETE" and name:
            return self._delete(request, resource, ns, name)
        if m_ == "PUT" and name:
            return self._replace(request, resource, ns, name)
        if m_ == "PATCH" and name:
            return self._patch(request, resource, ns, name)
        raise ApiError(405, "MethodNotAllowed", f"{m_} is not supported here")

    def _discovery(self, group: str, version: str) -> web.Response:
        gv = f"{group}/{version}" if group else version
        resources = [
            {
                "name": r,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": _VERBS,
                **({"shortNames": ["po"]} if r == "pods" else {}),
            }
            for (g, v, r), (kind, namespaced) in _RESOURCES.items()
            if (g, v) == (group, version)
        ]
        return _json({"kind": "APIResourceList", "groupVersion": gv, "resources": resources})

    # ----------------------------------------------------------------- CRUD

    def _get(self, resource: str, ns: str, name: str) -> Obj:
        obj = self.store.get(resource, ns, name)
        if obj is None:
            raise ApiError(
                404, "NotFound", f'{resource} "{name}" not found', name=name, kind=resource
            )
        return obj

    def _create(
        self, request: web.Request, group: str, version: str, resource: str, ns: str
    ) -> web.Response:
        body = request[_BODY]
        kind, _ = _RESOURCES[(group, version, resource)]
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        if body.get("kind", kind) != kind:
            raise ApiError(400, "BadRequest", f"kind {body.get('kind')!r} posted to {resource}")
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{self.store.revision:05x}"
        for field in ("uid", "resourceVersion", "deletionTimestamp", "creationTimestamp"):
            meta.pop(field, None)
        causes: list[tuple[str, str]] = []
        if resource == "pods":
            causes = validate_pod(body)
        else:
            validate_metadata(meta, causes)
        if causes:
            raise _invalid(kind, meta.get("name", ""), causes)
        if self.store.get(resource, ns, meta["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource} "{meta["name"]}" already exists',
                name=meta["name"],
                kind=resource,
            )
        obj = {"apiVersion": f"{group}/{version}" if group else version, "kind": kind, **body}
        if resource == "pods":
            _default_pod(obj)
        if resource == "namespaces":
            self.namespaces.add(meta["name"])
        created = self.store.create(resource, ns, obj)
        return _json(created, status=201)

    def _delete(self, request: web.Request, resource: str, ns: str, name: str) -> web.Response:
        obj = self._get(resource, ns, name)
        body = request[_BODY] if isinstance(request[_BODY], dict) else {}
        pre = body.get("preconditions") or {}
        meta = obj["metadata"]
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                f"{meta['uid']}",
                name=name,
                kind=resource,
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "Precondition failed: resourceVersion does not match; the object has been modified",
                name=name,
                kind=resource,
            )
        if resource != "pods":
            return _json(self.store.remove(resource, ns, name))
        grace_raw = request.query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
        try:
            grace = (
                int(grace_raw)
                if grace_raw is not None
                else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            )
        except (TypeError, ValueError):
            raise ApiError(400, "BadRequest", f"bad gracePeriodSeconds {grace_raw!r}") from None
        if grace < 0:
            raise ApiError(422, "Invalid", "gracePeriodSeconds must be >= 0")
        bound = bool(obj["spec"].get("nodeName"))
        finished = obj.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if grace == 0 or not bound or finished:
            gone = self.store.remove(resource, ns, name)
            return _json(gone)
        current = meta.get("deletionGracePeriodSeconds")
        if current is not None and grace >= current:
            return _json(obj)  # already terminating with a grace no longer than this
        new = copy.deepcopy(obj)
        new["metadata"]["deletionTimestamp"] = now_rfc3339(grace)
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        return _json(self.store.update(resource, ns, new))

    def _replace(self, request: web.Request, resource: str, ns: str, name: str) -> web.Response:
        old = self._get(resource, ns, name)
        new = request[_BODY]
        if not isinstance(new, dict) or new.get("metadata", {}).get("name") != name:
            raise ApiError(400, "BadRequest", "the name in the body does not match the URL")
        rv = new["metadata"].get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _conflict(resource, name)
        return self._store_update(resource, ns, old, new)

    def _patch(self, request: web.Request, resource: str, ns: str, name: str) -> web.Response:
        old = self._get(resource, ns, name)
        patch = request[_BODY]
        ctype = request.content_type
        try:
            if ctype == "application/json-patch+json":
                new = json_patch(old, patch)
            elif ctype in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                new = merge_patch(old, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the patch cannot be applied: {exc}") from None
        rv = new.get("metadata", {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _conflict(resource, name)
        return self._store_update(resource, ns, old, new)

    def _store_update(self, resource: str, ns: str, old: Obj, new: Obj) -> web.Response:
        new = copy.deepcopy(new)
        keep = ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp")
        for k in keep:
            if k in old["metadata"]:
                new["metadata"][k] = old["metadata"][k]
        if resource == "pods":
            new["status"] = old.get("status", {})
            causes = pod_update_causes(old, new)
        else:
            causes = []
            validate_metadata(new.get("metadata"), causes)
        if causes:
            raise _invalid(old["kind"], old["metadata"]["name"], causes)
        return _json(self.store.update(resource, ns, new))

    # ------------------------------------------------------------ list/watch

    def _matcher(self, request: web.Request) -> Callable[[Obj], bool]:
        try:
            labels = label_selector(request.query.get("labelSelector", ""))
            fields = field_selector(request.query.get("fieldSelector", ""))
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {exc}") from None
        return lambda o: labels(o["metadata"].get("labels") or {}) and fields(o)

    def _list(
        self, request: web.Request, group: str, version: str, resource: str, ns: str
    ) -> web.Response:
        kind, _ = _RESOURCES[(group, version, resource)]
        match = self._matcher(request)
        token = request.query.get("continue")
        if token:
            try:
                key, after = json.loads(base64.urlsafe_b64decode(token))
                revision, items = self._snapshots[key]
            except (ValueError, KeyError):
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                ) from None
        else:
            revision = self.store.revision
            items = [o for o in self.store.items(resource, ns) if match(o)]
            key, after = f"{revision}-{id(items)}", ""
        rest = [o for o in items if o["metadata"]["name"] > after]
        limit = int(request.query.get("limit", "0") or 0)
        page, more = (rest[:limit], rest[limit:]) if limit > 0 else (rest, [])
        meta: Obj = {"resourceVersion": self.store.encode(revision)}
        if more:
            self._snapshots[key] = (revision, items)
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps([key, page[-1]["metadata"]["name"]]).encode()
            ).decode()
            meta["remainingItemCount"] = len(more)
        else:
            self._snapshots.pop(key, None)
        api_version = f"{group}/{version}" if group else version
        return _json(
            {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": page}
        )

    async def _watch(
        self, request: web.Request, group: str, version: str, resource: str, ns: str
    ) -> web.StreamResponse:
        match = self._matcher(request)
        rv = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in _TRUE
        timeout = float(request.query.get("timeoutSeconds", "0") or 0) or None
        kind, _ = _RESOURCES[(group, version, resource)]
        start: int | None = None
        expired = False
        if rv not in ("", "0"):
            try:
                start = self.store.decode(rv)
                backlog = list(self.store.since(start))
            except Expired:
                expired = True
        if expired and not self.expired_as_event:
            raise ApiError(410, "Expired", f"too old resource version: {rv}")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        w = _Watch(resp, request)
        self._watches.add(w)

        def on_event(ev: Event) -> None:
            if ev.resource == resource and ev.namespace == ns and match(ev.obj):
                w.queue.put_nowait({"type": ev.type, "object": ev.obj})

        unsubscribe = self.store.subscribe(on_event)
        try:
            if expired:
                msg = f"too old resource version: {rv}"
                await _send(resp, {"type": "ERROR", "object": status_body(410, "Expired", msg)})
                return resp
            if start is None:
                for o in self.store.items(resource, ns):
                    if match(o):
                        await _send(resp, {"type": "ADDED", "object": o})
            else:
                for ev in backlog:
                    if ev.resource == resource and ev.namespace == ns and match(ev.obj):
                        await _send(resp, {"type": ev.type, "object": ev.obj})
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout if timeout else None
            while True:
                wait = self.bookmark_interval_s if bookmarks else None
                if end is not None:
                    left = end - loop.time()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    item = await asyncio.wait_for(w.queue.get(), wait)
                except TimeoutError:
                    if bookmarks:
                        mark = {
                            "kind": kind,
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": self.store.version},
                        }
                        await _send(resp, {"type": "BOOKMARK", "object": mark})
                    continue
                if item is None:
                    break
                await _send(resp, item)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            unsubscribe()
            self._watches.discard(w)
        if not w.dropped:
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
        return resp


async def _send(resp: web.StreamResponse, event: Obj) -> None:
    await resp.write(json.dumps(event).encode() + b"\n")


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(obj).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    text = "; ".join(f"{f}: {m}" for f, m in causes)
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {text}',
        name=name,
        kind=kind,
        causes=[{"field": f, "message": m, "reason": "FieldValueInvalid"} for f, m in causes],
    )


def _conflict(resource: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        name=name,
        kind=resource,
    )


def _default_pod(pod: Obj) -> None:
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    for c in spec["containers"]:
        c.setdefault("imagePullPolicy", "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
    pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}


def write_kubeconfig(path: Path, api: FakeApiServer, namespace: str = "default") -> Path:
    """A kubeconfig (JSON is YAML) whose current context is the fake."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "fake", "user": {"token": api.token} if api.token else {}}],
                "contexts": [
                    {
                        "name": "fake",
                        "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                    }
                ],
                "current-context": "fake",
            }
        )
    )
    return path
