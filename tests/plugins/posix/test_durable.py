"""The durability barrier (coalesce_posix/durable.py): an apply returns only after its writes were flushed."""

from __future__ import annotations

import os

from coalesce_core.stream import records as R
from coalesce_posix import durable
from coalesce_posix.volume import PosixVolume


def test_syncfs_flushes_the_file_system_of_a_path(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 4096)
    durable.syncfs(str(tmp_path))  # raises on a write-back error; returns None when flushed


def test_apply_makes_its_writes_durable_before_it_returns(tmp_path, monkeypatch):
    """The agent records `done` right after apply returns: the flush must come after the last write."""
    root, exports = tmp_path / "vol", tmp_path / "exports"
    root.mkdir()
    exports.mkdir()
    flushed: list[tuple[str, bool]] = []
    monkeypatch.setattr(durable, "syncfs", lambda path: flushed.append((path, os.path.exists(root / "q" / "d" / "f"))))
    vol = PosixVolume("posix-test://vol", str(root), str(exports))
    recs = [R.MkDir(path="d"), R.MkFile(path="d/f", mode=0o644), R.Write(path="d/f", offset=0, data=b"data")]
    counts = vol.apply("q", R.framed("q", None, "t", recs), False)
    assert counts["records"] >= 3
    assert flushed == [(str(root), True)]  # once, after the file was written
