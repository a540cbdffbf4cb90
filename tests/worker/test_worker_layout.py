"""The worker SDK's shape: what it may import, no import cycles, stable exit wording."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trunkline.worker
from trunkline.worker._pool import describe_exit

PACKAGE = Path(trunkline.worker.__file__).parent
# The SDK ships to agent authors: of trunkline it may use only these
# (`trunkline` itself for `__version__`).
ALLOWED = ("trunkline.common", "trunkline.auth")


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (also under TYPE_CHECKING and
    inside functions: those count for cycles and layers too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "trunkline.worker"
                if node.module:
                    names.add(f"{base}.{node.module}")
                else:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def _modules() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = "trunkline.worker" if path.stem == "__init__" else f"trunkline.worker.{path.stem}"
        graph[name] = _imports(path)
    return graph


def test_sdk_imports_only_common_and_auth_of_trunkline() -> None:
    """No SDK module imports a trunkline module outside common/auth (and the package root)."""
    outside = {
        (module, name)
        for module, names in _modules().items()
        for name in names
        if name.startswith("trunkline.")
        and not name.startswith("trunkline.worker")
        and not any(name == a or name.startswith(a + ".") for a in ALLOWED)
    }
    assert outside == set()


def test_no_import_cycle_inside_the_sdk() -> None:
    """The SDK's modules import each other without a cycle (TYPE_CHECKING imports included)."""
    graph = {
        module: {n for n in names if n.startswith("trunkline.worker.")}
        for module, names in _modules().items()
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for name in sorted(graph.get(module, ())):
            visit(name, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (-9, "job process was killed by SIGKILL"),
        (-200, "job process was killed by signal 200"),
        (1, "job process exited with code 1 without reporting an outcome"),
        (None, "job process vanished"),
    ],
)
def test_job_process_exit_wording(code: int | None, text: str) -> None:
    """A job process that died without an outcome is described as it always was."""
    assert describe_exit(code) == text
