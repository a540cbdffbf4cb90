"""The trunkline server: one aiohttp process on one port."""

from trunkline.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
