"""trunkline: a control plane for real-time voice AI agents.

It places session requests on LiveKit-protocol agent workers with exact
per-worker capacity, queues briefly when every replica is full, scales replica
pools, and refuses SIP calls cleanly when no capacity can be had in time.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
