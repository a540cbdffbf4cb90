"""Moved to `trunkline.common.logs`, so that the worker SDK (which may import
only `trunkline.common` and `trunkline.auth`) can share it; this re-export keeps
the remaining importers working until they switch."""

from trunkline.common.logs import JsonFormatter, TextFormatter, setup_logging

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]
