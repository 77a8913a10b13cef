"""RAID-4 layer: parity on every stripe write, degraded reads, reconstruct, scrub."""

from __future__ import annotations

import os

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import diff as D
from coalesce_sim.raid import BS, xor_blocks
from coalesce_sim.testing import reopen, sim_apply


def _fill(fs, nfiles=20, size=3 * BS + 17):
    recs = [R.MkDir(path="d")]
    for i in range(nfiles):
        recs += [R.MkFile(path=f"d/f{i}"), R.Write(path=f"d/f{i}", offset=0, data=bytes([i % 251 + 1]) * size)]
    sim_apply(fs, "q", recs)


def _stripes_ok(fs):
    for s in range(fs.hwm):
        blocks = [fs.raid._raw_read(d, s) for d in range(fs.raid.ndata)]
        assert xor_blocks(blocks) == fs.raid._raw_read(fs.raid.ndata, s), f"stripe {s}"


def test_parity_is_xor_of_every_stripe(make_sim):
    fs = make_sim()
    _fill(fs)
    fs.snapshot_create("s1")
    sim_apply(fs, "q", [R.Write(path="d/f3", offset=5, data=b"changed")])
    _stripes_ok(fs)
    assert fs.scrub()["mismatches"] == []


@pytest.mark.parametrize("ndisks", [1, 3, 5])
@pytest.mark.parametrize("victim", ["first", "last", "parity"])
def test_degraded_reads_after_a_failed_disk(make_sim, ndisks, victim):
    fs = make_sim(query=f"fsync=0&disks={ndisks}")
    _fill(fs)
    fs.snapshot_create("s1")
    before = D.tree_dict(fs, "q")
    fp = D.fingerprint(fs, "q", "s1")
    disk = {"first": "0", "last": str(ndisks - 1), "parity": "parity"}[victim]
    fs.fail_disk(disk)
    fs = reopen(fs)  # nothing cached: every block comes from the disks
    assert fs.raid.failed is not None
    assert D.tree_dict(fs, "q") == before
    assert D.fingerprint(fs, "q", "s1") == fp
    if victim != "parity":
        assert fs.raid.stats["degraded_reads"] > 0
    # writes keep working degraded, and the result survives reconstruction
    sim_apply(fs, "q", [R.MkFile(path="new"), R.Write(path="new", offset=0, data=b"z" * 9000)])
    after = D.tree_dict(fs, "q")
    fs.reconstruct()
    assert fs.raid.failed is None
    fs = reopen(fs)
    assert D.tree_dict(fs, "q") == after
    assert fs.scrub()["mismatches"] == []
    _stripes_ok(fs)


def test_a_second_failure_is_refused(make_sim):
    fs = make_sim()
    _fill(fs, 3)
    fs.fail_disk("1")
    fs.fail_disk("disk1")  # idempotent
    with pytest.raises(BackendError, match="already failed"):
        fs.fail_disk("parity")
    with pytest.raises(BackendError, match="no disk"):
        fs.raid.parse_disk("7")


def _corrupt(fs, disk: int, stripe: int, offset: int = 100) -> None:
    with open(fs.raid.disk_path(disk), "r+b") as f:
        f.seek(stripe * BS + offset)
        f.write(b"\xff" * 8)
    fs.cache.clear()


def test_scrub_refuses_to_rebuild_parity_from_live_data_it_cannot_trust(make_sim):
    """A live stripe whose parity disagrees with its data: no checksum tells which side is wrong,
    so --repair writes nothing (it would make the bad data block permanent); failing the bad disk
    and reconstructing it from parity brings the data back."""
    fs = make_sim()
    _fill(fs)
    want = D.tree_dict(fs, "q")
    live = sorted(fs.suse)[0]
    _corrupt(fs, 0, live)
    rep = fs.scrub()
    [m] = rep["mismatches"]
    assert (m["stripe"], m["live"], m["decided"]) == (live, True, False) and "no checksum" in m["verdict"]
    before = [open(fs.raid.disk_path(d), "rb").read() for d in range(fs.raid.ndata + 1)]
    with pytest.raises(BackendError, match="nothing was written") as exc:
        fs.scrub(repair=True)
    assert "fail-disk" in exc.value.hint
    assert [open(fs.raid.disk_path(d), "rb").read() for d in range(fs.raid.ndata + 1)] == before
    # the hint's way out: the data disk is the wrong side here
    fs.fail_disk("0")
    fs.reconstruct()
    fs = reopen(fs)
    assert fs.scrub()["mismatches"] == [] and D.tree_dict(fs, "q") == want


def test_scrub_repairs_what_the_checksums_decide(make_sim):
    """A bad superblock copy (its SHA-256 fails) is rewritten from the valid one; a stripe with no
    live block gets its parity from its data; then the volume is clean and its content unchanged."""
    fs = make_sim()
    _fill(fs)
    fs.snapshot_create("s1")
    sim_apply(fs, "q", [R.Unlink(path=f"d/f{i}") for i in range(10)])
    fs.snapshot_delete("s1")  # frees stripes: they keep old data, no live block
    want = D.tree_dict(fs, "q")
    free = fs.free_stripes[0]
    assert not fs.suse.get(free)
    newest = fs.cp % 2
    _corrupt(fs, 1, newest, offset=40)  # disk1's copy of the newest superblock
    _corrupt(fs, 2, free)
    verdicts = {m["stripe"]: m for m in fs.scrub()["mismatches"]}
    assert set(verdicts) == {newest, free} and all(m["decided"] for m in verdicts.values())
    assert "disk1 wrong" in verdicts[newest]["verdict"] and "no live block" in verdicts[free]["verdict"]
    assert fs.scrub(repair=True)["repaired"] == 2
    assert fs.scrub()["mismatches"] == []
    fs = reopen(fs)
    assert D.tree_dict(fs, "q") == want and fs.fsck() == []
    for d in ("0", "2", "parity"):  # the repaired superblock survives any other disk's loss
        fs.fail_disk(d)
        fs = reopen(fs)
        assert D.tree_dict(fs, "q") == want
        fs.reconstruct()
        fs = reopen(fs)


def test_superblock_survives_any_single_disk_loss(make_sim):
    fs = make_sim()
    _fill(fs, 2)
    cp = fs.cp
    for d in ("0", "1", "2", "parity"):
        fs.fail_disk(d)
        fs = reopen(fs)
        assert fs.cp == cp and D.tree_dict(fs, "q")
        fs.reconstruct()
        fs = reopen(fs)
    assert not [p for p in os.listdir(fs.path) if p.endswith(".failed")]
