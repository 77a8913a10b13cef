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


def test_scrub_finds_and_repairs_a_corrupt_stripe(make_sim):
    fs = make_sim()
    _fill(fs)
    live = sorted(fs.suse)[0]
    path = fs.raid.disk_path(0)
    with open(path, "r+b") as f:
        f.seek(live * BS + 100)
        f.write(b"\xff" * 8)
    rep = fs.scrub()
    assert [m["stripe"] for m in rep["mismatches"]] == [live] and rep["mismatches"][0]["live"]
    assert fs.scrub(repair=True)["repaired"] == 1
    assert fs.scrub()["mismatches"] == []


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
