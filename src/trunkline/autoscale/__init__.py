"""Autoscaled replica pools: the controller that runs the core policy against
the live scheduler, and the providers that start replicas (local child
processes; Kubernetes later, behind the same `Provider` protocol)."""

from trunkline.autoscale.controller import AutoscaleController
from trunkline.autoscale.local import LocalProvider
from trunkline.autoscale.provider import Launch, Provider, ProviderError, ReplicaHandle

__all__ = [
    "AutoscaleController",
    "Launch",
    "LocalProvider",
    "Provider",
    "ProviderError",
    "ReplicaHandle",
]
