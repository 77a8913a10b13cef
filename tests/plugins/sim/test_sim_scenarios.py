"""The core's agent scenario tests (tests/core/test_scenarios.py) re-run with sim volumes as source and
destination: the same Fig. 7-9 scenarios, only ``group_config`` builds ``sim://`` URLs."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).parents[2] / "core" / "test_scenarios.py"
if not _path.exists():  # pragma: no cover - the core suite is being written concurrently
    pytest.skip("tests/core/test_scenarios.py is not there", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("core_scenarios_for_sim", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

globals().update({k: v for k, v in vars(_mod).items()
                  if k.startswith("test_") or k in ("harness", "Gate")})


@pytest.fixture
def group_config(group_config, monkeypatch):
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")

    def make(*args, **kw):
        kw["scheme"] = "sim"
        return group_config(*args, **kw)

    return make
