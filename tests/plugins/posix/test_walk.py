"""coalesce_posix.walk: the tree compare that zfs (and the generic rollback) diff with."""

from __future__ import annotations

import errno
import os

from hypothesis import given
from hypothesis import strategies as st

from coalesce_core.stream.records import HardLink, MkFile, RmDir, SetAttr, Write, framed
from coalesce_posix import walk
from coalesce_posix.apply import Applier


def _tree(root, files):
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def test_a_file_system_without_xattrs_is_asked_once_per_image(tmp_path, monkeypatch):
    """zfs-fuse's read clones answer listxattr with EOPNOTSUPP, each time (a FUSE round trip)."""
    base, target = tmp_path / "b", tmp_path / "t"
    files = {f"d{i % 3}/f{i}": b"x" * 10 for i in range(30)}
    _tree(base, files)
    _tree(target, {k: b"y" * 10 for k in files})
    asked: list[str] = []

    def listxattr(path, follow_symlinks=True):
        asked.append(str(path))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", str(path))

    monkeypatch.setattr(os, "listxattr", listxattr)
    recs = list(walk.tree_diff(str(base), str(target), same_lineage=False))
    assert sum(1 for r in recs if type(r) is Write) == 30  # every file's new data
    from_base = [p for p in asked if p.startswith(str(base))]
    from_target = [p for p in asked if p.startswith(str(target))]
    assert len(from_base) == 1 and len(from_target) == 1  # was once per file and directory


def test_outside_a_diff_and_on_file_systems_with_xattrs_nothing_is_cached(tmp_path, monkeypatch):
    _tree(tmp_path / "b", {"f": b"1"})
    _tree(tmp_path / "t", {"f": b"2"})
    calls: list[str] = []
    real = os.listxattr

    def listxattr(path, follow_symlinks=True):
        calls.append(str(path))
        return real(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "listxattr", listxattr)
    list(walk.tree_diff(str(tmp_path / "b"), str(tmp_path / "t"), same_lineage=False))
    n = len(calls)
    assert n >= 2  # both copies of the changed file were asked
    walk.read_xattrs(str(tmp_path / "t" / "f"))
    assert len(calls) == n + 1  # after the diff ended, a read asks the file system again


def test_a_one_chunk_file_whose_size_changed_is_sent_without_reading_its_base_copy(tmp_path, monkeypatch):
    base, target = tmp_path / "b", tmp_path / "t"
    _tree(
        base,
        {
            "grow": b"a" * 100,
            "shrink": b"b" * 5000,
            "same_size": b"c" * 300,
            "same": b"s" * 10,
            "big": b"d" * 2_000_000,
            "empty": b"",
        },
    )
    _tree(
        target,
        {
            "grow": b"a" * 100 + b"e" * 50,
            "shrink": b"f" * 10,
            "same_size": b"c" * 299 + b"g",
            "same": b"s" * 10,
            "big": b"d" * 1_000_000 + b"h" + b"d" * 999_999,
            "empty": b"\0" * 100,
        },
    )
    opened: list[str] = []
    real_open = os.open

    def spy(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    recs = list(walk.tree_diff(str(base), str(target), same_lineage=False))
    monkeypatch.undo()
    base_reads = sorted(os.path.basename(p) for p in opened if p.startswith(str(base) + "/"))
    # equal sizes (or more than one chunk) are compared chunk by chunk; other sizes need no compare
    assert base_reads == ["big", "same", "same_size"]
    assert not [r for r in recs if getattr(r, "path", None) == "same" and type(r).__name__ != "SetAttr"]
    # and applied to the base copy, the records give the target exactly
    import coalesce_mem

    url = f"mem://walk-{os.getpid()}"
    v = coalesce_mem.volume_for(url)
    try:
        v.apply("q", framed("q", None, "s1", walk.baseline_records(str(base))), False)
        v.apply("q", framed("q", "s1", "s2", iter(recs)), False)
        for name in ("grow", "shrink", "same_size", "same", "big", "empty"):
            assert v.read_file(f"q/{name}") == (target / name).read_bytes(), name
    finally:
        coalesce_mem.forget(url)


# ---------------------------------------------------------------------------
# a new file's zeros stay holes
# ---------------------------------------------------------------------------
_BLOCKS = st.lists(st.tuples(st.sampled_from([0, 1, 7]), st.integers(1, 3 * walk.ZERO_BLOCK)), min_size=0, max_size=8)


@given(offset=st.integers(0, 3 * walk.ZERO_BLOCK), runs=_BLOCKS)
def test_nonzero_pieces_keep_every_byte_and_leave_only_whole_aligned_zero_blocks(offset, runs):
    data = b"".join(bytes([v]) * n for v, n in runs)
    pieces = list(walk.nonzero_pieces(offset, data))
    rebuilt = bytearray(len(data))
    end = offset
    for at, piece in pieces:
        assert piece and at >= end  # in order, never empty, never overlapping
        rebuilt[at - offset : at - offset + len(piece)] = piece
        end = at + len(piece)
    assert bytes(rebuilt) == data
    # what is left out is zeros, and only whole blocks of them, aligned in the file (or the tail)
    covered = [(at, at + len(p)) for at, p in pieces]
    gaps = [
        (a, b) for a, b in zip([offset] + [e for _s, e in covered], [s for s, _e in covered] + [offset + len(data)])
    ]
    for a, b in gaps:
        if a == b:
            continue
        assert a % walk.ZERO_BLOCK == 0 or a == offset + len(data), (a, b)
        assert b % walk.ZERO_BLOCK == 0 or b == offset + len(data), (a, b)


def test_a_chunk_with_one_island_of_data_is_written_as_the_island():
    """zfs-fuse reads a sparse file's holes as zeros: a 1 MiB chunk with 4 KiB of data at 512 KiB
    must not be written whole into a new file (found by the long differential run on zfs-fuse)."""
    data = bytes(512 << 10) + b"\x01" * 4096 + bytes((512 << 10) - 4096)
    assert list(walk.nonzero_pieces(8 << 20, data)) == [((8 << 20) + (512 << 10), b"\x01" * 4096)]
    assert list(walk.nonzero_pieces(0, bytes(1 << 20))) == []
    assert list(walk.nonzero_pieces(100, b"\x02" * 10)) == [(100, b"\x02" * 10)]


def test_compare_range_writes_only_the_blocks_that_differ(tmp_path):
    """A range that runs past the old size compares against zeros there (it compared a shorter
    read, found it different and wrote the whole chunk: on zfs-fuse a sparse file extended by one
    byte got 900 KiB of its hole written as zeros); within a differing chunk only the differing
    4 KiB blocks are written, so the old copy's holes that the new one keeps stay holes."""
    size = 16 << 20
    base, target = tmp_path / "b", tmp_path / "t"
    for p, extra in ((base, 0), (target, 1)):
        with open(p, "wb") as f:
            f.truncate(size + extra)
            f.seek(8 << 20)
            f.write(b"x" * 70_000)
    with open(target, "r+b") as f:  # one byte changed inside the island, one block of a hole filled
        f.seek((8 << 20) + 5)
        f.write(b"y")
        f.seek(size - 3 * 4096)
        f.write(b"z")
    bfd, tfd = os.open(base, os.O_RDONLY), os.open(target, os.O_RDONLY)
    try:
        writes = list(walk.compare_range(bfd, tfd, "f", size, size - (1 << 20) + 1, size + 1))
        assert [(w.offset, len(w.data)) for w in writes] == [(size - 3 * 4096, 4096)]
        writes = list(walk.compare_range(bfd, tfd, "f", size, 0, size + 1))
        assert [(w.offset, len(w.data)) for w in writes] == [((8 << 20), 4096), (size - 3 * 4096, 4096)]
    finally:
        os.close(bfd)
        os.close(tfd)


def _linked_trees(tmp_path):
    """A base with k/y, a target where y got a new name b that sorts before k."""
    base, target = tmp_path / "base" / "q", tmp_path / "target" / "q"
    for side in (base, target):
        (side / "k").mkdir(parents=True)
        (side / "k" / "y").write_bytes(b"one")
    (target / "k" / "y").write_bytes(b"one and more")
    os.link(target / "k" / "y", target / "b")
    return base, target


def test_tree_diff_makes_a_new_name_a_link_of_the_kept_one(tmp_path):
    """tree_diff walks in name order and meets the new name b before the kept k/y (on its own it
    created b as another file); tree_diff holds b back (walk.KeptLinks) and b becomes a HardLink of k/y."""
    base, target = _linked_trees(tmp_path)
    records = list(walk.tree_diff(str(base), str(target), same_lineage=False))
    applied = tmp_path / "applied"
    (applied / "q" / "k").mkdir(parents=True)
    (applied / "q" / "k" / "y").write_bytes(b"one")
    Applier(str(applied), "q", None).apply(framed("q", "a", "b", records))
    assert (applied / "q" / "b").read_bytes() == b"one and more"
    assert HardLink(path="b", existing="k/y") in records
    assert os.path.samefile(applied / "q" / "b", applied / "q" / "k" / "y")


def test_tree_diff_creates_a_file_without_kept_names_once(tmp_path):
    """A new file with two new names: created once (at the first name), the other name linked to it."""
    base, target = tmp_path / "base", tmp_path / "target"
    base.mkdir()
    target.mkdir()
    (target / "a").write_bytes(b"data")
    os.link(target / "a", target / "z")
    records = list(walk.tree_diff(str(base), str(target), same_lineage=False))
    assert [type(r).__name__ for r in records if not isinstance(r, SetAttr)][:3] == ["MkFile", "Write", "HardLink"]
    assert HardLink(path="z", existing="a") in records


def test_a_kept_file_that_gained_a_name_sorting_before_its_kept_name_stays_one_file(tmp_path):
    """Same lineage, as btrfs falls back to it when qtree roots rotate: the base has p; the target has
    p (the same inode, a link added since) and its new name d, met first; d becomes a HardLink of p,
    never a second file (the differential regression 'a hard link kept after qtree roots rotate')."""
    base, target = tmp_path / "base", tmp_path / "target"
    base.mkdir()
    (base / "p").write_bytes(b"same")
    os.link(base / "p", tmp_path / "elsewhere")  # the base's file has a name in another qtree
    target.mkdir()
    os.link(base / "p", target / "p")  # the same inode in both images
    os.link(base / "p", target / "d")
    records = list(walk.tree_diff(str(base), str(target)))
    assert HardLink(path="d", existing="p") in records
    assert not any(isinstance(r, MkFile) and r.path == "d" for r in records)
    applied = tmp_path / "applied"
    (applied / "q").mkdir(parents=True)
    (applied / "q" / "p").write_bytes(b"same")
    Applier(str(applied), "q", None).apply(framed("q", "a", "b", records))
    assert os.path.samefile(applied / "q" / "d", applied / "q" / "p")


def test_a_1_tib_sparse_file_changed_in_place_is_compared_at_the_cost_of_its_data(tmp_path, monkeypatch):
    """The tree compare (btrfs falls back to it when qtree roots rotate) of a sparse file that is
    the same inode in both images: it reads the copies' data segments, never their holes (it read
    the whole TiB in the search for zero blocks written over data; the long differential run)."""
    base, target = tmp_path / "b", tmp_path / "t"
    base.mkdir()
    target.mkdir()
    tib = 1 << 40
    with open(base / "s", "wb") as f:
        f.truncate(tib)
        f.seek(1 << 20)
        f.write(b"x" * 8192)
    os.link(base / "s", tmp_path / "keep")  # the target's copy: another file with the same start
    with open(target / "s", "wb") as f:
        f.truncate(tib)
        f.seek(1 << 20)
        f.write(bytes(8192))  # zeros written over the old data
        f.seek(tib - 4096)
        f.write(b"end")
    read = [0]
    real = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        read[0] += n
        assert read[0] < 64 << 20, f"read {read[0]} bytes of two 1 TiB sparse files holding 12 KiB"
        return real(fd, n, off)

    monkeypatch.setattr(walk.os, "pread", pread)
    records = list(walk.tree_diff(str(base), str(target), same_lineage=False))
    writes = [r for r in records if isinstance(r, Write)]
    assert any(w.offset == tib - 4096 and w.data.startswith(b"end") for w in writes)


def test_a_directory_replaced_by_another_with_the_same_mtime_gets_its_setattr(tmp_path):
    """Two directories at one path, changed within one tick of the kernel's clock, carry the same
    mtime: the compare finds their attributes equal, yet its RmDir moves the replica's directory's
    mtime; tree_diff gives it a SetAttr from the target (walk.stamped; the differential regression
    'an entry's mtime after qtree roots rotate')."""
    base, target = tmp_path / "b", tmp_path / "t"
    (base / "d" / "a").mkdir(parents=True)
    (target / "d").mkdir(parents=True)
    t = 1_700_000_000_123_456_789
    for p in (base / "d", target / "d"):
        os.utime(p, ns=(t, t))
    records = list(walk.tree_diff(str(base), str(target)))
    assert RmDir(path="d/a") in records
    assert any(isinstance(r, SetAttr) and r.path == "d" and r.mtime_ns == t for r in records), records


def _dir_then_symlink(tmp_path, link_target):
    """A base where a/s/f is a file in directories a/s; a target where a is a symlink to ``link_target``
    and the old directory a lives on as b (the zfs differential regression 'a removed directory's path
    is a symlink in the newer image')."""
    base, target = tmp_path / "b", tmp_path / "t"
    (base / "a" / "s").mkdir(parents=True)
    (base / "a" / "s" / "f").write_bytes(b"x")
    (target / "b" / "s").mkdir(parents=True)
    (target / "b" / "s" / "f").write_bytes(b"x")
    os.symlink(link_target, target / "a")
    return base, target


def test_a_removed_directorys_path_through_a_self_loop_symlink_is_no_entry_of_the_target(tmp_path):
    """The removal of a/s/f moves a/s's mtime; in the target a is a symlink to itself: a/s is no entry
    there, so it gets no SetAttr, and the compare does not fail with ELOOP (walk.stamped looked a/s up
    through the symlink)."""
    base, target = _dir_then_symlink(tmp_path, "a")
    records = list(walk.tree_diff(str(base), str(target)))
    assert RmDir(path="a/s") in records
    assert not any(isinstance(r, SetAttr) and r.path.startswith("a/") for r in records), records
    applied = tmp_path / "applied"
    (applied / "q" / "a" / "s").mkdir(parents=True)
    (applied / "q" / "a" / "s" / "f").write_bytes(b"x")
    Applier(str(applied), "q", None).apply(framed("q", "a", "b", records))
    assert os.readlink(applied / "q" / "a") == "a"
    assert (applied / "q" / "b" / "s" / "f").read_bytes() == b"x"


def test_a_removed_directorys_path_through_a_symlink_to_a_directory_is_no_entry_of_the_target(tmp_path):
    """As above with a a symlink to the directory b: a/s resolves through it to b/s, another entry;
    a SetAttr of a/s made the applier refuse to write through the symlink (HostilePath) for ever."""
    base, target = _dir_then_symlink(tmp_path, "b")
    records = list(walk.tree_diff(str(base), str(target)))
    assert not any(isinstance(r, SetAttr) and r.path.startswith("a/") for r in records), records
    applied = tmp_path / "applied"
    (applied / "q" / "a" / "s").mkdir(parents=True)
    (applied / "q" / "a" / "s" / "f").write_bytes(b"x")
    Applier(str(applied), "q", None).apply(framed("q", "a", "b", records))
    assert os.readlink(applied / "q" / "a") == "b"


def test_lstat_below_never_follows_a_symlink_on_the_way(tmp_path):
    (tmp_path / "d" / "s").mkdir(parents=True)
    os.symlink("d", tmp_path / "to-d")
    os.symlink("loop", tmp_path / "loop")
    (tmp_path / "f").write_bytes(b"")
    assert walk.lstat_below(str(tmp_path), "d/s").st_ino == os.lstat(tmp_path / "d" / "s").st_ino
    assert walk.lstat_below(str(tmp_path), "to-d").st_ino == os.lstat(tmp_path / "to-d").st_ino  # the link itself
    assert walk.lstat_below(str(tmp_path), "") is not None
    for rel in ("to-d/s", "loop/s", "loop/s/t", "f/s", "missing/s", "missing"):
        assert walk.lstat_below(str(tmp_path), rel) is None, rel
    deep = "/".join(["n" * 200] * 25)  # longer than PATH_MAX
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for comp in deep.split("/"):
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    assert walk.lstat_below(str(tmp_path), deep) is not None
