"""coalesce_core.verify: descriptions compared field by field, hard-link groups, path order,
the touched set of an update, whole-image walks, and the background schedule."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalesce_core.stream import records as R
from coalesce_core.stream.fingerprint import BLOCK as B
from coalesce_core.verify import (
    ABSENT,
    FIELDS,
    MAX_PARTS,
    Comparer,
    Description,
    Difference,
    Holds,
    Touched,
    compare,
    compare_paths,
    compare_subtrees,
    compare_touched,
    due_for_verification,
    generic_tree,
    path_key,
    tree_compare,
    xattr_digest,
)

F = Description(
    path="a/f",
    kind="f",
    mode=0o644,
    uid=1,
    gid=2,
    size=3,
    mtime_ns=10,
    xattrs=xattr_digest({}),
    content="c1",
    ident=7,
    nlink=1,
)
D = Description(
    path="a", kind="d", mode=0o755, uid=0, gid=0, mtime_ns=5, xattrs=xattr_digest({}), entries=(("f", "f"),)
)
L = Description(path="a/l", kind="l", uid=0, gid=0, mtime_ns=5, target="f")


# ---------------------------------------------------------------------------
# fields
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("kind", "d"),
        ("size", 4),
        ("content", "c2"),
        ("mode", 0o600),
        ("uid", 9),
        ("gid", 9),
        ("mtime_ns", 11),
        ("xattrs", xattr_digest({"user.a": b"1"})),
    ],
)
def test_every_field_of_a_file_is_compared(field, value):
    other = attrs.evolve(F, **{field: value})
    if field == "kind":
        other = Description(path=F.path, kind="d", entries=())
    diffs = compare([F], [other])
    assert [(d.path, d.field) for d in diffs] == [("a/f", field)]
    assert diffs[0].source == getattr(F, field) and diffs[0].replica == getattr(other, field)


def test_a_symlink_target_and_directory_entries_are_compared():
    assert compare([L], [attrs.evolve(L, target="g")])[0].field == "target"
    other = attrs.evolve(D, entries=(("f", "f"), ("g", "d")))
    diffs = compare([D], [other])
    assert [(d.path, d.field, d.source, d.replica) for d in diffs] == [("a/g", "kind", ABSENT, "d")]
    other = attrs.evolve(D, entries=(("f", "l"),))
    assert [(d.path, d.source, d.replica) for d in compare([D], [other])] == [("a/f", "f", "l")]


def test_equal_descriptions_and_both_absent_do_not_differ():
    assert compare([F, D, L, Description.absent("x")], [F, D, L, Description.absent("x")]) == []


def test_the_first_differing_field_is_reported_in_order():
    other = attrs.evolve(F, size=9, mode=0o600, mtime_ns=99)
    assert compare([F], [other])[0].field == "size"
    assert FIELDS.index("size") < FIELDS.index("mode") < FIELDS.index("mtime_ns")


def test_content_is_compared_only_where_both_sides_digested():
    assert compare([F], [attrs.evolve(F, content=None)]) == []


def test_part_digests_are_compared_as_content():
    a, b = attrs.evolve(F, content=None, part="p1"), attrs.evolve(F, content=None, part="p2")
    assert [(d.field, d.source, d.replica) for d in compare([a], [b])] == [("content", "p1", "p2")]
    assert compare([a], [a]) == []


def test_what_the_destination_cannot_hold_is_not_compared_and_is_said():
    other = attrs.evolve(F, uid=5, gid=6, xattrs=xattr_digest({"user.x": b"1"}), mtime_ns=10 + 10**9)
    holds = Holds(owners=False, xattrs=False, mtime_ns=0)
    assert compare([F], [other], holds) == []
    assert holds.not_compared() == ("uid", "gid", "xattrs", "mtime_ns")
    assert Holds().not_compared() == ()


def test_mtimes_are_compared_at_the_destinations_resolution():
    sec = Holds(mtime_ns=10**9)
    a = attrs.evolve(F, mtime_ns=5 * 10**9 + 123)
    assert compare([a], [attrs.evolve(F, mtime_ns=5 * 10**9)], sec) == []
    assert compare([a], [attrs.evolve(F, mtime_ns=6 * 10**9)], sec)[0].field == "mtime_ns"
    assert compare([a], [attrs.evolve(F, mtime_ns=5 * 10**9)], Holds())[0].field == "mtime_ns"


def test_xattrs_digest_depends_on_names_and_values_not_order():
    assert xattr_digest({"a": b"1", "b": b""}) == xattr_digest({"b": b"", "a": b"1"})
    assert xattr_digest({"a": b"1"}) != xattr_digest({"a": b"2"}) != xattr_digest({"b": b"1"})
    assert xattr_digest({"ab": b""}) != xattr_digest({"a": b"b"})
    assert xattr_digest({}) != xattr_digest({"a": b""})


# ---------------------------------------------------------------------------
# hard-link groups
# ---------------------------------------------------------------------------
def _f(path: str, ident: int, nlink: int = 2) -> Description:
    return attrs.evolve(F, path=path, ident=ident, nlink=nlink)


def test_paths_linked_in_the_source_must_be_linked_in_the_replica():
    src = [_f("a", 1), _f("b", 1)]
    dst = [_f("a", 5), _f("b", 6)]
    diffs = compare(src, dst)
    assert [(d.path, d.field, d.source, d.replica) for d in diffs] == [("b", "link", "a", "b")]


def test_paths_linked_only_in_the_replica_differ_too():
    diffs = compare([_f("a", 1), _f("b", 2)], [_f("a", 5), _f("b", 5)])
    assert [(d.path, d.field, d.source, d.replica) for d in diffs] == [("b", "link", "b", "a")]


def test_same_groups_under_other_identities_are_equal():
    src = [_f("a", 1), _f("b", 2), _f("c", 1), _f("d", 2, nlink=1)]
    dst = [_f("a", 9), _f("b", 8), _f("c", 9), _f("d", 8, nlink=1)]
    assert compare(src, dst) == []


def test_link_groups_span_batches_of_a_comparer():
    c = Comparer()
    c.feed([_f("a", 1)], [_f("a", 5)])
    c.feed([_f("b", 1)], [_f("b", 6)])
    assert [(d.path, d.field) for d in c.finish()] == [("b", "link")]


def test_files_with_one_link_on_both_sides_are_not_kept():
    c = Comparer()
    c.feed([_f("a", 1, nlink=1)], [_f("a", 5, nlink=1)])
    assert not c._linked
    c.feed([_f("b", 1, nlink=0)], [_f("b", 5, nlink=1)])  # 0: a backend that counts no links
    assert len(c._linked) == 1


# ---------------------------------------------------------------------------
# path order and the first difference
# ---------------------------------------------------------------------------
def test_differences_come_in_path_order_directory_first():
    paths = ["b", "a/z", "a", "a/b/c", "a-b", ""]
    src = [Description(path=p, kind="d", entries=()) for p in paths]
    dst = [Description.absent(p) for p in paths]
    assert [d.path for d in compare(src, dst, limit=99)] == ["", "a", "a/b/c", "a/z", "a-b", "b"]
    assert sorted(paths, key=path_key) == ["", "a", "a/b/c", "a/z", "a-b", "b"]


def test_the_limit_keeps_the_first_differences_whatever_the_feeding_order():
    c = Comparer(limit=2)
    for p in ["z", "m", "b", "y", "a"]:
        c.feed([Description(path=p, kind="d", entries=())], [Description.absent(p)])
    assert [d.path for d in c.finish()] == ["a", "b"]


@given(
    st.lists(
        st.text(alphabet="ab/\udcff", min_size=1, max_size=6).filter(lambda p: all(p.split("/"))),
        unique=True,
        min_size=1,
        max_size=12,
    )
)
def test_the_first_difference_is_the_smallest_path(paths):
    src = [Description(path=p, kind="f", size=1) for p in paths]
    dst = [Description(path=p, kind="f", size=2) for p in paths]
    first = compare(src, dst, limit=1)[0]
    assert first.path == min(paths, key=path_key)


def test_the_message_names_the_path_the_field_and_the_source_pcpi():
    d = Difference("d1/p/c", "kind", "d", ABSENT)
    assert (
        d.explain("co-g-src-000004")
        == "'d1/p/c' is absent in the replica but a directory in source PCPI co-g-src-000004"
    )
    assert (
        Difference("", "mode", 0o755, 0o700).explain("S")
        == "the qtree root: mode is 0o700 in the replica but 0o755 in source PCPI S"
    )
    assert "hard link of 'x' in the replica but of 'y'" in Difference("z", "link", "y", "x").explain("S")
    assert (
        Difference("f", "content", "ab" * 32, "cd" * 32).explain("S")
        == "'f': content is digest cdcdcdcdcdcd in the replica but digest abababababab in source PCPI S"
    )


# ---------------------------------------------------------------------------
# the touched set
# ---------------------------------------------------------------------------
def _touched(*recs) -> dict[str, bool]:
    t = Touched()
    for r in recs:
        t.add(r)
    return dict(t.paths())


def test_each_record_kind_touches_its_paths_and_the_parents_entries():
    got = _touched(
        R.Begin(qtree="q", base="a", target="b"),
        R.MkDir(path="d"),
        R.MkFile(path="d/f"),
        R.Write(path="d/f", offset=0, data=b"x"),
        R.Truncate(path="t/u", size=0),
        R.SetAttr(path="s/a", mode=0o600),
        R.SetXattr(path="x/y", name="user.a"),
        R.Symlink(path="l/k", target="z"),
        R.HardLink(path="h/1", existing="e/2"),
        R.Unlink(path="u/v"),
        R.RmDir(path="r/s"),
        R.End(records=10),
    )
    assert got == {
        "": False,
        "d": True,
        "d/f": True,
        "t/u": True,
        "s/a": True,
        "x/y": True,
        "l": False,
        "l/k": True,
        "h": False,
        "h/1": True,
        "e/2": True,
        "u": False,
        "u/v": True,
        "r": False,
        "r/s": True,
    }


def test_the_qtree_root_is_always_described_and_its_attributes_may_be_touched():
    assert _touched() == {"": False}
    assert _touched(R.SetAttr(path=R.ROOT, mtime_ns=1)) == {"": True}


def test_a_rename_touches_both_ends_and_their_parents():
    assert _touched(R.Rename(old="a/b", new="c/d")) == {"": False, "a": False, "a/b": True, "c": False, "c/d": True}


def test_paths_below_a_renamed_directory_follow_it():
    got = _touched(
        R.MkFile(path="d/f"),
        R.Write(path="d/sub/g", offset=0, data=b"1"),
        R.Rename(old="d", new="e"),
        R.Rename(old="e/sub", new=".coalesce-mv.1"),
        R.Rename(old=".coalesce-mv.1", new="z/sub"),
    )
    assert got == {
        "": False,
        "d": True,
        "e": True,
        "e/f": True,
        "e/sub": True,
        "z": False,
        "z/sub": True,
        "z/sub/g": True,
        ".coalesce-mv.1": True,
    }


def test_a_rename_onto_a_touched_path_merges_them():
    got = _touched(R.MkFile(path="n/old"), R.RmDir(path="n"), R.MkFile(path="d/f"), R.Rename(old="d", new="n"))
    assert got == {"": False, "d": True, "n": True, "n/f": True, "n/old": True}


def test_a_deep_touched_path_needs_no_recursion():
    deep = "/".join(["d"] * 2000)
    t = Touched()
    t.add(R.Write(path=deep, offset=0, data=b"x"))
    t.add(R.Rename(old="d", new="e"))
    paths = dict(t.paths())
    assert paths["e/" + "/".join(["d"] * 1999)] is True
    assert len(t) == len(paths) == 4  # "", d, e and the written file


def test_renamed_entries_are_the_tops_of_subtrees_compared_whole():
    t = Touched()
    for r in (
        R.Rename(old="a", new="b"),
        R.Rename(old="b/c", new="x/c"),
        R.Rename(old="x", new="y"),
        R.Rename(old="y/c/d", new="y/c/e"),
        R.Write(path="w", offset=0, data=b"1"),
    ):
        t.add(r)
    assert t.moved() == ["b", "y"]  # y/c and y/c/e lie below y: walked with it


def _parts(*recs) -> dict[str, tuple[tuple[int, int], ...]]:
    t = Touched()
    for r in recs:
        t.add(r)
    return dict(t.parts())


def test_a_file_only_written_in_place_is_compared_by_its_written_blocks():
    """docs/verification.md: the written ranges, aligned to fingerprint.BLOCK, merged."""
    got = _parts(
        R.Write(path="f", offset=B + 10, data=b"x" * 100),
        R.Write(path="f", offset=B + 110, data=b"y" * B),  # the next piece of the same run
        R.Write(path="f", offset=10 * B, data=b"z"),
        R.Write(path="f", offset=0, data=b"w"),  # out of order: sorted and merged at the end
        R.SetAttr(path="f", mtime_ns=5),
        R.SetXattr(path="f", name="user.a", value=b"1"),
        R.Truncate(path="f", size=20 * B + 1),  # the blocks on both sides of the new end
    )
    assert got == {"f": ((0, 3 * B), (10 * B, 11 * B), (20 * B, 21 * B))}


def test_created_renamed_linked_or_moved_files_are_compared_whole():
    """What catches a wrong identity (M3 of docs/verification.md): never by ranges."""
    got = _parts(
        R.MkFile(path="new"),
        R.Write(path="new", offset=0, data=b"1"),  # created in this update
        R.Write(path="ren", offset=0, data=b"1"),
        R.Rename(old="ren", new="ren2"),  # renamed after the write
        R.Rename(old="was", new="ren3"),
        R.Write(path="ren3", offset=0, data=b"1"),  # renamed before the write
        R.Write(path="d/f", offset=0, data=b"1"),
        R.Rename(old="d", new="e"),  # below a renamed directory
        R.Write(path="g/h", offset=0, data=b"1"),
        R.Rename(old="g", new="g2"),
        R.Rename(old="g2", new="g"),  # back at its name, still moved
        R.Write(path="l", offset=0, data=b"1"),
        R.HardLink(path="l2", existing="l"),  # a new link of it
        R.Write(path="u", offset=0, data=b"1"),
        R.Unlink(path="u"),
        R.Write(path="kept", offset=B, data=b"1"),
    )
    assert got == {"kept": ((B, 2 * B),)}


def test_a_file_whose_records_wrote_nothing_is_compared_whole():
    """Attributes or a size alone: its content is compared whole, as a lost Write would leave it."""
    assert (
        _parts(R.SetAttr(path="f", mtime_ns=1), R.SetXattr(path="g", name="user.a"), R.Truncate(path="h", size=0)) == {}
    )


def test_a_file_patched_in_too_many_pieces_is_compared_whole():
    recs = [R.Write(path="f", offset=2 * i * B, data=b"1") for i in range(MAX_PARTS + 1)]
    assert _parts(*recs[:MAX_PARTS]) == {"f": tuple((2 * i * B, (2 * i + 1) * B) for i in range(MAX_PARTS))}
    assert _parts(*recs) == {}


def test_the_touched_set_refuses_what_is_not_a_record():
    with pytest.raises(TypeError):
        Touched().add(object())


# ---------------------------------------------------------------------------
# batches and whole images
# ---------------------------------------------------------------------------
def _image(tree: dict[str, Description]):
    def describe(batch):
        return [
            attrs.evolve(tree[p], content=tree[p].content if c else None) if p in tree else Description.absent(p)
            for p, c in batch
        ]

    return describe


def _tree(**files: str) -> dict[str, Description]:
    """A tree of files (path -> content) with their directories."""
    out: dict[str, Description] = {}
    dirs: dict[str, set] = {"": set()}
    for path, data in files.items():
        parts = path.split("/")
        for i in range(len(parts)):
            parent, name = "/".join(parts[:i]), parts[i]
            kind = "f" if i == len(parts) - 1 else "d"
            dirs.setdefault(parent, set()).add((name, kind))
            if kind == "d":
                dirs.setdefault("/".join(parts[: i + 1]), set())
        out[path] = Description(path=path, kind="f", size=len(data), content=data, mode=0o644)
    for d, entries in dirs.items():
        out[d] = Description(path=d, kind="d", mode=0o755, entries=tuple(sorted(entries)))
    return out


def _both_of(src: dict[str, Description], dst: dict[str, Description]):
    return lambda chunk: (_image(src)(chunk), _image(dst)(chunk))


def test_a_directory_moved_whole_to_a_wrong_place_differs_below_it():
    """The records rename n/p1 and p1 only: the swapped files below them are named by no record."""
    src = _tree(**{"n/p1/p2/f": "long bytes", "p1/p2/f": "short"})
    dst = dict(src)
    dst["n/p1/p2/f"], dst["p1/p2/f"] = (
        attrs.evolve(src["p1/p2/f"], path="n/p1/p2/f"),
        attrs.evolve(src["n/p1/p2/f"], path="p1/p2/f"),
    )
    out = compare_subtrees(["n/p1", "p1"], _both_of(src, dst))
    assert [(d.path, d.field) for d in out.differences] == [("n/p1/p2/f", "size")]
    assert compare_subtrees(["n/p1", "p1"], _both_of(src, src)).ok


def test_a_subtree_walk_finds_names_on_one_side_only_and_never_reads_content():
    src = _tree(**{"m/a": "1", "m/b/c": "2"})
    dst = _tree(**{"m/a": "1", "m/b/c": "2", "m/b/extra": "3"})
    asked = []

    def both(chunk):
        asked.extend(chunk)
        return _image(src)(chunk), _image(dst)(chunk)

    out = compare_subtrees(["m"], both)
    assert [(d.path, d.field) for d in out.differences] == [("m/b/extra", "kind")]
    assert not any(content for _p, content in asked)
    assert compare_subtrees([], both).ok and compare_subtrees([], both).checked == 0


def _touched_by(*recs) -> Touched:
    t = Touched()
    for r in recs:
        t.add(r)
    return t


def _counting(src: dict[str, Description], dst: dict[str, Description], asked: list[str]):
    def both(chunk):
        asked.extend(p for p, _c in chunk)
        return _image(src)(chunk), _image(dst)(chunk)

    return both


def test_split_gives_the_parents_first_and_each_other_path_with_its_parent():
    t = _touched_by(R.Rename(old="a/b", new="c/d"), R.MkDir(path="c/d/e"), R.Write(path="w/x", offset=0, data=b"1"))
    parents, leaves = t.split()
    assert parents == [("", False), ("a", False), ("c", False), ("c/d", True)]
    assert leaves == [("a/b", True, "a"), ("c/d/e", True, "c/d"), ("w/x", True, None)]
    assert sorted([p for p, _c in parents] + [p for p, _c, _u in leaves], key=path_key) == [p for p, _c in t.paths()]


def test_compare_touched_does_not_describe_the_absent_ends_of_renames():
    """After renames of each file into the next directory, the old names are absent on both
    sides: their parents' entries say so, and they are never described."""
    src = _tree(**{"d1/f2": "2", "d2/f1": "1"})
    recs = (R.Rename(old="d1/f1", new="d2/f1"), R.Rename(old="d2/f2", new="d1/f2"))
    asked: list[str] = []
    out = compare_touched(_touched_by(*recs), _counting(src, dict(src), asked))
    assert out.ok and out.checked == 5
    assert sorted(asked) == ["", "d1", "d1/f2", "d2", "d2/f1"]


def test_compare_touched_finds_a_name_the_replica_kept_and_the_source_lost():
    """I3: the replica still holds a removed entry: its parent's entries differ."""
    src = _tree(**{"d/g": "1"})
    dst = _tree(**{"d/g": "1", "d/f": "old"})
    out = compare_touched(_touched_by(R.Unlink(path="d/f")), _both_of(src, dst))
    assert [(d.path, d.field, d.source, d.replica) for d in out.differences] == [("d/f", "kind", ABSENT, "f")]


def test_compare_touched_reports_the_first_difference_in_path_order_when_a_parent_differs():
    """A parent that differs sends the check back to every path, so an earlier leaf wins."""
    src = _tree(**{"a/f": "1", "b/g": "2"})
    dst = _tree(**{"a/f": "X", "b/g": "2", "b/h": "3"})
    recs = (R.Write(path="a/f", offset=0, data=b"1"), R.MkFile(path="b/g"))
    out = compare_touched(_touched_by(*recs), _both_of(src, dst))
    assert [(d.path, d.field) for d in out.differences] == [("a/f", "content")]


def test_compare_touched_walks_below_renamed_directories_only():
    """The m3 scenario: directories moved whole to a wrong place are walked below; a renamed
    file is compared as a touched path and not walked again."""
    src = _tree(**{"n/p1/p2/f": "long bytes", "p1/p2/f": "short", "x": "1"})
    dst = dict(src)
    dst["n/p1/p2/f"], dst["p1/p2/f"] = (
        attrs.evolve(src["p1/p2/f"], path="n/p1/p2/f"),
        attrs.evolve(src["n/p1/p2/f"], path="p1/p2/f"),
    )
    recs = (R.Rename(old="p1", new="t"), R.Rename(old="n/p1", new="p1"), R.Rename(old="t", new="n/p1"))
    out = compare_touched(_touched_by(*recs), _both_of(src, dst))
    assert [(d.path, d.field) for d in out.differences] == [("n/p1/p2/f", "size")]
    asked: list[str] = []
    assert compare_touched(_touched_by(R.Rename(old="y", new="x")), _counting(src, dict(src), asked)).ok
    assert sorted(asked) == ["", "x"]


def test_compare_paths_stops_at_the_first_batch_with_a_difference():
    src = _tree(**{f"f{i:03d}": "x" for i in range(100)})
    dst = dict(src)
    dst["f010"] = attrs.evolve(dst["f010"], content="y")
    dst["f090"] = attrs.evolve(dst["f090"], content="y")
    calls = []

    def both(chunk):
        calls.append(len(chunk))
        return _image(src)(chunk), _image(dst)(chunk)

    out = compare_paths([(f"f{i:03d}", True) for i in range(100)], both, batch=20)
    assert [d.path for d in out.differences] == ["f010"] and calls == [20]
    out = compare_paths([(f"f{i:03d}", False) for i in range(100)], both, batch=20)
    assert out.ok and out.checked == 100


def test_a_whole_image_walk_finds_each_difference_once_in_path_order():
    src = _tree(**{"a/b/c": "1", "a/d": "2", "e": "3", "g/h": "4"})
    dst = _tree(**{"a/b/c": "1", "a/d": "9", "e/x": "3", "i": "5"})
    out = tree_compare(generic_tree(_image(src), True), generic_tree(_image(dst), True), limit=10)
    got = [(d.path, d.field, d.source, d.replica) for d in out.differences]
    assert got == [
        ("a/d", "content", "2", "9"),
        ("e", "kind", "f", "d"),
        ("g", "kind", "d", ABSENT),
        ("i", "kind", ABSENT, "f"),
    ]
    same = tree_compare(generic_tree(_image(src), True), generic_tree(_image(src), True))
    assert same.ok and same.checked == len(src)


def test_a_whole_image_walk_without_content_ignores_bytes():
    src = _tree(**{"a": "1"})
    dst = _tree(**{"a": "2"})
    assert tree_compare(generic_tree(_image(src), False), generic_tree(_image(dst), False)).ok


def test_a_missing_qtree_is_one_difference():
    src = _tree(**{"a/b": "1"})
    out = tree_compare(generic_tree(_image(src), True), iter([Description.absent("")]))
    assert [(d.path, d.replica) for d in out.differences] == [("", ABSENT)]


def test_generic_tree_is_in_path_order_and_batches_large_directories():
    src = _tree(**{f"d/f{i:04d}": "x" for i in range(50)}, **{"d-e": "y", "c": "z"})
    sizes = []

    def describe(batch):
        sizes.append(len(batch))
        return _image(src)(batch)

    paths = [d.path for d in generic_tree(describe, False, batch=16)]
    assert paths == sorted(src, key=path_key)
    assert max(sizes) == 16


# ---------------------------------------------------------------------------
# the background schedule
# ---------------------------------------------------------------------------
def test_nothing_is_due_without_replicas_or_a_period():
    assert due_for_verification({}, [], 100, 0) is None
    assert due_for_verification({}, ["A"], 0, 0) is None


def test_replicas_never_verified_come_first_by_name():
    assert due_for_verification({"A": 0.0}, ["A", "B", "C"], 300, 1000) == "B"


def test_verifications_are_spread_over_the_replicas_in_turn():
    every, names = 300.0, ["A", "B", "C"]
    last = {n: 0.0 for n in names}
    now, order = 0.0, []
    while now < 1200:
        now += 10
        name = due_for_verification(last, names, every, now)
        if name is not None:
            last[name] = now
            order.append((now, name))
    assert [n for _t, n in order][:6] == ["A", "B", "C", "A", "B", "C"]
    times = [t for t, _n in order]
    assert all(b - a >= every / 3 for a, b in zip(times, times[1:]))
    for n in names:  # each replica about once per period
        mine = [t for t, m in order if m == n]
        assert all(b - a <= every + 10 for a, b in zip(mine, mine[1:]))


def test_a_recent_verification_of_any_replica_delays_the_next():
    assert due_for_verification({"A": 0.0, "B": 95.0}, ["A", "B"], 200, 150) is None
    assert due_for_verification({"A": 0.0, "B": 95.0}, ["A", "B"], 200, 196) == "A"
