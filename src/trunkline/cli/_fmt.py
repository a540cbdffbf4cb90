"""Rendering helpers shared by the operator commands (rich markup strings)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

# Terminal states the CLI treats as a good outcome (exit 0).
GOOD_END = frozenset({"succeeded"})

STATE_STYLE = {
    "queued": "yellow",
    "offered": "cyan",
    "assigned": "cyan",
    "running": "green",
    "orphaned": "magenta",
    "terminating": "magenta",
    "succeeded": "green",
    "failed": "red",
    "rejected": "red",
    "no_capacity": "red",
    "worker_lost": "red",
    "cancelled": "yellow",
}


def styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def slot_bar(running: int, reserved: int, capacity: int | None, width_cap: int = 32) -> str:
    """Slots as cells: running ■ (green), reserved ▣ (yellow), free □ (dim).
    Unknown capacity shows the used cells and a `?`."""
    running = max(running, 0)
    reserved = max(reserved, 0)
    if capacity is None:
        return "[green]" + "■" * running + "[/][yellow]" + "▣" * reserved + "[/] [dim]?[/]"
    free = max(capacity - running - reserved, 0)
    if capacity > width_cap:  # too many cells to draw: a proportional bar
        scale = width_cap / capacity
        running, reserved = round(running * scale), round(reserved * scale)
        free = max(width_cap - running - reserved, 0)
    return f"[green]{'■' * running}[/][yellow]{'▣' * reserved}[/][dim]{'□' * free}[/]"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 10_000:
        return f"{ms:.0f} ms"
    return f"{seconds:.1f} s"


def fmt_clock(unix: float | None) -> str:
    if unix is None:
        return "-"
    t = time.localtime(unix)
    return time.strftime("%H:%M:%S", t) + f".{int((unix % 1) * 1000):03d}"


def fmt_fields(event: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    """`k=v` pairs of a record whose shape this CLI does not know in advance."""
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and v not in (None, ""))


def first(record: Mapping[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present (and not None) in `record`."""
    for key in keys:
        value = record.get(key)
        if value is not None:
            return value
    return None
