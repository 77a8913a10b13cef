"""Reusing one test module's tests under another backend.

The core's scenario and crash tests (tests/core) and the btrfs SIGKILL tests
are written once; the sim, btrfs and zfs packages re-run them by loading the
module under a private name and overriding fixtures such as ``group_config``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent


def load(relpath: str, tag: str) -> ModuleType:
    """Import tests/<relpath> as a private module named after ``tag``."""
    path = TESTS / relpath
    spec = importlib.util.spec_from_file_location(f"reused_{tag}_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adopt(namespace: dict, tag: str, *relpaths: str, extra: tuple[str, ...] = ("harness", "Gate")) -> list[ModuleType]:
    """Copy every ``test_*`` function (and the named helpers) of each module into ``namespace``."""
    mods = [load(p, tag) for p in relpaths]
    for mod in mods:
        namespace.update({k: v for k, v in vars(mod).items() if k.startswith("test_") or k in extra})
    return mods
