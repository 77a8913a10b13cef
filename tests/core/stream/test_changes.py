"""A change stream read as the paths it changes (coalesce_core/stream/changes.py)."""

from __future__ import annotations

from coalesce_core.stream import records as R
from coalesce_core.stream.changes import Change, changes


def test_each_path_once_with_its_kind_in_path_order():
    got = changes(
        [
            R.Begin(qtree="A", base="p1", target="p2"),
            R.Write(path="old/kept", offset=0, data=b"x"),
            R.SetAttr(path="old/kept", mode=0o600),
            R.MkDir(path="new"),
            R.MkFile(path="new/f"),
            R.Write(path="new/f", offset=0, data=b"y"),
            R.Unlink(path="gone"),
            R.RmDir(path="swap"),
            R.MkFile(path="swap"),
            R.SetAttr(path=R.ROOT, mtime_ns=1),
            R.End(records=10),
        ]
    )
    assert got == [
        Change("", "modified"),
        Change("gone", "deleted"),
        Change("new", "added"),
        Change("new/f", "added"),
        Change("old/kept", "modified"),
        Change("swap", "replaced"),
    ]


def test_made_and_removed_within_the_stream_is_not_listed_and_a_rename_is_delete_plus_add():
    got = changes(
        [
            R.MkFile(path="tmp"),
            R.Unlink(path="tmp"),
            R.Rename(old="a", new="b"),
            R.Write(path="c", offset=0, data=b"z"),
            R.Unlink(path="c"),
        ]
    )
    assert got == [Change("a", "deleted"), Change("b", "added"), Change("c", "deleted")]


def test_no_records_no_changes():
    assert changes([R.Begin(qtree="A", base="p", target="p"), R.End(records=0)]) == []
