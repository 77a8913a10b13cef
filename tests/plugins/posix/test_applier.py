"""The POSIX applier, tree walker, tree diff and export table (coalesce_posix), on the local disk."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import CorruptStream, HostilePath, StreamError
from coalesce_core.stream import records as R
from coalesce_posix import Applier, ExportTable, walk
from coalesce_posix.exports import parse_under


def raw(cls, **fields):
    """A record that bypasses its validators, as a hostile producer would send it."""
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


@pytest.fixture
def vol(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    return root, outside


def apply(root, records, qtree="q", purgatory=None):
    return Applier(str(root), qtree, str(purgatory) if purgatory else None).apply(R.framed(qtree, None, "t", records))


def snapshot_of(path):
    """Everything under ``path`` (names, types, bytes, link targets) for before/after comparisons."""
    out = {}
    for rel, st in walk.iter_tree(str(path)):
        full = os.path.join(path, rel)
        if stat.S_ISREG(st.st_mode):
            out[rel] = ("f", open(full, "rb").read(), st.st_mode)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(full))
        else:
            out[rel] = ("d", st.st_mode)
    return out


# ---------------------------------------------------------------------------
# hostile paths (I10)
# ---------------------------------------------------------------------------
HOSTILE = [
    ("dotdot", raw(R.MkFile, path="../evil", mode=0o644)),
    ("dotdot-inner", raw(R.MkDir, path="d/../../evil", mode=0o755)),
    ("absolute", raw(R.MkFile, path="/tmp/coalesce-evil", mode=0o644)),
    ("write-through-symlink-dir", R.Write(path="evil/secret", offset=0, data=b"pwned")),
    ("create-through-symlink-dir", R.MkFile(path="evil/new")),
    ("mkdir-through-symlink-dir", R.MkDir(path="evil/newdir")),
    ("symlink-through-symlink-dir", R.Symlink(path="evil/ln", target="x")),
    ("truncate-through-symlink-dir", R.Truncate(path="evil/secret", size=0)),
    ("unlink-through-symlink-dir", R.Unlink(path="evil/secret")),
    ("chmod-through-symlink-dir", R.SetAttr(path="evil/secret", mode=0o777)),
    ("xattr-through-symlink-dir", R.SetXattr(path="evil/secret", name="user.x", value=b"1")),
    ("rename-into-symlink-dir", R.Rename(old="f", new="evil/stolen")),
    ("rename-out-of-symlink-dir", R.Rename(old="evil/secret", new="stolen")),
    ("hardlink-out-of-qtree", raw(R.HardLink, path="hl", existing="../outside/secret")),
    ("hardlink-absolute", raw(R.HardLink, path="hl", existing="/etc/passwd")),
    ("hardlink-through-symlink-dir", R.HardLink(path="hl", existing="evil/secret")),
    ("write-to-symlink-file", R.Write(path="evilf", offset=0, data=b"pwned")),
    ("truncate-symlink-file", R.Truncate(path="evilf", size=0)),
]


@pytest.mark.parametrize("label,rec", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("purg", [False, True])
def test_hostile_records_are_refused_and_write_nothing(vol, label, rec, purg, tmp_path):
    root, outside = vol
    apply(
        root,
        [
            R.MkFile(path="f"),
            R.Write(path="f", offset=0, data=b"mine"),
            R.MkDir(path="d"),
            R.Symlink(path="evil", target=str(outside)),
            R.Symlink(path="evilf", target=str(outside / "secret")),
        ],
    )
    before_q, before_out = snapshot_of(root), snapshot_of(outside)
    accepted = (HostilePath,) if not label.startswith(("write-to", "truncate-symlink")) else (StreamError,)
    with pytest.raises(accepted):
        apply(root, [rec], purgatory=tmp_path / "purg" if purg else None)
    assert snapshot_of(outside) == before_out, "something outside the qtree changed"
    assert snapshot_of(root) == before_q, "the hostile record changed the qtree"
    assert not os.path.exists("/tmp/coalesce-evil")


def test_qtree_that_is_a_symlink_is_refused(vol):
    root, outside = vol
    os.symlink(str(outside), root / "q")
    with pytest.raises(HostilePath):
        apply(root, [R.MkFile(path="new")])
    assert sorted(os.listdir(outside)) == ["secret"]


def test_hostile_qtree_names(vol):
    root, _ = vol
    for q in ("..", "a/b", "/abs", ""):
        with pytest.raises(HostilePath):
            Applier(str(root), q, None)


# ---------------------------------------------------------------------------
# what the applier preserves
# ---------------------------------------------------------------------------
def test_sparse_files_keep_their_holes(vol):
    root, _ = vol
    size = 64 << 20
    apply(
        root,
        [
            R.MkFile(path="sparse"),
            R.Truncate(path="sparse", size=size),
            R.Write(path="sparse", offset=32 << 20, data=b"middle"),
            R.Write(path="sparse", offset=size - 3, data=b"end"),
        ],
    )
    p = root / "q" / "sparse"
    st = os.stat(p)
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20, "the holes were filled"
    data = open(p, "rb").read()
    assert data[32 << 20 : (32 << 20) + 6] == b"middle" and data.endswith(b"end") and data.count(0) == size - 9
    # and a baseline read of it keeps the holes too (no Write of zeros)
    recs = list(walk.baseline_records(str(root / "q")))
    assert sum(len(r.data) for r in recs if isinstance(r, R.Write)) < 2 << 20


def test_modes_owners_times_xattrs(vol):
    root, _ = vol
    apply(
        root,
        [
            R.MkDir(path="d", mode=0o700),
            R.MkFile(path="d/f", mode=0o600),
            R.Write(path="d/f", offset=0, data=b"x"),
            R.Symlink(path="ln", target="d/f"),
            R.SetXattr(path="d/f", name="user.k", value=b"v"),
            R.SetXattr(path="d", name="user.dir", value=b"1"),
            R.SetAttr(path="d/f", mode=0o4751, uid=1234, gid=5678, mtime_ns=1_000_000_123),
            R.SetAttr(path="ln", uid=4321, gid=8765, mtime_ns=2_000_000_000),
            R.SetAttr(path="d", mode=0o751, mtime_ns=3_000_000_000),
        ],
    )
    q = root / "q"
    st = os.lstat(q / "d" / "f")
    assert stat.S_IMODE(st.st_mode) == 0o4751 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_000_000_123
    lst = os.lstat(q / "ln")
    assert (lst.st_uid, lst.st_gid, lst.st_mtime_ns) == (4321, 8765, 2_000_000_000)
    assert os.stat(q / "d" / "f").st_uid == 1234  # the target was not changed through the link
    assert os.getxattr(q / "d" / "f", "user.k") == b"v" and os.getxattr(q / "d", "user.dir") == b"1"
    d = os.lstat(q / "d")
    assert stat.S_IMODE(d.st_mode) == 0o751 and d.st_mtime_ns == 3_000_000_000
    apply(root, [R.SetXattr(path="d/f", name="user.k", value=None), R.SetXattr(path="d/f", name="user.k", value=None)])
    assert "user.k" not in os.listxattr(q / "d" / "f")


def test_hard_links_and_renames(vol):
    root, _ = vol
    apply(
        root,
        [
            R.MkFile(path="a"),
            R.Write(path="a", offset=0, data=b"1"),
            R.MkDir(path="d"),
            R.HardLink(path="d/b", existing="a"),
            R.Rename(old="d", new="e"),
            R.Rename(old="a", new="e/a"),
        ],
    )
    q = root / "q"
    assert os.stat(q / "e" / "a").st_ino == os.stat(q / "e" / "b").st_ino
    assert not os.path.exists(q / "a") and not os.path.exists(q / "d")


def test_purgatory_receives_deleted_and_replaced_entries(vol, tmp_path):
    root, _ = vol
    purg = root / ".coalesce-purgatory" / "q"
    apply(
        root,
        [
            R.MkFile(path="gone"),
            R.MkFile(path="replaced"),
            R.Write(path="replaced", offset=0, data=b"old"),
            R.MkDir(path="dir"),
        ],
    )
    apply(
        root,
        [
            R.Unlink(path="gone"),
            R.MkFile(path="replaced"),
            R.Write(path="replaced", offset=0, data=b"new"),
            R.RmDir(path="dir"),
        ],
        purgatory=purg,
    )
    kept = sorted(n.split(".", 2)[2] for n in os.listdir(purg))
    assert kept == ["gone", "replaced"]
    assert sorted(os.listdir(root / "q")) == ["replaced"]
    assert open(root / "q" / "replaced", "rb").read() == b"new"


def test_replay_is_idempotent(vol):
    root, _ = vol
    recs = [
        R.MkDir(path="d"),
        R.MkFile(path="d/f"),
        R.Write(path="d/f", offset=0, data=b"abc"),
        R.Symlink(path="l", target="x"),
        R.HardLink(path="h", existing="d/f"),
        R.Rename(old="d/f", new="g"),
        R.Unlink(path="missing"),
        R.RmDir(path="missing-dir"),
        R.SetAttr(path="g", mode=0o600),
    ]
    apply(root, recs)
    first = walk.fingerprint(str(root / "q"))
    apply(root, recs[5:])  # replay of the tail after a crash
    assert walk.fingerprint(str(root / "q")) == first


def test_mismatching_stream_is_a_stream_error(vol):
    root, _ = vol
    with pytest.raises(CorruptStream):
        apply(root, [R.Write(path="nope", offset=0, data=b"x")])
    with pytest.raises(CorruptStream):
        apply(root, [R.MkFile(path="missing-dir/f")])
    apply(root, [R.MkDir(path="d"), R.MkFile(path="d/f")])
    with pytest.raises(CorruptStream):
        apply(root, [R.RmDir(path="d")])


# ---------------------------------------------------------------------------
# the directory-descriptor cache
# ---------------------------------------------------------------------------
def test_descriptor_cache_follows_directory_renames(vol, tmp_path):
    root, _ = vol
    apply(
        root,
        [
            R.MkDir(path="p"),
            R.MkDir(path="p/c"),
            R.MkFile(path="p/c/f"),  # p and p/c are cached now
            R.Rename(old="p", new="moved"),  # ... and moved, with p/c
            R.MkDir(path="p"),
            R.MkDir(path="p/c"),
            R.MkFile(path="p/c/g"),  # the new p/c, not the cached one
            R.MkFile(path="moved/c/h"),
            R.Unlink(path="p/c/g"),
            R.Rename(old="moved/c/h", new="moved/c/h2"),  # files: the cache stays
            R.MkFile(path="p/c/i"),
            R.MkFile(path="moved/c/j"),
        ],
        purgatory=tmp_path / "purg",
    )
    q = root / "q"
    assert sorted(os.listdir(q / "moved" / "c")) == ["f", "h2", "j"]
    assert sorted(os.listdir(q / "p" / "c")) == ["i"]


def test_descriptor_cache_forgets_replaced_and_removed_directories(vol, tmp_path):
    root, outside = vol
    before = snapshot_of(outside)
    # a directory replaced by a symlink (to purgatory, or removed without one): its cached
    # descriptor and those below it are dropped, and the symlink is not followed
    for purg in (tmp_path / "purg", None):
        with pytest.raises(HostilePath):
            apply(
                root,
                [
                    R.MkDir(path="d"),
                    R.MkDir(path="d/e"),
                    R.MkFile(path="d/e/f"),
                    R.Symlink(path="d", target=str(outside)),
                    R.MkFile(path="d/e/x"),
                ],
                purgatory=purg,
            )
        assert os.path.islink(root / "q" / "d")
        os.unlink(root / "q" / "d")
    # a removed directory is not written into through its cached descriptor
    with pytest.raises(CorruptStream, match="does not exist"):
        apply(
            root,
            [
                R.MkDir(path="r"),
                R.MkDir(path="r/s"),
                R.MkFile(path="r/s/f"),
                R.Unlink(path="r/s/f"),
                R.RmDir(path="r/s"),
                R.MkFile(path="r/s/g"),
            ],
        )
    assert snapshot_of(outside) == before


def test_symlink_put_in_place_of_a_cached_directory_is_not_followed(vol):
    root, outside = vol
    before = snapshot_of(outside)
    with pytest.raises(HostilePath):
        apply(
            root,
            [
                R.MkDir(path="d"),
                R.MkFile(path="d/a"),
                R.Write(path="d/a", offset=0, data=b"1"),
                R.Rename(old="d", new="d-moved"),
                R.Symlink(path="d", target=str(outside)),
                R.MkFile(path="d/b"),
                R.Write(path="d/b", offset=0, data=b"pwned"),
            ],
        )
    assert snapshot_of(outside) == before
    assert os.listdir(root / "q" / "d-moved") == ["a"]


def test_symlink_swapped_in_by_someone_else_between_records_is_not_followed(vol):
    """Outside the stream's knowledge: between two records, another process moves a directory the
    applier has cached and puts a symlink out of the qtree in its place.  The cached descriptor
    names the directory it was opened on, so the next file lands there, never behind the symlink."""
    root, outside = vol
    before = snapshot_of(outside)
    q = root / "q"

    def records():
        yield R.MkDir(path="d")
        yield R.MkFile(path="d/a")
        yield R.Write(path="d/a", offset=0, data=b"1")
        os.rename(q / "d", q / "d-away")
        os.symlink(str(outside), q / "d")
        yield R.MkFile(path="d/b")
        yield R.Write(path="d/b", offset=0, data=b"not through the link")

    Applier(str(root), "q", None).apply(records())
    assert snapshot_of(outside) == before
    assert os.path.islink(q / "d")
    assert sorted(os.listdir(q / "d-away")) == ["a", "b"]


def test_records_pulled_before_a_source_error_are_applied(vol):
    root, _ = vol

    def records():
        yield R.MkFile(path="a")
        yield R.Write(path="a", offset=0, data=b"first")
        raise RuntimeError("the source died")

    with pytest.raises(RuntimeError, match="the source died"):
        Applier(str(root), "q", None).apply(records())
    assert open(root / "q" / "a", "rb").read() == b"first"


def test_an_apply_error_comes_before_a_later_source_error(vol):
    root, _ = vol
    pulled = []

    def records():
        for rec in (R.MkFile(path="a"), R.Write(path="nope", offset=0, data=b"x"), R.MkFile(path="b")):
            pulled.append(rec)
            yield rec
        raise RuntimeError("later")

    with pytest.raises(CorruptStream, match="nope"):
        Applier(str(root), "q", None).apply(records())
    assert os.listdir(root / "q") == ["a"], "nothing after the failed record is applied"
    assert len(pulled) == 2, "no record is pulled after a failed one"


BIG = 1 << 20  # a Write this large goes to the applier's writer thread


def test_large_writes_and_the_records_around_them_apply_in_order(vol):
    root, _ = vol
    recs = [
        R.MkDir(path="d"),
        R.MkFile(path="d/a"),
        R.Write(path="d/a", offset=0, data=b"A" * BIG),
        R.Truncate(path="d/a", size=10),  # queued behind the large Write
        R.Write(path="d/a", offset=0, data=b"B" * (BIG // 2)),
        R.Write(path="d/a", offset=5, data=b"x"),
        R.MkFile(path="d/b"),
        R.Write(path="d/b", offset=0, data=b"small"),
        R.Rename(old="d/b", new="d/c"),
        R.Write(path="d/a", offset=BIG, data=b"C" * BIG),
        R.SetAttr(path="d/a", mode=0o600, mtime_ns=7_000_000_000),
    ]
    apply(root, recs)
    q = root / "q" / "d"
    assert open(q / "a", "rb").read() == b"BBBBBx" + b"B" * (BIG // 2 - 6) + b"\0" * (BIG // 2) + b"C" * BIG
    st = os.stat(q / "a")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 7_000_000_000
    assert sorted(os.listdir(q)) == ["a", "c"] and open(q / "c", "rb").read() == b"small"


@pytest.mark.parametrize("big", [False, True], ids=["small", "large-writes"])
def test_records_pulled_before_a_source_error_are_applied_also_by_the_writer(vol, big):
    root, _ = vol
    data = b"y" * (BIG if big else 10)

    def records():
        yield R.MkFile(path="a")
        for i in range(6):
            yield R.Write(path="a", offset=i * len(data), data=data)
        raise RuntimeError("the source died")

    with pytest.raises(RuntimeError, match="the source died"):
        Applier(str(root), "q", None).apply(records())
    assert os.path.getsize(root / "q" / "a") == 6 * len(data)
    assert not [t for t in threading.enumerate() if t.name.startswith("coalesce-apply")]


@pytest.mark.parametrize("then", ["source-error", "pause-then-records", "records"])
def test_an_error_of_the_writer_comes_first_and_stops_the_stream(vol, then):
    root, _ = vol

    def records():
        yield R.MkFile(path="a")
        yield R.Write(path="a", offset=0, data=b"1" * BIG)
        yield R.Write(path="nope", offset=0, data=b"2" * BIG)  # fails in the writer thread
        if then == "pause-then-records":
            time.sleep(0.3)  # the writer is idle again by now
        if then != "source-error":
            for i in range(20):
                yield R.MkFile(path=f"later{i}")
        raise RuntimeError("later")

    with pytest.raises(CorruptStream, match="nope"):
        Applier(str(root), "q", None).apply(records())
    assert os.listdir(root / "q") == ["a"], "a record after the failed one was applied"
    assert not [t for t in threading.enumerate() if t.name.startswith("coalesce-apply")]


def _until(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_read_ahead_asks_a_few_files_ahead_and_skips_what_it_cannot_open(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, ln, advice: asked.append(os.readlink(f"/proc/self/fd/{fd}"))
    )
    for n in "abcde":
        (tmp_path / n).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "link")
    files = [(str(tmp_path / n), 0) for n in ("a", "missing", "link", "b", "c", "d", "e")]
    ra = walk.ReadAhead(files, ahead=3)
    _until(lambda: asked, "nothing was read ahead")
    time.sleep(0.2)
    assert asked == [str(tmp_path / "a")], "more than 3 entries ahead, or the missing file or the symlink"
    ra.next()  # the reader starts on "a": one more entry may go
    _until(lambda: len(asked) == 2, "the read-ahead did not follow the reader")
    assert asked[1] == str(tmp_path / "b")
    for _ in range(5):
        ra.next()
    _until(lambda: len(asked) == 5, "the read-ahead did not reach the end")
    assert asked == [str(tmp_path / n) for n in "abcde"]
    _until(
        lambda: not [t for t in threading.enumerate() if t.name == "coalesce-readahead"],
        "the read-ahead thread did not end after its last file",
    )


def test_read_ahead_thread_ends_at_close_or_when_the_reader_is_gone(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    for drop in ("close", "collect"):
        ra = walk.ReadAhead([(str(tmp_path / "f"), 0)] * 100, ahead=2)
        if drop == "close":
            ra.close()
        else:
            del ra
        _until(
            lambda: not [t for t in threading.enumerate() if t.name == "coalesce-readahead"],
            f"the read-ahead thread outlived its reader ({drop})",
        )


def test_new_files_get_no_redundant_truncate(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "full").write_bytes(b"x" * 5000)
    with open(src / "tail-hole", "wb") as f:
        f.write(b"y" * 10)
        f.truncate(3 << 20)
    (src / "empty").write_bytes(b"")
    recs = list(walk.baseline_records(str(src)))
    truncs = {r.path: r.size for r in recs if isinstance(r, R.Truncate)}
    assert truncs == {"tail-hole": 3 << 20}
    dst = tmp_path / "dst"
    dst.mkdir()
    Applier(str(dst), "q", None).apply(recs)
    assert walk.fingerprint(str(dst / "q")) == walk.fingerprint(str(src))


# ---------------------------------------------------------------------------
# walker and tree diff
# ---------------------------------------------------------------------------
def _build(root):
    apply(
        root,
        [
            R.MkDir(path="a"),
            R.MkDir(path="a/b"),
            R.MkFile(path="a/b/f", mode=0o640),
            R.Write(path="a/b/f", offset=0, data=b"hello" * 1000),
            R.Symlink(path="a/l", target="b/f"),
            R.MkFile(path="big"),
            R.Truncate(path="big", size=3 << 20),
            R.Write(path="big", offset=5, data=b"z"),
            R.HardLink(path="a/h", existing="big"),
            R.SetXattr(path="big", name="user.x", value=b"y"),
        ],
        qtree="src",
    )


def test_baseline_and_tree_diff_reproduce_the_tree(vol, tmp_path):
    root, _ = vol
    _build(root)
    src = str(root / "src")
    Applier(str(root), "copy", None).apply(R.framed("copy", None, "t", walk.baseline_records(src)))
    assert walk.fingerprint(str(root / "copy")) == walk.fingerprint(src)
    assert os.getxattr(root / "copy" / "big", "user.x") == b"y"
    assert os.stat(root / "copy" / "big").st_ino == os.stat(root / "copy" / "a" / "h").st_ino
    # change src, keep a frozen copy of the old state as the "base" image
    import shutil

    shutil.copytree(src, tmp_path / "base", symlinks=True)
    apply(
        root,
        [
            R.Unlink(path="a/l"),
            R.Symlink(path="a/l", target="elsewhere"),
            R.Rename(old="a/b", new="c"),
            R.Write(path="big", offset=2 << 20, data=b"new"),
            R.Truncate(path="c/f", size=3),
            R.MkDir(path="n"),
            R.MkFile(path="n/x"),
            R.SetAttr(path="a", mode=0o700),
            R.SetXattr(path="big", name="user.x", value=None),
        ],
        qtree="src",
    )
    recs = list(walk.tree_diff(str(tmp_path / "base"), src, same_lineage=False))
    Applier(str(root), "copy", None).apply(R.framed("copy", None, "t", recs))
    assert walk.fingerprint(str(root / "copy")) == walk.fingerprint(src)
    assert "user.x" not in os.listxattr(root / "copy" / "big")


def test_fingerprint_of_missing_and_empty_trees(tmp_path):
    (tmp_path / "empty").mkdir()
    assert walk.fingerprint(str(tmp_path / "missing")) == walk.fingerprint(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------
def _images(tmp_path, gens, replicas):
    for g in gens:
        for r in replicas:
            d = tmp_path / "snaps" / f"s{g}" / r
            d.mkdir(parents=True, exist_ok=True)
            (d / "gen").write_text(str(g))


def _table(tmp_path):
    snaps = str(tmp_path / "snaps")
    live = str(tmp_path / "live")
    return ExportTable(
        str(tmp_path / "exp"),
        lambda r, p: os.path.join(live, r) if p == ACTIVE else os.path.join(snaps, p, r),
        lambda r, t: parse_under(snaps, r, t, os.path.join(live, r)),
    )


def test_export_switch_is_one_rename_and_reads_back(tmp_path, monkeypatch):
    replicas = [f"r{i}" for i in range(5)]
    _images(tmp_path, [1, 2], replicas)
    table = _table(tmp_path)
    table.switch({r: "s1" for r in replicas})
    assert table.read() == {r: "s1" for r in replicas}
    import coalesce_posix.exports as ex

    calls = []
    real_rename = os.rename
    monkeypatch.setattr(ex.os, "rename", lambda a, b, **kw: (calls.append((a, b)), real_rename(a, b, **kw))[1])
    table.switch({**{r: "s2" for r in replicas}, "r0": ACTIVE, "r1": None})
    visible = [c for c in calls if c[1] == table.link]
    assert len(visible) == 1, f"the switch must be one rename of the 'exports' link, got {calls}"
    assert table.read() == {**{r: "s2" for r in replicas[2:]}, "r0": ACTIVE}
    assert os.path.islink(table.link)
    assert table.switch(table.read())  # idempotent


def test_export_switch_is_atomic_for_readers_and_open_files_survive(tmp_path):
    replicas = [f"r{i}" for i in range(8)]
    gens = list(range(1, 41))
    _images(tmp_path, gens, replicas)
    table = _table(tmp_path)
    table.switch({r: "s1" for r in replicas})
    held = open(os.path.join(table.path("r3"), "gen"))
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            # one resolution of the link gives one generation for every replica
            target = os.readlink(table.link)
            base = os.path.join(table.root, target)
            try:
                seen = {open(os.path.join(base, r, "gen")).read() for r in replicas}
            except FileNotFoundError:
                continue  # an old generation directory was removed after we resolved it
            if len(seen) != 1:
                errors.append(f"mixed generations {seen}")
            for r in replicas:
                if not os.path.exists(table.path(r)):
                    errors.append(f"{r} vanished during a switch")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for g in gens[1:]:
            table.switch({r: f"s{g}" for r in replicas})
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:5]
    assert held.read() == "1", "a reader holding a file open in the old image must keep reading it"
    held.close()
    assert open(os.path.join(table.path("r3"), "gen")).read() == str(gens[-1])
    assert sorted(n for n in os.listdir(table.root) if n.startswith("exports.")) == [f"exports.{len(gens)}"]
