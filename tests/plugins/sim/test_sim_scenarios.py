"""The core's agent scenario tests (tests/core/test_scenarios.py) re-run with sim volumes as source and
destination: the same Fig. 7-9 scenarios, only ``group_config`` builds ``sim://`` URLs."""

from __future__ import annotations

import pytest
from reuse import adopt

adopt(globals(), "sim", "core/test_scenarios.py")


@pytest.fixture
def group_config(group_config, monkeypatch):
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")

    def make(*args, **kw):
        kw["scheme"] = "sim"
        return group_config(*args, **kw)

    return make
