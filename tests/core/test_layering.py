"""The house's walls (docs/architecture.md, "What lives where"): what each package may import."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_imported_modules_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    import socket\n    from ssl import SSLContext\n")
    assert imported_modules(f) == {"os", "socket", "ssl"}


@pytest.mark.parametrize("forbidden", ["socket", "ssl", "zstandard", "coalesce_remote"])
def test_the_core_opens_no_socket(forbidden):
    """The network is the coalesce_remote plugin: nothing under coalesce_core/ imports it or its tools."""
    offenders = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "coalesce_core").rglob("*.py")
        if any(m == forbidden or m.startswith(forbidden + ".") for m in imported_modules(p))
    )
    assert offenders == []


#: what the pure cycle (coalesce_core/cycle/) may import besides the standard library
CYCLE_MAY_IMPORT = (
    "attrs",
    "transitions",
    "coalesce_core.cycle",
    "coalesce_core.errors",
    "coalesce_core.durations",
    "coalesce_core.retention",  # the pure retention policy: it decides, reads no clock, touches no volume
)


def _allowed_in_cycle(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    return any(module == m or module.startswith(m + ".") for m in CYCLE_MAY_IMPORT)


@pytest.mark.parametrize("path", sorted((ROOT / "coalesce_core" / "cycle").glob("*.py")), ids=lambda p: p.name)
def test_the_cycle_is_pure(path):
    """The spec, machines, guards, state, events, effects, planner and invariants decide; they never reach the
    agent, the ledger, a backend, the stream, the terminal (rich) or the plugin manager (pluggy)."""
    assert sorted(m for m in imported_modules(path) if not _allowed_in_cycle(m)) == []


def test_the_purity_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import attrs\nfrom coalesce_core.agent import Agent\nimport rich\n")
    assert sorted(m for m in imported_modules(f) if not _allowed_in_cycle(m)) == ["coalesce_core.agent", "rich"]
