"""Allocator, block map (lazy reference counts) and PCPIs: limits and cost independent of volume size."""

from __future__ import annotations

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import diff as D
from coalesce_sim.fs import MAX_PCPIS, SB_STRIPES
from coalesce_sim.raid import BS
from coalesce_sim.testing import reopen, sim_apply


def _big_file(fs, nblocks, name="big", qtree="q"):
    chunk = 256 * BS
    recs = [R.MkFile(path=name)]
    for off in range(0, nblocks * BS, chunk):
        n = min(chunk, nblocks * BS - off)
        recs.append(R.Write(path=name, offset=off, data=(off // BS % 251 + 1).to_bytes(1, "little") * n))
    sim_apply(fs, qtree, recs)


def test_cp_allocates_whole_free_stripes_and_never_a_live_block(make_sim):
    fs = make_sim()
    _big_file(fs, 40)
    for i in range(5):
        live_before = set(fs.rc)
        stripes_before = set(fs.suse)
        sim_apply(fs, "q", [R.Write(path="big", offset=i * 7 * BS, data=b"x" * (2 * BS))])
        new = set(fs.rc) - live_before
        assert new, "a CP writes new blocks"
        # new blocks live only in stripes that held nothing live before (full-stripe writes)
        assert not {b // fs.raid.ndata for b in new} & stripes_before
        assert all(b // fs.raid.ndata >= SB_STRIPES for b in new)
        assert fs.fsck() == []


def test_blocks_freed_by_a_cp_are_reused_only_after_it(make_sim):
    fs = make_sim()
    _big_file(fs, 12)
    for _ in range(6):
        old = set(fs.rc)
        sim_apply(fs, "q", [R.Write(path="big", offset=0, data=b"y" * (12 * BS))])
        # everything of the previous image was replaced; none of it was overwritten by this CP
        assert not (set(fs.rc) - old) & old
    assert fs.free_stripes, "stripes freed by earlier CPs go back to the free list"
    assert fs.fsck() == []


def test_a_pcpi_keeps_its_blocks_until_released(make_sim):
    fs = make_sim()
    _big_file(fs, 30)
    fs.snapshot_create("s1")
    held = fs.blocks_of_root(fs.pcpi_roots()["s1"])
    sim_apply(fs, "q", [R.Truncate(path="big", size=0)])
    assert held <= set(fs.rc), "every block the PCPI references stays allocated"
    assert D.tree_dict(fs, "q", "s1")["big"][2][:1] == b"\x01"
    used = len(fs.rc)
    assert fs.snapshot_delete("s1") is True
    assert len(fs.rc) <= used - 30
    assert fs.fsck() == []
    fs = reopen(fs)
    assert fs.fsck() == [] and fs.pcpi_names() == []


def test_snapshot_primitives_are_idempotent_and_persistent(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f")])
    assert fs.snapshot_create("a") == "a"
    cp = fs.cp
    assert fs.snapshot_create("a") == "a" and fs.cp == cp, "an existing PCPI is returned, not retaken"
    assert fs.snapshot_delete("nope") is False
    fs.set_exports({"r1": "a", "r2": None})
    fs = reopen(fs)
    assert fs.pcpi_names() == ["a"] and fs.exports() == {"r1": "a"}
    with pytest.raises(BackendError):
        fs.set_exports({"r1": "missing"})
    assert fs.exports() == {"r1": "a"}
    for bad in ("", "a/b", "x\0y"):
        with pytest.raises(BackendError):
            fs.snapshot_create(bad)


def test_the_256th_pcpi_fails_clearly(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"data")])
    for i in range(MAX_PCPIS):
        fs.snapshot_create(f"p{i}")
        if i % 50 == 0:
            sim_apply(fs, "q", [R.Write(path="f", offset=0, data=str(i).encode())])
    assert len(fs.pcpi_names()) == 255
    assert fs.snapshot_create("p7") == "p7"  # idempotent at the limit
    with pytest.raises(BackendError, match="255 PCPIs") as ei:
        fs.snapshot_create("one-too-many")
    assert "release" in ei.value.hint
    fs.snapshot_delete("p0")
    fs.snapshot_create("one-too-many")
    fs = reopen(fs)
    assert len(fs.pcpi_names()) == 255 and fs.fsck() == []


def _pcpi_cost(fs):
    fs.raid.stats.update(reads=0, writes=0)
    fs.stats.update(block_reads=0, cache_misses=0)
    fs.snapshot_create("cost")
    create = (fs.raid.stats["writes"], fs.stats["block_reads"])
    fs.raid.stats.update(reads=0, writes=0)
    fs.stats.update(block_reads=0, cache_misses=0)
    fs.snapshot_delete("cost")
    delete = (fs.raid.stats["writes"], fs.stats["block_reads"])
    return create, delete


def test_pcpi_create_and_delete_cost_does_not_grow_with_the_volume(make_sim):
    small, large = make_sim(), make_sim()
    _big_file(small, 50)
    _big_file(large, 6000)
    for fs in (small, large):
        fs.snapshot_create("older")  # the PCPI table has the same size on both
    assert len(large.rc) > 50 * len(small.rc) / 10
    cs, ds = _pcpi_cost(small)
    cl, dl = _pcpi_cost(large)
    # counted block I/O (physical writes, logical block reads), not time
    assert cs == cl, (cs, cl)
    assert ds == dl, (ds, dl)
    assert cs[0] <= 2 * (small.raid.ndata + 1), "create = meta file block(s) + superblock: a stripe or two"


def test_enospc_is_a_clear_error_and_keeps_the_last_cp(make_sim):
    fs = make_sim(query="fsync=0&size=256K")
    sim_apply(fs, "q", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"a" * BS)])
    before = D.fingerprint(fs, "q", None)
    with pytest.raises(BackendError, match="full"):
        sim_apply(fs, "q", [R.Write(path="f", offset=0, data=b"b" * (200 * BS))])
    assert D.fingerprint(fs, "q", None) == before
    assert fs.fsck() == []
    sim_apply(fs, "q", [R.MkFile(path="g")])  # still usable
    assert "g" in D.tree_dict(fs, "q")


def test_info_reports_the_blocks_each_pcpi_holds(make_sim):
    fs = make_sim()
    _big_file(fs, 20)
    fs.snapshot_create("a")
    sim_apply(fs, "q", [R.Write(path="big", offset=0, data=b"z" * (5 * BS))])
    fs.snapshot_create("b")
    fs.snapshot_create("c")
    info = {p["name"]: p for p in fs.info()["pcpis"]}
    assert info["a"]["unique_blocks"] >= 5  # the 5 overwritten data blocks (+ tree/inode blocks)
    assert info["b"]["unique_blocks"] == info["c"]["unique_blocks"] == 0  # b == c == active
    assert info["a"]["blocks"] >= 20
    used = len(fs.rc)
    fs.snapshot_delete("a")
    assert used - len(fs.rc) == info["a"]["unique_blocks"], "unique = exactly what the release frees"
