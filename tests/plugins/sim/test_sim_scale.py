"""Cost per qtree stays constant as the volume holds more qtrees (docs/sim.md), and group commit.

Costs are asserted as exact block counts (the sim counts every block read and write), never times.
"""

from __future__ import annotations

import threading
import time

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import diff as D
from coalesce_sim.fs import ROOT_INO
from coalesce_sim.testing import reopen, sim_apply


def _qtrees(fs, n, tag=b"0"):
    for i in range(n):
        sim_apply(fs, f"q{i:04d}", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=tag * 64)])


def _writes_of(fs, fn):
    w0 = fs.raid.stats["writes"]
    fn()
    return fs.raid.stats["writes"] - w0


def test_a_cp_after_changing_one_qtree_among_many_writes_a_bounded_number_of_blocks(make_sim):
    costs = {}
    for n in (40, 600):
        fs = make_sim(f"v{n}")
        _qtrees(fs, n)
        assert fs.root.height == 2, "both inode files have one indirect level"
        cp = fs.cp
        costs[n] = _writes_of(fs, lambda: sim_apply(fs, "q0007", [R.Write(path="f", offset=0, data=b"x" * 64)]))
        assert fs.cp == cp + 1 and fs.fsck() == []
    # data block + inode-file block + inode-file top: one stripe, then the superblock stripe
    stripe = fs.raid.ndata + 1
    assert costs[40] == costs[600] == 2 * stripe, costs


def _diff_all(fs, names, base, target):
    reads = []
    out = {}
    for q in names:
        fs.stats["block_reads"] = 0
        out[q] = [r for r in D.diff_stream(fs, q, base, target) if not isinstance(r, (R.Begin, R.End))]
        reads.append(fs.stats["block_reads"])
    return reads, out


def test_diffs_of_many_qtrees_between_two_pcpis_walk_the_change_once(make_sim):
    per_diff = {}
    for n in (40, 400):
        fs = make_sim(f"d{n}")
        names = [f"q{i:04d}" for i in range(n)]
        _qtrees(fs, n, b"0")
        fs.snapshot_create("a")
        _qtrees(fs, n, b"1")  # every qtree changed between a and b
        fs.snapshot_create("b")
        builds = fs.stats["change_index_builds"]
        reads, out = _diff_all(fs, names, "a", "b")
        for q in names:  # each diff sends its own change (the data, then the mtime they move), nothing else
            assert [type(r) for r in out[q]] == [R.Write, R.SetAttr], out[q]
            assert out[q][0] == R.Write(path="f", offset=0, data=b"1" * 64) and out[q][1].path == "f", out[q]
        assert fs.stats["change_index_builds"] == builds + 1, "one walk of the whole change"
        # a diff after the first costs the same at 40 and at 400 qtrees (the first walks the
        # change of all qtrees, once, to index it)
        per_diff[n] = (reads[0], max(reads[1:]))
    assert per_diff[400][1] == per_diff[40][1], per_diff
    # the one walk (in the first diff) follows the change of all qtrees: 10x the qtrees, ~10x its reads
    walk = {n: first - rest for n, (first, rest) in per_diff.items()}
    assert 5 * walk[40] < walk[400] < 15 * walk[40], per_diff


def test_the_change_index_goes_when_an_image_it_names_is_freed(make_sim):
    fs = make_sim()
    _qtrees(fs, 3, b"0")
    fs.snapshot_create("a")
    _qtrees(fs, 3, b"1")
    fs.snapshot_create("b")
    list(D.diff_stream(fs, "q0001", "a", "b"))
    assert len(fs.change_idx) == 1
    sim_apply(fs, "q0000", [R.MkFile(path="g")])  # the active image moves on from b (b keeps its blocks)
    assert len(fs.change_idx) == 1
    fs.snapshot_delete("b")  # b's inode-file top is freed: its index goes
    assert fs.change_idx == {} and fs.idx_tops == {}
    _qtrees(fs, 3, b"2")
    fs.snapshot_create("b")  # may reuse b's old blocks: the diff must see "2"
    recs = list(D.diff_stream(fs, "q0001", "a", "b"))
    assert R.Write(path="f", offset=0, data=b"2" * 64) in recs
    assert fs.fsck() == []


# ------------------------------------------------------------------ group commit
def _gate(fs, fail: bool = False):
    """Hold the first flush (raid.sync) of the next CP until released; optionally fail it."""
    state = {"calls": 0}
    in_flush, release = threading.Event(), threading.Event()
    orig = fs.raid.sync

    def sync():
        state["calls"] += 1
        if state["calls"] == 1:
            in_flush.set()
            assert release.wait(20)
            if fail:
                raise OSError(5, "injected EIO")
        orig()

    fs.raid.sync = sync
    return in_flush, release


def _run_concurrently(fs, names, fail=False):
    """Apply to names[0]; while its CP is being flushed, apply to the others; then let it finish."""
    in_flush, release = _gate(fs, fail)
    waiting = []
    orig_wait = fs.wait_durable

    def wait_durable(need, failures):
        waiting.append(need)
        return orig_wait(need, failures)

    fs.wait_durable = wait_durable
    returned, errors = {}, {}

    def run(q):
        try:
            sim_apply(fs, q, [R.MkFile(path="f"), R.Write(path="f", offset=0, data=q.encode())])
            returned[q] = fs.cp  # the CP on disk when the apply returned
        except BackendError as exc:
            errors[q] = exc

    first = threading.Thread(target=run, args=(names[0],))
    first.start()
    assert in_flush.wait(20)
    others = [threading.Thread(target=run, args=(q,)) for q in names[1:]]
    for t in others:
        t.start()
    deadline = time.monotonic() + 20
    while len(waiting) < len(names) and time.monotonic() < deadline:
        time.sleep(0.005)  # every apply has changed the overlay and waits
    assert len(waiting) == len(names)
    assert not returned and not errors, "nobody returns before its CP is on disk"
    assert all(q in fs.ov_dirs[ROOT_INO] for q in names[1:])
    release.set()
    for t in [first] + others:
        t.join(20)
    del fs.wait_durable
    return returned, errors


def test_concurrent_applies_share_one_cp_and_return_only_when_it_is_on_disk(make_sim):
    fs = make_sim()
    cp = fs.cp
    names = ["qa", "qb", "qc", "qd"]
    returned, errors = _run_concurrently(fs, names)
    assert errors == {}
    assert fs.cp == cp + 2, "qa's CP, then ONE CP for qb, qc and qd"
    assert returned["qa"] >= cp + 1 and all(returned[q] >= cp + 2 for q in names[1:])
    assert fs.fsck() == []
    fs2 = reopen(fs)
    for q in names:
        assert D.tree_dict(fs2, q)["f"][2] == q.encode()


def test_a_failed_group_cp_fails_every_apply_it_covered(make_sim):
    fs = make_sim()
    sim_apply(fs, "q0", [R.MkFile(path="f")])
    cp = fs.cp
    names = ["qa", "qb", "qc"]
    returned, errors = _run_concurrently(fs, names, fail=True)
    assert returned == {}
    assert "injected EIO" in str(errors["qa"])  # the leader: the I/O error
    assert all("were lost" in str(errors[q]) for q in names[1:])  # the others: their changes are gone
    assert fs.cp == cp and fs.view().qtrees() == ["q0"] and fs.fsck() == []
    sim_apply(fs, "qe", [R.MkFile(path="g")])  # and the volume carries on
    assert reopen(fs).view().qtrees() == ["q0", "qe"]


@pytest.mark.parametrize("n", [8])
def test_many_threads_applying_at_once_end_consistent(make_sim, n):
    fs = make_sim()
    names = [f"t{i}" for i in range(n)]

    def run(q):
        for k in range(5):
            sim_apply(fs, q, [R.MkFile(path=f"f{k}"), R.Write(path=f"f{k}", offset=0, data=f"{q}{k}".encode())])

    threads = [threading.Thread(target=run, args=(q,)) for q in names]
    cps = fs.stats["cps"]  # (making the volume took CPs of its own)
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fs.stats["cps"] - cps <= 5 * n and fs.fsck() == []
    fs2 = reopen(fs)
    for q in names:
        assert {p: v[2] for p, v in D.tree_dict(fs2, q).items()} == {f"f{k}": f"{q}{k}".encode() for k in range(5)}
