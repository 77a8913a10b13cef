"""The backend conformance suite (coalesce_core.testing.conformance) on sim volumes."""

from __future__ import annotations

import os

import pytest
from hypothesis.stateful import run_state_machine_as_test

from coalesce_core.testing import conformance

SETTINGS = dict(max_examples=int(os.environ.get("COALESCE_SIM_EXAMPLES", "30")), stateful_steps=25)


@pytest.mark.parametrize("check", list(conformance.BASIC_CHECKS))
def test_basic(check, sim_url):
    conformance.run_basic_check(check, sim_url)


def test_basic_generic_rollback(sim_url, monkeypatch):
    """The core's generic rollback (diff + apply) on sim (native rollback is the default)."""
    monkeypatch.setenv("COALESCE_SIM_NATIVE_ROLLBACK", "0")
    conformance.run_basic_check("apply_failures_and_rollback", sim_url)


def test_stateful(sim_url):
    machine = conformance.conformance_machine(sim_url)
    run_state_machine_as_test(machine, settings=conformance.conformance_settings(**SETTINGS))
