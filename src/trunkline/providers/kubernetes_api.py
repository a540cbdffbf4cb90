"""The Kubernetes provider's API access: credentials, requests, retries.

`connect()` finds the cluster and namespace the way kubectl and in-cluster
clients do: `[kubernetes] kubeconfig` if set, else the pod's service account
when running in a cluster, else `KUBECONFIG` / `~/.kube/config`; the namespace
is `[kubernetes] namespace`, else the service account's, else the kubeconfig
context's, else "default". kubernetes-asyncio does the authentication (tokens,
client certificates, exec plugins, service-account token refresh) and builds
the URLs; responses are read here as plain JSON (`_preload_content=False`),
never as generated model objects, so a pod costs what its JSON costs.

`Api.call` retries what a later attempt can fix, with capped exponential
backoff and jitter, within a time budget: throttling (429, honouring
Retry-After), server errors (5xx), optimistic-concurrency conflicts (409
Conflict, e.g. a ResourceQuota update racing the pod create) and a network
failure. Anything else is the caller's to handle (`Reply`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from trunkline.providers.protocol import ProviderError

log = logging.getLogger("trunkline.providers")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_OWNER_KINDS = {
    "Deployment": ("apps/v1", "read_namespaced_deployment"),
    "StatefulSet": ("apps/v1", "read_namespaced_stateful_set"),
    "ConfigMap": ("v1", "read_namespaced_config_map"),
}
OWNER_KINDS = tuple(_OWNER_KINDS)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """An answer from the API server: its status and JSON body (a Status on errors)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", ""))

    def describe(self) -> str:
        message = self.body.get("message") or ""
        return f"{self.status} {self.reason or 'error'}" + (f": {message}" if message else "")


class Unavailable(Exception):
    """The API server could not be reached (or kept failing) within the budget."""


@dataclasses.dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        step: float = self.base_s * 2.0 ** max(0, attempt - 1)
        return random.uniform(0.5, 1.0) * min(self.cap_s, step)


class Api:
    """A connected client: `core` and `apps` are kubernetes-asyncio API objects."""

    def __init__(self, api_client: Any, namespace: str, backoff: Backoff) -> None:
        from kubernetes_asyncio import client

        self.api_client = api_client
        self.namespace = namespace
        self.core: Any = client.CoreV1Api(api_client)
        self.apps: Any = client.AppsV1Api(api_client)
        self.backoff = backoff
        self.requests: Counter[str] = Counter()  # by verb, attempts included
        self.retries = 0

    async def call(
        self,
        what: str,
        request: Callable[[], Awaitable[Any]],
        *,
        budget_s: float,
        retry_conflict: bool = False,
    ) -> Reply:
        """Send `request()` (a kubernetes-asyncio call with `_preload_content=False`),
        retrying transient failures for up to `budget_s`; `Unavailable` after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        attempt = 0
        verb = what.split(" ", 1)[0]
        while True:
            attempt += 1
            self.requests[verb] += 1
            retry_after = 0.0
            try:
                resp = await request()
                async with resp:
                    raw = await resp.read()
                    headers = resp.headers
                reply = Reply(resp.status, _json(raw))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                transient = (
                    reply.status == 429
                    or reply.status >= 500
                    or (retry_conflict and reply.status == 409 and reply.reason == "Conflict")
                )
                if not transient:
                    return reply
                problem = reply.describe()
                try:
                    retry_after = float(headers.get("Retry-After", "0"))
                except ValueError:
                    retry_after = 0.0
            delay = max(self.backoff.delay(attempt), min(retry_after, self.backoff.cap_s))
            if loop.time() + delay > deadline:
                raise Unavailable(f"{what}: {problem} (gave up after {attempt} attempts)")
            self.retries += 1
            log.debug("kubernetes request retried", extra={"what": what, "problem": problem})
            await asyncio.sleep(delay)

    async def owner_reference(self, owner: str) -> dict[str, Any]:
        """`{"apiVersion", "kind", "name", "uid"}` for "Kind/name" in the namespace."""
        kind, _, name = owner.partition("/")
        api_version, method = _OWNER_KINDS[kind]
        api = self.apps if api_version == "apps/v1" else self.core
        reply = await self.call(
            f"get {owner}",
            lambda: getattr(api, method)(name, self.namespace, _preload_content=False),
            budget_s=10.0,
        )
        if not reply.ok:
            raise ProviderError(
                f"[kubernetes] owner {owner!r} in namespace {self.namespace!r}: "
                f"{reply.describe()}; create it first or change `owner`"
            )
        uid = reply.body.get("metadata", {}).get("uid", "")
        return {
            "apiVersion": api_version,
            "kind": kind,
            "name": name,
            "uid": uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }

    async def close(self) -> None:
        await self.api_client.close()


def _json(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"message": str(value)[:200]}


def in_cluster() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and (SERVICE_ACCOUNT_DIR / "token").is_file()
    )


async def connect(
    *, kubeconfig: str = "", context: str = "", namespace: str = "", backoff: Backoff
) -> Api:
    """A client for the configured cluster; `ProviderError` saying where it looked."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config.config_exception import ConfigException

    cfg: Any = client.Configuration()
    source: str
    ns = namespace
    try:
        if not kubeconfig and in_cluster():
            source = "the pod's service account"
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            if not ns:
                ns = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            source = f"kubeconfig {path}"
            await config.load_kube_config(
                config_file=path,
                context=context or None,
                client_configuration=cfg,
                persist_config=False,
            )
            if not ns:
                ns = _context_namespace(path, context)
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise ProviderError(
            f"no Kubernetes credentials: {exc}; set [kubernetes] kubeconfig, or KUBECONFIG, "
            "or run trunkline in a pod with a service account"
        ) from None
    log.info("kubernetes credentials", extra={"source": source, "namespace": ns or "default"})
    return Api(client.ApiClient(cfg), ns or "default", backoff)


def _context_namespace(path: str, context: str) -> str:
    from kubernetes_asyncio import config

    first = path.split(os.pathsep)[0]
    contexts, current = config.list_kube_config_contexts(os.path.expanduser(first))
    chosen = current
    if context:
        chosen = next((c for c in contexts if c.get("name") == context), None)
    if not chosen:
        return ""
    return str((chosen.get("context") or {}).get("namespace", "") or "")
