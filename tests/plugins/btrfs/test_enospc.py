"""ENOSPC mid-apply on a small btrfs: a clear, failed update; the exported image survives; rollback repairs."""

from __future__ import annotations

import os

import pytest

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import MkDir, MkFile, Write, framed
from coalesce_posix import NoSpace

pytestmark = pytest.mark.btrfs


def flood(qtree: str, total: int):
    """A change stream that writes ``total`` bytes of incompressible data into one new file."""
    yield from framed(qtree, "base", "next", _flood(total))


def _flood(total: int):
    yield MkDir(path="big")
    yield MkFile(path="big/flood")
    chunk = os.urandom(1 << 20)
    for i in range(total >> 20):
        yield Write(path="big/flood", offset=i << 20, data=chunk[:-1] + bytes([i & 0xFF]))


def test_enospc_is_a_clear_failure_and_the_export_survives(btrfs_small_url):
    pm = plugin_manager()
    vol = Volume.open(pm, btrfs_small_url, create=True)
    vol.apply("q", framed("q", None, "base", [MkFile(path="keep"), Write(path="keep", offset=0, data=b"exported")]))
    vol.snapshot_create("base")
    vol.export({"q": "base"})
    fp = vol.fingerprint("q", "base")
    exported_file = os.path.join(vol.export_path("q"), "keep")
    with pytest.raises(BackendError) as ei:
        vol.apply("q", flood("q", 400 << 20))  # more than the 256 MiB file system holds
    assert isinstance(ei.value, NoSpace)
    assert "no space left" in str(ei.value) and ei.value.hint
    # the exported image (a read-only snapshot) is intact and still readable at its stable path
    assert vol.exported() == {"q": "base"}
    assert open(exported_file, "rb").read() == b"exported"
    assert vol.fingerprint("q", "base") == fp
    # the partial qtree is repaired by the rollback path once the partial data is released
    vol.snapshot_create("rb")
    vol.rollback("q", "rb", "base")
    vol.purge_purgatory(["q"])
    vol.snapshot_delete("rb")
    assert vol.fingerprint("q") == fp
