"""The backend conformance suite (coalesce_core.testing.conformance) on the real backends: btrfs
subvolumes and zfs-fuse datasets (tests/realfs.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis.stateful import run_state_machine_as_test

from coalesce_core.testing import conformance

#: small counts: a real file system is slow (every example creates a subvolume or a dataset and snapshots;
#: on zfs-fuse every diff clones two snapshots)
SETTINGS = dict(
    max_examples=int(os.environ.get("COALESCE_REALFS_EXAMPLES", "3")),
    stateful_steps=int(os.environ.get("COALESCE_REALFS_STEPS", "12")),
)


@pytest.fixture(params=[pytest.param("btrfs", marks=pytest.mark.btrfs), pytest.param("zfs", marks=pytest.mark.zfs)])
def urls(request):
    """The backend's factory of fresh volume URLs (``btrfs_urls``, ``zfs_urls``)."""
    return request.getfixturevalue(f"{request.param}_urls")


@pytest.mark.parametrize("check", list(conformance.BASIC_CHECKS))
def test_basic(check, urls):
    conformance.run_basic_check(check, urls)


def test_stateful(urls):
    machine = conformance.conformance_machine(urls, cleanup=urls.cleanup)
    run_state_machine_as_test(machine, settings=conformance.conformance_settings(**SETTINGS))
