"""Conformance checks of the btrfs backend's other modes (the suite itself runs on btrfs in
tests/plugins/test_conformance_realfs.py)."""

from __future__ import annotations

import pytest

from coalesce_core.testing import conformance

pytestmark = pytest.mark.btrfs


def test_basic_generic_rollback(btrfs_urls, monkeypatch):
    """The core's generic rollback (diff + apply) works on btrfs too (native is the default)."""
    monkeypatch.setenv("COALESCE_BTRFS_ROLLBACK", "generic")
    conformance.run_basic_check("apply_failures_and_rollback", btrfs_urls)


def test_basic_send_with_data(btrfs_urls, monkeypatch):
    """The send-stream parser also handles streams that carry file data (WRITE commands)."""
    monkeypatch.setenv("COALESCE_BTRFS_SEND_DATA", "1")
    conformance.run_basic_check("rich_roundtrip", btrfs_urls)
