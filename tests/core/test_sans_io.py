"""The core and the SIP layer stay sans-IO: no module under `trunkline.core` or
`trunkline.sip` imports I/O or the clock (import-linter checks the same in
scripts/check; this also sees function-local and dynamic imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trunkline.core
import trunkline.sip

CORE = Path(trunkline.core.__file__).parent
SIP = Path(trunkline.sip.__file__).parent
FORBIDDEN = frozenset(
    {
        "asyncio",
        "aiohttp",
        "socket",
        "ssl",
        "selectors",
        "time",
        "datetime",
        "subprocess",
        "websockets",
        "threading",
        "multiprocessing",
    }
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("__import__", "import_module")
        ):
            found.add("<dynamic import>")
    return found


CORE_FILES = sorted(CORE.rglob("*.py")) + sorted(SIP.rglob("*.py"))


def test_core_has_modules() -> None:
    """The scan below really sees the scheduler and the SIP edge (guards against
    an empty glob)."""
    assert CORE / "scheduler.py" in CORE_FILES
    assert SIP / "edge.py" in CORE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_module_imports_no_io_or_clock(path: Path) -> None:
    """A core module imports nothing that does I/O or reads the clock, and imports nothing
    dynamically."""
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN or m[0] == "<"}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_scan_catches_forbidden_imports(tmp_path: Path) -> None:
    """The import scanner sees plain, dotted, from- and function-local imports."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os.path\nimport time\nfrom asyncio import sleep\n"
        "def f():\n    import socket\n    from datetime import datetime\n"
    )
    assert {"time", "asyncio", "socket", "datetime"} <= imported_modules(probe)
