"""Diff (cost follows the change), apply, purgatory, native vs generic rollback, cross-backend streams."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError, HostilePath, StreamError, TruncatedStream
from coalesce_core.stream import records as R
from coalesce_sim import diff as D
from coalesce_sim.raid import BS
from coalesce_sim.testing import reopen, sim_apply


def _populate(fs, nfiles, blocks_per_file, qtree="q"):
    recs = []
    for d in range(max(1, nfiles // 50)):
        recs.append(R.MkDir(path=f"d{d}"))
    for i in range(nfiles):
        p = f"d{i % max(1, nfiles // 50)}/f{i}"
        recs += [R.MkFile(path=p), R.Write(path=p, offset=0, data=bytes([i % 250 + 1]) * (blocks_per_file * BS))]
        if len(recs) > 400:
            sim_apply(fs, qtree, recs)
            recs = []
    sim_apply(fs, qtree, recs)


def _diff_reads(fs, base, target):
    fs.stats.update(block_reads=0, cache_misses=0)
    recs = list(D.diff_stream(fs, "q", base, target))
    return fs.stats["block_reads"], recs


def test_diff_cost_follows_the_change_not_the_volume(make_sim):
    costs = {}
    for name, nfiles in (("small", 20), ("large", 2000)):
        fs = make_sim(name)
        _populate(fs, nfiles, 20)
        fs.snapshot_create("s1")
        sim_apply(
            fs,
            "q",
            [
                R.Write(
                    path=f"d0/f{i * (nfiles // 20 // max(1, nfiles // 50)) * max(1, nfiles // 50)}",
                    offset=b * 2 * BS,
                    data=b"C" * BS,
                )
                for i in range(10)
                for b in range(10)
            ],
        )
        fs.snapshot_create("s2")
        reads, recs = _diff_reads(fs, "s1", "s2")
        writes = [r for r in recs if isinstance(r, R.Write)]
        assert sum(len(w.data) for w in writes) == 100 * BS
        costs[name] = (reads, len(fs.rc))
    (rs, us), (rl, ul) = costs["small"], costs["large"]
    assert ul > 50 * us / 10, "the large volume is much larger"
    # same 100 changed blocks: the large volume costs a little more (one more level in the inode
    # file and larger directories on the paths), not 80 times more
    assert rl <= 1.5 * rs + 20, costs
    assert rl < ul / 100, costs


def test_diff_of_equal_pcpis_reads_almost_nothing(make_sim):
    fs = make_sim()
    _populate(fs, 200, 4)
    fs.snapshot_create("a")
    fs.snapshot_create("b")
    reads, recs = _diff_reads(fs, "a", "b")
    assert recs[1:-1] == [] and reads <= 16, reads  # the qtree lookups on both sides, no tree walk


CASES = {
    "rename_dir": [R.Rename(old="d1", new="moved")],
    "rename_file": [R.Rename(old="d1/f", new="g")],
    "hardlinks": [R.HardLink(path="h2", existing="d1/f"), R.Write(path="h2", offset=1, data=b"ZZ")],
    "unlink_one_link": [R.HardLink(path="h2", existing="d1/f"), R.Unlink(path="d1/f")],
    "truncate": [R.Truncate(path="big", size=BS + 5), R.Truncate(path="big", size=10 * BS)],
    "holes": [R.Write(path="big", offset=40 * BS, data=b"far")],
    "type_change": [R.Unlink(path="l"), R.MkDir(path="l"), R.Unlink(path="d1/f"), R.Symlink(path="d1/f", target="x")],
    "attrs": [
        R.SetAttr(path="d1", mode=0o711, uid=5, gid=6, mtime_ns=123),
        R.SetXattr(path="big", name="user.a", value=b"1"),
        R.SetXattr(path="d1/f", name="user.b", value=None),
    ],
    "rmtree": [R.Unlink(path="d1/f"), R.Unlink(path="d1/sub/x"), R.RmDir(path="d1/sub"), R.RmDir(path="d1")],
}

BASE = [
    R.MkDir(path="d1"),
    R.MkDir(path="d1/sub"),
    R.MkFile(path="d1/sub/x"),
    R.MkFile(path="d1/f"),
    R.Write(path="d1/f", offset=0, data=b"hello"),
    R.SetXattr(path="d1/f", name="user.b", value=b"x"),
    R.MkFile(path="big"),
    R.Write(path="big", offset=0, data=bytes(range(256)) * 64),
    R.Symlink(path="l", target="d1/f"),
]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("purgatory", [False, True])
def test_diff_apply_roundtrip(make_sim, case, purgatory):
    src, dst = make_sim(), make_sim()
    sim_apply(src, "q", BASE)
    src.snapshot_create("s1")
    sim_apply(src, "q", CASES[case], use_purgatory=purgatory)
    src.snapshot_create("s2")
    dst.apply(qtree="r", records=D.diff_stream(src, "q", None, "s1"), use_purgatory=purgatory)
    assert D.fingerprint(dst, "r", None) == D.fingerprint(src, "q", "s1")
    dst.apply(qtree="r", records=D.diff_stream(src, "q", "s1", "s2"), use_purgatory=purgatory)
    assert D.tree_dict(dst, "r") == D.tree_dict(src, "q", "s2")
    assert D.fingerprint(dst, "r", None) == D.fingerprint(src, "q", "s2")
    # and back again
    dst.apply(qtree="r", records=D.diff_stream(src, "q", "s2", "s1"), use_purgatory=purgatory)
    assert D.fingerprint(dst, "r", None) == D.fingerprint(src, "q", "s1")
    assert dst.fsck() == [] and src.fsck() == []
    # hard links stay hard links on the replica
    if case == "hardlinks":
        dst.apply(qtree="r", records=D.diff_stream(src, "q", "s1", "s2"), use_purgatory=purgatory)
        sim_apply(dst, "r", [R.Write(path="h2", offset=0, data=b"Q")])
        assert D.tree_dict(dst, "r")["d1/f"][2].startswith(b"Q")


def test_purgatory_keeps_deleted_data_until_purged(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"x" * (50 * BS))])
    fp_empty = D.fingerprint(fs, "q2", None)
    used = len(fs.rc)
    sim_apply(fs, "q", [R.Unlink(path="f")], use_purgatory=True)
    assert D.tree_dict(fs, "q") == {} and D.fingerprint(fs, "q", None) == fp_empty
    assert len(fs.rc) >= used - 2, "the data stays in the purgatory"
    fs.purge_purgatory(qtrees=["q", "nonexistent"])
    fs.purge_purgatory(qtrees=["q"])  # idempotent
    assert len(fs.rc) < used - 40
    assert fs.fsck() == []


def _volume(pm, url):
    return Volume.open(pm, url, create=True)


@pytest.mark.parametrize("native", [True, False])
def test_rollback_restores_the_base(sim_url, monkeypatch, native):
    if not native:
        monkeypatch.setenv("COALESCE_SIM_NATIVE_ROLLBACK", "0")
    pm = plugin_manager()
    v = _volume(pm, sim_url())
    v.apply("q", R.framed("q", None, "t", BASE))
    v.apply("other", R.framed("other", None, "t", [R.MkFile(path="o")]))
    v.snapshot_create("base")
    fp = v.fingerprint("q", "base")
    v.apply("q", R.framed("q", None, "t", CASES["rmtree"] + CASES["holes"] + [R.MkDir(path="new")]))
    v.apply("other", R.framed("other", None, "t", [R.MkFile(path="o2")]))
    v.snapshot_create("rb")
    assert v.rollback("q", "rb", "base") is True
    assert v.fingerprint("q") == fp
    assert sorted(D.tree_dict(v.handle, "other")) == ["o", "o2"], "other qtrees are untouched"
    assert v.handle.fsck() == []
    v.rollback("q", "rb", "base")  # idempotent
    assert v.fingerprint("q") == fp
    v.rollback("q", "rb", None)
    assert "q" not in v.qtree_list()


def test_native_rollback_restores_a_removed_qtree(make_sim):
    import coalesce_sim

    fs = make_sim()
    sim_apply(fs, "q", BASE)
    fs.snapshot_create("base")
    fs.remove_qtree(qtree="q")
    sim_apply(fs, "q", [R.MkFile(path="unrelated")])
    fs.snapshot_create("rb")
    coalesce_sim.coalesce_rollback(volume=fs, qtree="q", rollback_pcpi="rb", to_pcpi="base")
    assert D.fingerprint(fs, "q", None) == D.fingerprint(fs, "q", "base")
    assert fs.fsck() == []


def _raw(cls, **fields):
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


@pytest.mark.parametrize(
    "rec",
    [
        _raw(R.MkFile, path="../escape", mode=0o644),
        _raw(R.Write, path="/etc/passwd", offset=0, data=b"x"),
        R.Write(path="link/f", offset=0, data=b"x"),
        R.MkFile(path="link/new"),
        R.Write(path="link", offset=0, data=b"x"),
        R.Truncate(path="filelink", size=0),
    ],
)
def test_hostile_records_change_nothing(make_sim, rec):
    fs = make_sim()
    sim_apply(
        fs,
        "q",
        [
            R.MkDir(path="d"),
            R.MkFile(path="d/f"),
            R.Symlink(path="link", target="d"),
            R.Symlink(path="filelink", target="d/f"),
        ],
    )
    sim_apply(fs, "outside", [R.MkFile(path="f")])
    before = (D.tree_dict(fs, "q"), D.tree_dict(fs, "outside"))
    with pytest.raises(HostilePath):
        sim_apply(fs, "q", [rec])
    assert (D.tree_dict(fs, "q"), D.tree_dict(fs, "outside")) == before


def test_a_failing_stream_keeps_the_partial_state_and_propagates(make_sim):
    fs = make_sim()

    def stream():
        yield R.Begin(qtree="q", base=None, target="t")
        yield R.MkFile(path="one")
        yield R.Write(path="one", offset=0, data=b"1")
        raise RuntimeError("link dropped")

    with pytest.raises(RuntimeError):
        fs.apply(qtree="q", records=stream(), use_purgatory=True)
    assert D.tree_dict(fs, "q") == {"one": ("f", 0o644, b"1")}
    fs = reopen(fs)
    assert D.tree_dict(fs, "q") == {"one": ("f", 0o644, b"1")}, "the partial state was committed"
    with pytest.raises(TruncatedStream):
        fs.apply(
            qtree="q",
            records=iter([R.Begin(qtree="q", base=None, target="t"), R.MkFile(path="two")]),
            use_purgatory=True,
        )
    with pytest.raises(StreamError):
        sim_apply(fs, "q", [R.Write(path="missing/x", offset=0, data=b"")])


def test_diff_errors(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f")])
    fs.snapshot_create("s")
    with pytest.raises(BackendError):
        D.diff_stream(fs, "q", None, "nope")
    with pytest.raises(BackendError):
        D.diff_stream(fs, "nope", None, "s")


def test_cross_backend_mem_source_into_sim(sim_url):
    """A mem source's change stream applied into sim gives the same fingerprint (and back)."""
    pm = plugin_manager()
    try:
        src = Volume.open(pm, f"mem://sim-cross-{id(pm)}", create=True)
    except BackendError:
        pytest.skip("mem backend not installed")
    dst = Volume.open(pm, sim_url(), create=True)
    src.apply("q", R.framed("q", None, "t", BASE))
    src.snapshot_create("s1")
    src.apply("q", R.framed("q", None, "t", CASES["hardlinks"] + CASES["rename_dir"] + CASES["holes"]))
    src.snapshot_create("s2")
    dst.apply("r", src.diff("q", None, "s1"))
    assert dst.fingerprint("r") == src.fingerprint("q", "s1")
    dst.snapshot_create("d1")
    dst.apply("r", src.diff("q", "s1", "s2"))
    assert dst.fingerprint("r") == src.fingerprint("q", "s2")
    dst.snapshot_create("d2")
    # and sim as the source for mem
    back = Volume.open(pm, f"mem://sim-cross-back-{id(pm)}", create=True)
    back.apply("b", dst.diff("r", None, "d1"))
    back.apply("b", dst.diff("r", "d1", "d2"))
    assert back.fingerprint("b") == src.fingerprint("q", "s2")


# ---- property: any two random trees, diff + apply reproduces the target -------------------------
NAMES = ("a", "b", "c")


@st.composite
def ops(draw, n):
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["mkdir", "file", "write", "unlink", "symlink", "link", "rename", "trunc"]))
        p = "/".join(draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)))
        q = "/".join(draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)))
        out.append((kind, p, q, draw(st.integers(0, 3 * BS)), draw(st.binary(min_size=1, max_size=50))))
    return out


def _apply_ops(fs, qtree, opl):
    """Apply random operations one record at a time, skipping those the tree does not allow."""
    for kind, p, q, off, data in opl:
        recs = {
            "mkdir": [R.MkDir(path=p)],
            "file": [R.MkFile(path=p), R.Write(path=p, offset=off, data=data)],
            "write": [R.Write(path=p, offset=off, data=data)],
            "unlink": [R.Unlink(path=p)],
            "symlink": [R.Symlink(path=p, target=q)],
            "link": [R.HardLink(path=p, existing=q)],
            "rename": [R.Rename(old=p, new=q)],
            "trunc": [R.Truncate(path=p, size=off)],
        }[kind]
        tree = D.tree_dict(fs, qtree)
        parent = p.rsplit("/", 1)[0] if "/" in p else None
        if parent is not None and tree.get(parent, ("x",))[0] != "d":
            continue
        if kind in ("write", "trunc", "link") and tree.get(p if kind != "link" else q, ("x",))[0] != "f":
            continue
        if kind == "link" and p in tree:
            continue
        if kind == "unlink" and tree.get(p, ("d",))[0] == "d":
            continue
        if kind == "rename":
            qp = q.rsplit("/", 1)[0] if "/" in q else None
            if (
                p not in tree
                or q in tree
                or (qp is not None and tree.get(qp, ("x",))[0] != "d")
                or (q + "/").startswith(p + "/")
            ):
                continue
        if kind in ("mkdir", "file", "symlink") and p in tree:
            continue
        fs.apply(qtree=qtree, records=R.framed(qtree, None, "t", recs), use_purgatory=True)


_ids = itertools.count()


def _two_pcpis(src, first, second):
    """``src`` with qtree q, PCPI s1 after the operations ``first``, PCPI s2 after ``second``."""
    src.apply(qtree="q", records=R.framed("q", None, "t", []), use_purgatory=True)
    _apply_ops(src, "q", first)
    src.snapshot_create("s1")
    _apply_ops(src, "q", second)
    src.snapshot_create("s2")
    return src


@settings(
    max_examples=int(os.environ.get("COALESCE_SIM_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(first=ops(12), second=ops(12))
def test_property_diff_apply_reproduces_target(tmp_path_factory, first, second):
    from coalesce_sim import open_sim

    root = tmp_path_factory.mktemp("prop")
    src = open_sim(f"{root}/src?fsync=0", create=True)
    dst = open_sim(f"{root}/dst?fsync=0", create=True)
    import coalesce_sim as S

    _two_pcpis(src, first, second)
    dst.apply(qtree="r", records=D.diff_stream(src, "q", None, "s1"), use_purgatory=True)
    dst.apply(qtree="r", records=D.diff_stream(src, "q", "s1", "s2"), use_purgatory=True)
    assert D.tree_dict(dst, "r") == D.tree_dict(src, "q", "s2")
    # next increment after the replica holds s2: hard-link identity must have survived
    _apply_ops(src, "q", [("write", p, p, 1, b"!") for p in sorted(D.tree_dict(src, "q"))])
    src.snapshot_create("s3")
    dst.apply(qtree="r", records=D.diff_stream(src, "q", "s2", "s3"), use_purgatory=True)
    assert D.tree_dict(dst, "r") == D.tree_dict(src, "q", "s3")
    assert src.fsck() == [] and dst.fsck() == []
    S.close_sim(src)
    S.close_sim(dst)


def test_a_directory_rename_is_one_record(make_sim):
    fs, dst = make_sim(), make_sim()
    recs = [R.MkDir(path="a"), R.MkDir(path="a/sub"), R.MkDir(path="c"), R.MkFile(path="c/x")]
    for i in range(60):
        recs += [R.MkFile(path=f"a/sub/f{i}"), R.Write(path=f"a/sub/f{i}", offset=0, data=b"x" * 5000)]
    sim_apply(fs, "q", recs)
    fs.snapshot_create("s1")
    sim_apply(
        fs,
        "q",
        [
            R.Rename(old="a/sub", new="moved"),
            R.Rename(old="moved/f3", new="a/f3"),
            R.Rename(old="moved/f4", new="moved/f4b"),
            R.Rename(old="c", new="d"),
        ],
    )
    fs.snapshot_create("s2")
    out = list(D.diff_stream(fs, "q", "s1", "s2"))
    assert R.Rename(old="a/sub", new="moved") in out
    assert R.Rename(old="c", new="d") in out
    assert R.Rename(old="a/sub/f4", new="moved/f4b") not in out, "a move inside a moved dir falls back"
    assert sum(isinstance(r, R.Write) for r in out) <= 2, "only the two files moved out of / inside a moved dir"
    for base, target in ((None, "s1"), ("s1", "s2"), ("s2", "s1")):
        dst.apply(qtree="r", records=D.diff_stream(fs, "q", base, target), use_purgatory=True)
        assert D.tree_dict(dst, "r") == D.tree_dict(fs, "q", target)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=ops(12), second=ops(12))
def test_property_a_diff_with_its_path_memos_bounded_sends_the_same_records(
    tmp_path_factory, monkeypatch, first, second
):
    """The diff's path lookups forget their memos past MEMO_LIMIT (bounded memory per update):
    with a limit of 1 (forgotten at every lookup) the stream is the same record for record."""
    import coalesce_sim as S
    from coalesce_sim import open_sim

    src = _two_pcpis(open_sim(f"{tmp_path_factory.mktemp('memo')}/src?fsync=0", create=True), first, second)
    whole = list(D.diff_stream(src, "q", "s1", "s2"))
    with monkeypatch.context() as m:
        m.setattr(D, "MEMO_LIMIT", 1)
        bounded = list(D.diff_stream(src, "q", "s1", "s2"))
    assert bounded == whole
    S.close_sim(src)


def test_the_paths_of_files_changed_in_a_directory_past_memo_limit_cost_a_scan_per_window(make_sim, monkeypatch):
    """The paths of 2,000 files written in place in one directory, with MEMO_LIMIT 100: the names
    are found by scans of the directory that each answer the next 100 inodes (about 20 scans of
    2,000 entries per image and walk of the change, the diff walks it twice: 172,085 entries read;
    before, every lookup past the memo went through the whole directory again: 16,008,003), and
    the records are those of the diff with its memos unbounded."""
    n, limit = 2000, 100
    fs = make_sim()
    names = [f"big/f{i:05d}" for i in range(n)]
    sim_apply(fs, "q", [R.MkDir(path="big")] + [R.MkFile(path=p) for p in names])
    fs.snapshot_create("s1")
    sim_apply(fs, "q", [R.Write(path=p, offset=0, data=b"y") for p in names])
    fs.snapshot_create("s2")
    whole = list(D.diff_stream(fs, "q", "s1", "s2"))
    seen = [0]
    entries, whole_dir = D.View.dir_entries, D.View.dir

    def counted_entries(view, rec):
        for e in entries(view, rec):
            seen[0] += 1
            yield e

    def counted_dir(view, rec):
        d = whole_dir(view, rec)
        seen[0] += len(d)
        return d

    monkeypatch.setattr(D, "MEMO_LIMIT", limit)
    monkeypatch.setattr(D.View, "dir_entries", counted_entries)
    monkeypatch.setattr(D.View, "dir", counted_dir)
    bounded = list(D.diff_stream(fs, "q", "s1", "s2"))
    assert bounded == whole
    assert sum(isinstance(r, R.Write) for r in bounded) == n
    assert seen[0] < 5 * (n // limit + 2) * n, f"{seen[0]} directory entries read"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=ops(12), second=ops(12))
def test_property_a_diff_whose_entries_spill_to_disk_sends_the_same_records(
    tmp_path_factory, monkeypatch, first, second
):
    """Past spill.SPILL_ROWS the entries the diff keeps move to a temporary database (bounded
    memory per update): spilled at once and read back 2 rows at a time, the stream is the same
    record for record (renames and hard links included)."""
    import coalesce_sim as S
    from coalesce_sim import open_sim, spill

    src = _two_pcpis(open_sim(f"{tmp_path_factory.mktemp('spill')}/src?fsync=0", create=True), first, second)
    for base, target in (("s1", "s2"), ("s2", "s1")):
        whole = list(D.diff_stream(src, "q", base, target))
        with monkeypatch.context() as m:
            m.setattr(spill, "SPILL_ROWS", 0)
            m.setattr(spill, "PAGE", 2)
            spilled = list(D.diff_stream(src, "q", base, target))
        assert spilled == whole
    S.close_sim(src)
