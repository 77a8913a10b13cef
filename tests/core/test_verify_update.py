"""The check before `done` (coalesce_core.verifier): a change stream that lost one record fails
its update, which rolls back, names the first differing path and exports nothing wrong; the
background verification (`[group] verify_every`) takes the replicas in turn and asks for a
re-seed of one whose export differs.  mem and sim here; btrfs in tests/plugins/btrfs, remote
sources in tests/net."""

from __future__ import annotations

import attrs
import pytest
from dropper import DropRecord, of_type

from coalesce_core import verifier
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import FakeClock, Harness

SEC = 10**9


def _write(h: Harness, qtree: str, recs: list) -> None:
    h.agent.source.apply(qtree, R.framed(qtree, None, "test", recs), use_purgatory=False)


def _seed(h: Harness, qtree: str = "A") -> None:
    _write(
        h,
        qtree,
        [
            R.MkDir(path="a"),
            R.MkDir(path="b"),
            R.MkFile(path="a/x"),
            R.Write(path="a/x", offset=0, data=b"x" * 100),
            R.MkFile(path="a/f"),
            R.Write(path="a/f", offset=0, data=b"old" * 100),
            R.SetAttr(path="a/f", mtime_ns=1 * SEC),
            R.SetAttr(path="a/x", mtime_ns=1 * SEC),
        ],
    )


def _exported_equals_source(h: Harness, name: str) -> bool:
    r = h.agent.state.replicas[name]
    return h.agent.dest.fingerprint(name, r.exported) == h.agent.source.fingerprint(r.source_qtree, r.source_point)


@pytest.mark.parametrize("scheme", ["mem", "sim"])
def test_a_lost_write_fails_the_update_names_the_path_and_rolls_back(group_config, scheme):
    drop = DropRecord(of_type(R.Write, "a/f"))
    h = Harness(group_config(replicas=("A",), scheme=scheme), plugins=[drop])
    _seed(h)
    h.cycle()
    before = h.agent.state.replicas["A"]
    _write(h, "A", [R.Write(path="a/f", offset=0, data=b"new" * 100), R.SetAttr(path="a/f", mtime_ns=2 * SEC)])
    drop.armed = True
    report = h.cycle()
    assert len(drop.dropped) == 1
    assert report["failures"] == 1
    (failure,) = h.agent.failures
    assert failure["replica"] == "A" and failure["trigger"] == "update_failed"
    assert "VerificationFailed: verification failed: 'a/f': content is digest" in failure["error"]
    assert "in source PCPI co-g-src-" in failure["error"]
    after = h.agent.state.replicas["A"]
    assert after.state == "stable" and after.source_point == before.source_point  # rolled back, not moved
    assert _exported_equals_source(h, "A")  # nothing wrong exported
    assert h.agent.dest.fingerprint("A", None) == h.agent.source.fingerprint("A", before.source_point)  # I9
    drop.armed = False
    assert h.cycle()["failures"] == 0
    assert h.agent.state.replicas["A"].source_point != before.source_point and _exported_equals_source(h, "A")


def test_a_lost_rename_is_the_first_differing_path(group_config):
    drop = DropRecord(of_type(R.Rename))
    h = Harness(group_config(replicas=("A",), scheme="sim"), plugins=[drop])
    _seed(h)
    h.cycle()
    # as on a POSIX file system, the rename moves the times of both directories
    _write(
        h,
        "A",
        [R.Rename(old="a/x", new="b/x"), R.SetAttr(path="a", mtime_ns=5 * SEC), R.SetAttr(path="b", mtime_ns=5 * SEC)],
    )
    drop.armed = True
    h.cycle()
    assert drop.dropped == [R.Rename(old="a/x", new="b/x")]
    (failure,) = h.agent.failures
    assert "verification failed: 'a/x' is a regular file in the replica but absent in source PCPI" in failure["error"]
    assert _exported_equals_source(h, "A")


def test_a_baseline_is_checked_whole(group_config):
    drop = DropRecord(of_type(R.SetXattr), incremental_only=False)
    h = Harness(group_config(replicas=("A",)), plugins=[drop])
    _seed(h)
    _write(h, "A", [R.SetXattr(path="a/x", name="user.tag", value=b"1")])
    drop.armed = True
    h.cycle()
    (failure,) = h.agent.failures
    assert failure["trigger"] == "baseline_failed"
    assert "verification failed: 'a/x': xattrs is digest" in failure["error"]
    assert h.agent.state.replicas["A"].exported is None  # a failed baseline exports nothing
    drop.armed = False
    h.cycle()
    assert h.agent.state.replicas["A"].state == "stable" and _exported_equals_source(h, "A")
    assert h.agent.verification_times()["A"]["ok"] is True  # a baseline that passed counts as verified


def test_without_the_check_the_lost_record_is_exported(group_config):
    """`verify = false`: the same lost Write passes and the export differs (what the check prevents)."""
    drop = DropRecord(of_type(R.Write, "a/f"))
    h = Harness(attrs.evolve(group_config(replicas=("A",)), verify=False), plugins=[drop])
    _seed(h)
    h.cycle()
    _write(h, "A", [R.Write(path="a/f", offset=0, data=b"new" * 100), R.SetAttr(path="a/f", mtime_ns=2 * SEC)])
    drop.armed = True
    assert h.cycle()["failures"] == 0
    assert not _exported_equals_source(h, "A")
    out = verifier.verify_export(h.agent.source, h.agent.dest, h.agent.state.replicas["A"], content=True)
    assert [(d.path, d.field) for d in out.differences] == [("a/f", "content")]


def test_the_touched_paths_are_described_not_the_qtree(group_config):
    """The check of an update describes what its records named, not every path of the qtree."""
    asked: list[str] = []

    class Spy:
        from coalesce_core.backend.hookspecs import hookimpl

        @hookimpl(wrapper=True)
        def coalesce_describe(self, volume, qtree, snapshot, paths):
            asked.extend(p for p, _c in paths)
            return (yield)

    h = Harness(group_config(replicas=("A",)), plugins=[Spy()])
    _seed(h)
    _write(h, "A", [R.MkDir(path=f"many{i}") for i in range(50)])
    h.cycle()
    asked.clear()
    _write(h, "A", [R.Write(path="a/f", offset=0, data=b"new"), R.SetAttr(path="a/f", mtime_ns=3 * SEC)])
    h.cycle()
    assert sorted(set(asked)) == ["", "a/f"]


# ---------------------------------------------------------------------------
# verify_every
# ---------------------------------------------------------------------------
def _damage_replica(h: Harness, replica: str) -> None:
    """Flip a byte of a/x in the replica's active FS (which the next coalesced base holds and exports)."""
    vol = h.agent.dest.handle
    with vol.lock:
        vol._writable(replica).root.children["a"].children["x"].data[0] ^= 1


def test_verify_every_takes_the_replicas_in_turn_and_reseeds_a_damaged_one(group_config):
    """(a mem destination, whose images can be damaged by hand)"""
    clock = FakeClock()
    cfg = attrs.evolve(group_config(replicas=("A", "B", "C")), verify_every=300.0)
    h = Harness(cfg, clock=clock)
    for q in ("A", "B", "C"):
        _seed(h, q)
    h.cycle()  # baselines: each verified whole, at t0
    t0 = clock.now
    assert {n: v["at"] for n, v in h.agent.verification_times().items()} == {"A": t0, "B": t0, "C": t0}
    order = []
    for _ in range(20):
        clock.advance(25)
        before = h.agent.verification_times()
        h.cycle()
        after = h.agent.verification_times()
        order += [(clock.now - t0, n) for n in after if after[n]["at"] != before[n]["at"]]
    assert [n for _t, n in order] == ["A", "B", "C", "A", "B"]
    assert [t for t, _n in order] == [100, 200, 300, 400, 500]  # every 300 s / 3 replicas
    assert all(v["ok"] for v in h.agent.verification_times().values())
    # C is next (at 600 s): damage its active FS, which the next coalesced base exports (the
    # check of its empty updates names no path there: only a whole-image verification sees it)
    _damage_replica(h, "C")
    for _ in range(4):
        clock.advance(25)
        h.cycle()
    c = h.agent.state.replicas["C"]
    assert h.agent.verification_times()["C"]["at"] - t0 == 600
    assert c.state not in ("stable", "done") and "background verification: 'a/x': content" in c.reseed_reason
    assert h.agent.verification_times()["C"]["ok"] is False
    for _ in range(3):  # the re-seed rebuilds it, and it rejoins
        clock.advance(25)
        h.cycle()
    c = h.agent.state.replicas["C"]
    assert c.state == "stable" and _exported_equals_source(h, "C")


class _LinkAsCopy:
    """A translation that gives a new name of a file its own copy of the data (the btrfs tree
    compare's old slip, docs/verification.md "Found so far"): HardLink becomes MkFile + Write."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.armed = False
        self.copied: list[str] = []

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield
        if result is None or not self.armed or base is None or "src" not in str(getattr(volume, "url", volume)):
            return result
        return self._copy(result)

    def _copy(self, records):
        extra = 0
        for rec in records:
            if isinstance(rec, R.HardLink):
                self.copied.append(rec.path)
                extra += 2
                yield R.MkFile(path=rec.path)
                yield R.Write(path=rec.path, offset=0, data=self.data)
                yield R.SetAttr(path=rec.path, mtime_ns=SEC)  # every field equal, the link apart
                continue
            if isinstance(rec, R.End):
                rec = R.End(records=rec.records + extra)
            yield rec


def test_a_new_name_made_a_separate_file_fails_the_update_though_the_kept_name_was_not_touched(group_config):
    """Only the new name d is touched; the kept name p is not, so comparing the touched paths alone
    saw a file equal in bytes.  d has fewer links in the replica than in the source: the check
    walks the source qtree for the group's other names and compares them too (hard-link groups)."""
    data = b"same" * 25
    copy = _LinkAsCopy(data)
    h = Harness(group_config(replicas=("A",), scheme="sim"), plugins=[copy])
    _write(h, "A", [R.MkFile(path="p"), R.Write(path="p", offset=0, data=data), R.SetAttr(path="p", mtime_ns=SEC)])
    h.cycle()
    before = h.agent.state.replicas["A"]
    _write(h, "A", [R.HardLink(path="d", existing="p")])
    copy.armed = True
    report = h.cycle()
    assert copy.copied == ["d"]
    assert report["failures"] == 1
    (failure,) = h.agent.failures
    assert "VerificationFailed" in failure["error"] and "hard link" in failure["error"], failure["error"]
    assert h.agent.state.replicas["A"].source_point == before.source_point and _exported_equals_source(h, "A")
    copy.armed = False
    assert h.cycle()["failures"] == 0 and _exported_equals_source(h, "A")
