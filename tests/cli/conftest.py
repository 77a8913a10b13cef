"""Fixtures of the terminal-experience tests (docs/terminal.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from groups import mem_group

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "schemas"
PLUGINS = ROOT / "plugins"


def import_metrics():
    """coalesce_metrics, importable before (and after) pyproject maps the package."""
    try:
        import coalesce_metrics
    except ImportError:
        sys.path.insert(0, str(PLUGINS))
        import coalesce_metrics
    return coalesce_metrics


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def validate(doc: Any, name: str) -> None:
    import jsonschema  # pinned in the test extra: never skipped

    s = schema(name)
    jsonschema.Draft202012Validator.check_schema(s)
    jsonschema.Draft202012Validator(s).validate(doc)


@pytest.fixture
def group(tmp_path: Path, monkeypatch):
    """A two-replica group on file-backed mem volumes (tests/groups.py), config at ./coalesce.toml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    monkeypatch.delenv("COALESCE_METRICS_FILE", raising=False)
    return tmp_path, mem_group(tmp_path)


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `coalesce ARGS` in this process; returns (exit code, stdout, stderr)."""
    from coalesce_core.ui import cli as cli_mod

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli_mod.main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture
def cycled(group, cli):
    """``group`` initialised and through two cycles, the second an update of one changed file of A."""
    _, writer = group
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed" * 50)
    assert cli("run", "--once", "-q")[0] == 0
    return group


@pytest.fixture
def validate_json() -> Callable[[Any, str], None]:
    """validate_json(doc, "status") checks doc against docs/schemas/status.schema.json."""
    return validate


@pytest.fixture
def metrics_module():
    return import_metrics()
