"""The backend conformance suite (coalesce_core.testing.conformance) on real btrfs subvolumes."""

from __future__ import annotations

import os

import pytest
from hypothesis.stateful import run_state_machine_as_test

from coalesce_core.testing import conformance

pytestmark = pytest.mark.btrfs

#: small counts: a real file system is slow (every example creates a subvolume and snapshots)
SETTINGS = dict(
    max_examples=int(os.environ.get("COALESCE_REALFS_EXAMPLES", "3")),
    stateful_steps=int(os.environ.get("COALESCE_REALFS_STEPS", "12")),
)


@pytest.mark.parametrize("check", list(conformance.BASIC_CHECKS))
def test_basic(check, btrfs_urls):
    conformance.run_basic_check(check, btrfs_urls)


def test_stateful(btrfs_urls):
    machine = conformance.conformance_machine(btrfs_urls, cleanup=btrfs_urls.cleanup)
    run_state_machine_as_test(machine, settings=conformance.conformance_settings(**SETTINGS))


def test_basic_generic_rollback(btrfs_urls, monkeypatch):
    """The core's generic rollback (diff + apply) works on btrfs too (native is the default)."""
    monkeypatch.setenv("COALESCE_BTRFS_ROLLBACK", "generic")
    conformance.run_basic_check("apply_failures_and_rollback", btrfs_urls)


def test_basic_send_with_data(btrfs_urls, monkeypatch):
    """The send-stream parser also handles streams that carry file data (WRITE commands)."""
    monkeypatch.setenv("COALESCE_BTRFS_SEND_DATA", "1")
    conformance.run_basic_check("rich_roundtrip", btrfs_urls)
