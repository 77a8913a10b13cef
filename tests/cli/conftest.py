"""Fixtures of the terminal-experience tests (docs/terminal.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

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
    """A two-replica group on file-backed mem volumes, source filled, config at ./coalesce.toml."""
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.testing.workload import SourceWriter, fill

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    monkeypatch.delenv("COALESCE_METRICS_FILE", raising=False)
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        '[group]\nname = "home"\n'
        f'source = "mem://{tmp_path}/src.vol"\ndestination = "mem://{tmp_path}/dst.vol"\n'
        "parallel = 2\n[group.retry]\ninitial = 0\n"
        '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\nsource = "qb"\n'
    )
    src = Volume.open(plugin_manager(), f"mem://{tmp_path}/src.vol", create=True)
    writer = SourceWriter(src)
    fill(writer, ["A", "qb"])
    return tmp_path, writer


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
def validate_json() -> Callable[[Any, str], None]:
    """validate_json(doc, "status") checks doc against docs/schemas/status.schema.json."""
    return validate


@pytest.fixture
def metrics_module():
    return import_metrics()
