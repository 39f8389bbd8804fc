"""The import direction of design.md: a package imports only from packages above it.

_checks <- functional <- nn <- surgery <- analysis <- audit <- data <- experiments <- report <- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "normlab"
ORDER = [
    "_checks",
    "_batches",
    "functional",
    "nn",
    "surgery",
    "analysis",
    "audit",
    "data",
    "experiments",
    "report",
    "cli",
]
# Top-level modules that may import anything (they only re-export or dispatch).
FREE = {"__init__", "__main__"}


def _layer(module: str) -> str:
    """'normlab.nn.batchnorm' -> 'nn'."""
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (found a relative import)")
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [m for m in found if m == "normlab" or m.startswith("normlab.")]


FILES = sorted(p for p in SRC.rglob("*.py"))


def test_every_package_is_placed_in_the_order() -> None:
    packages = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in FILES} - FREE
    assert packages <= set(ORDER), packages - set(ORDER)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SRC)) for p in FILES])
def test_imports_flow_downward(path: Path) -> None:
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    if own in FREE:
        return
    for module in _imports(path):
        if module == "normlab":  # the root imports every library layer: only the CLI may
            assert own == "cli", f"{path}: import the subpackage, not the normlab root"
            continue
        target = _layer(module)
        assert ORDER.index(target) <= ORDER.index(own), f"{path}: {own} must not import {module}"


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from normlab.experiments import run_demo\n")
    (module,) = _imports(bad)
    assert ORDER.index(_layer(module)) > ORDER.index("nn")
