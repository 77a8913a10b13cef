"""The house's walls (docs/architecture.md, "What lives where"): what each package may import."""

from __future__ import annotations

import ast
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
    offenders = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "coalesce_core").rglob("*.py")
                       if any(m == forbidden or m.startswith(forbidden + ".") for m in imported_modules(p)))
    assert offenders == []
