"""Consistency points: a crash between any two block writes reopens at the last complete CP."""

from __future__ import annotations

import shutil

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import SimCrash, open_sim
from coalesce_sim import diff as D
from coalesce_sim.raid import BS
from coalesce_sim.testing import reopen, sim_apply

BASE = [
    R.MkDir(path="d"),
    R.MkFile(path="d/a"),
    R.Write(path="d/a", offset=0, data=b"A" * (5 * BS + 3)),
    R.MkFile(path="b"),
    R.Write(path="b", offset=0, data=b"B" * 100),
    R.Symlink(path="l", target="d/a"),
]

MUTATIONS = {
    "apply": lambda fs: sim_apply(
        fs,
        "q",
        [
            R.Write(path="d/a", offset=BS, data=b"x" * (3 * BS)),
            R.Unlink(path="b"),
            R.MkDir(path="e"),
            R.MkFile(path="e/n"),
            R.Write(path="e/n", offset=0, data=b"n" * 9000),
            R.SetXattr(path="d", name="user.k", value=b"v"),
        ],
    ),
    "snapshot_create": lambda fs: fs.snapshot_create("s2"),
    "snapshot_delete": lambda fs: fs.snapshot_delete("s1"),
    "export": lambda fs: fs.set_exports({"r": "s1"}),
}


def _state(fs):
    return (D.tree_dict(fs, "q"), fs.pcpi_names(), fs.exports(), {p: D.tree_dict(fs, "q", p) for p in fs.pcpi_names()})


@pytest.fixture
def template(make_sim):
    fs = make_sim("template")
    sim_apply(fs, "q", BASE)
    fs.snapshot_create("s1")
    sim_apply(fs, "q", [R.Write(path="b", offset=0, data=b"C" * 50)])
    return fs


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_crash_between_any_two_block_writes(template, tmp_path, mutation):
    before = _state(template)
    # how many physical block writes does this CP make?
    probe = open_sim(_copy(template, tmp_path, "probe"))
    w0 = probe.raid.stats["writes"]
    MUTATIONS[mutation](probe)
    total = probe.raid.stats["writes"] - w0
    after = _state(probe)
    assert total >= probe.raid.ndata + 1 and after != before
    for n in range(total):
        fs = open_sim(_copy(template, tmp_path, f"crash{n}"))
        fs.raid.crash_after_writes = n
        with pytest.raises(SimCrash):
            MUTATIONS[mutation](fs)
        with pytest.raises(BackendError, match="reopen"):
            fs.snapshot_create("x")  # a dead handle refuses work
        fs2 = reopen(fs)
        assert _state(fs2) in (before, after), f"crash after {n} of {total} writes"
        # the root switch is the first superblock copy (on disk0) reaching the disk: it is the
        # (total - N)-th write (N copies + parity close the CP); before it, nothing of the CP is visible
        expect = before if n < total - fs.raid.ndata else after
        assert _state(fs2) == expect, f"crash after {n} of {total} writes"
        assert fs2.fsck() == []
        # the volume carries on from there
        sim_apply(fs2, "q", [R.MkFile(path="later")])
        assert "later" in D.tree_dict(fs2, "q") and fs2.fsck() == []


def _copy(fs, tmp_path, name) -> str:
    dst = tmp_path / name
    shutil.copytree(fs.path, dst)
    return f"{dst}?fsync=0"


def test_superblocks_alternate_and_a_torn_copy_is_ignored(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", BASE)
    cp = fs.cp
    state = D.tree_dict(fs, "q")
    # tear the newest superblock copy on every disk: the volume falls back to CP cp-1
    slot = cp % 2
    for d in range(fs.raid.ndata):
        with open(fs.raid.disk_path(d), "r+b") as f:
            f.seek(slot * BS + 40)
            f.write(b"\x00garbage")
    fs2 = reopen(fs)
    assert fs2.cp == cp - 1
    assert D.tree_dict(fs2, "q") != state or cp - 1 == 0


def test_one_cp_per_primitive(make_sim):
    fs = make_sim()
    cp = fs.cp
    recs = [R.MkDir(path="d")] + [R.MkFile(path=f"d/f{i}") for i in range(200)]
    sim_apply(fs, "q", recs)
    assert fs.cp == cp + 1
    fs.snapshot_create("s")
    assert fs.cp == cp + 2


def test_a_large_apply_writes_extra_cps_to_bound_memory(make_sim, monkeypatch):
    fs = make_sim()
    monkeypatch.setattr(fs, "DIRTY_LIMIT", 10 * BS)
    cp = fs.cp
    data = bytes(range(256)) * 16
    recs = [R.MkFile(path="f")] + [R.Write(path="f", offset=i * BS, data=data) for i in range(50)]
    sim_apply(fs, "q", recs)
    assert fs.cp >= cp + 5
    assert D.tree_dict(fs, "q")["f"][2] == data * 50
    assert fs.fsck() == []
