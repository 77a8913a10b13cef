"""The backend conformance suite (coalesce_core.testing.conformance) on real zfs subvolumes."""

from __future__ import annotations

import os

import pytest
from hypothesis.stateful import run_state_machine_as_test

from coalesce_core.testing import conformance

pytestmark = pytest.mark.zfs

#: small counts: zfs-fuse is slow: every diff clones two snapshots
SETTINGS = dict(
    max_examples=int(os.environ.get("COALESCE_REALFS_EXAMPLES", "3")),
    stateful_steps=int(os.environ.get("COALESCE_REALFS_STEPS", "12")),
)


@pytest.mark.parametrize("check", list(conformance.BASIC_CHECKS))
def test_basic(check, zfs_urls):
    conformance.run_basic_check(check, zfs_urls)


def test_stateful(zfs_urls):
    machine = conformance.conformance_machine(zfs_urls, cleanup=zfs_urls.cleanup)
    run_state_machine_as_test(machine, settings=conformance.conformance_settings(**SETTINGS))
