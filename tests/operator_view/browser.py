"""Headless Chromium for the dashboard tests and the screenshot script.

Uses Debian's `chromium` (apt-get install chromium) driven by Playwright from
PyPI; Playwright's own browser download is not used. `missing()` says why a
browser test cannot run here (None when it can).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

CHROMIUM = os.environ.get("TRUNKLINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing() -> str | None:
    """Why the browser tests must be skipped, or None if they can run."""
    if not os.path.exists(CHROMIUM):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    return None


async def launch(pw: Any) -> Any:
    """A headless Chromium browser from a started `async_playwright()`."""
    return await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
