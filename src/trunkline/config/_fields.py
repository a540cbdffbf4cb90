"""The two checks every config section uses: unknown keys, and one typed value.

Each records what is wrong in the caller's `ErrorCollector` and carries on, so
one pass over the file reports every problem (see `trunkline.config`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from trunkline.common.errors import ErrorCollector


def _check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], where: str, e: ErrorCollector
) -> None:
    for key in table:
        if key not in allowed:
            e.add(f"{where}.{key}" if where else key, f"unknown key; allowed: {', '.join(allowed)}")


def _get(
    table: Mapping[str, Any],
    key: str,
    where: str,
    e: ErrorCollector,
    kind: str,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
) -> Any:
    """Fetch and type-check one value; None when absent or invalid."""
    if key not in table:
        return None
    value = table[key]
    name = f"{where}.{key}"
    ok: bool
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if ok and check is not None:
        ok = check(value)
    if not ok:
        e.add(name, f"must be {allowed or kind} (got {value!r})")
        return None
    return value
