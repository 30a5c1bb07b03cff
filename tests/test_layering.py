"""The package layering of docs/architecture.md, checked on the source: which package may import
which (at run time; imports under ``if TYPE_CHECKING:`` are for type hints only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "reprod"

# package -> the reprod packages/modules its modules must never import
FORBIDDEN = {
    "diff": {"report", "cli", "testing", "pytest_plugin", "helper", "align", "capture"},
    "storage": {"diff", "report", "cli", "testing", "pytest_plugin", "helper", "capture"},
    "report": {"cli", "testing", "pytest_plugin", "helper", "align", "capture"},
    # compare_trees runs the engine on file pairs; it renders nothing and knows no framework
    "trees": {"report", "cli", "testing", "pytest_plugin", "helper", "align", "capture",
              "diagnose"},
    # pure numpy checks: they read capture's key names (capture.naming) and nothing else of reprod
    "diagnose": {"diff", "storage", "report", "cli", "testing", "pytest_plugin", "helper",
                 "align", "trees", "logger"},
}
# the documented exceptions, each inside the function that needs it: the .pth reader applies
# align's conversion rules; DiffResult's to_table()/to_json()/... conveniences call a renderer
ALLOWED = {("storage/framework_files.py", "align"), ("diff/result.py", "report")}


def _imports(path: Path) -> set[str]:
    """The first reprod sub-package or module each run-time import of ``path`` names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parts[:-1]
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                full = list(package[: len(package) - (node.level - 1)])
                full += node.module.split(".") if node.module else []
                found.update([full[0]] if full else [a.name for a in node.names])
            elif node.module and node.module.startswith("reprod."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("reprod."):
                    found.add(a.name.split(".")[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):  # sub-packages too
        rel = path.relative_to(ROOT).as_posix()
        for name in _imports(path) & FORBIDDEN[package]:
            if (rel, name) not in ALLOWED:
                bad.append(f"{rel} imports reprod.{name}")
    assert not bad, bad


def test_the_check_sees_imports() -> None:
    # the walker itself: batch.py imports storage (allowed), messages and its own package
    assert {"storage", "messages", "diff"} <= _imports(ROOT / "diff" / "batch.py")
    # three dots from a sub-package's module reach the top level
    assert {"diff", "capture"} <= _imports(ROOT / "capture" / "kinks" / "crossings.py")
