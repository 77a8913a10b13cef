"""The tools/*.py modules (the package ``tools`` at the repository root) for the tests."""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str):
    """``tools.<name>`` (the test command runs from the repository root, which is on sys.path)."""
    return importlib.import_module(f"tools.{name}")
