"""Replica providers: where an autoscaled pool's replicas run.

`create_provider(name, **settings)` builds the provider a replica pool's
`provider` key names; `PROVIDERS` lists them. Each factory imports its module
only when called, so an optional backend's client library (Kubernetes) is
needed only by the pools that use it. The protocol every provider implements,
and the rules it keeps, are in `trunkline.providers.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trunkline.providers.protocol import (
    Description,
    ExitCallback,
    Launch,
    Provider,
    ProviderError,
    ReplicaHandle,
)

__all__ = [
    "PROVIDERS",
    "Description",
    "ExitCallback",
    "Launch",
    "Provider",
    "ProviderError",
    "ProviderFactory",
    "ReplicaHandle",
    "create_provider",
]

ProviderFactory = Callable[..., Provider]


def _local(**settings: Any) -> Provider:
    from trunkline.providers.local import LocalProvider

    return LocalProvider(**settings)


def _kubernetes(**settings: Any) -> Provider:
    try:
        from trunkline.providers.kubernetes import KubernetesProvider
    except ImportError as exc:
        raise ProviderError(
            f"the Kubernetes provider needs its client library ({exc.name}): "
            "pip install 'trunkline[kubernetes]'"
        ) from None
    return KubernetesProvider(**settings)


# name -> factory taking that provider's settings as keywords. To add one, see
# CONTRIBUTING.md ("Adding a replica provider").
PROVIDERS: Mapping[str, ProviderFactory] = {"local": _local, "kubernetes": _kubernetes}


def create_provider(
    name: str, *, registry: Mapping[str, ProviderFactory] = PROVIDERS, **settings: Any
) -> Provider:
    """The provider called `name`, built with `settings` (for "local":
    `run_dir`, optionally `exit_with_server`; for "kubernetes": `pools` and
    the `[kubernetes]` settings, see `KubernetesProvider`). Raises `ProviderError` naming
    the known providers if there is none of that name, or the setting it
    refused. `registry` lets a test add its own (e.g. a `FakeProvider`)."""
    factory = registry.get(name)
    if factory is None:
        known = ", ".join(repr(n) for n in sorted(registry))
        raise ProviderError(f"unknown replica provider {name!r}; known providers: {known}")
    try:
        return factory(**settings)
    except TypeError as exc:
        raise ProviderError(f"provider {name!r}: bad settings: {exc}") from exc
