"""The transfer pipeline (coalesce_core.transfer.run_transfer), driven directly on mem volumes.

No agent and no ledger: a Transfer effect, a source and a destination Volume, and what the
pipeline leaves on them.
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
from typing import Any, Iterator

import pytest
from dropper import DropRecord, of_type
from forger import ForgeBegin

import coalesce_mem
from coalesce_core.backend.faults import FaultInjector, InjectedFault, Rule
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import SimulatedCrash
from coalesce_core.cycle.effects import Transfer
from coalesce_core.errors import UnrequestedStream, VerificationFailed
from coalesce_core.stream.records import Begin, MkFile, Unlink, Write
from coalesce_core.stream.spool import Spool, skip_changes
from coalesce_core.transfer import PROGRESS_EVERY, Transferred, crash_point, run_transfer

_ids = itertools.count()


class ResumableMem(VolumeHandle):
    """A mem volume whose diff resumes by itself, as a remote source's does (its records come
    decoded, and ``diff(..., skip=k)`` leaves out the first k change records)."""

    records_decoded = True
    resumable_diff = True

    def __init__(self, inner: coalesce_mem.MemVolume) -> None:
        self.inner = inner
        self.skips: list[int] = []

    @property
    def url(self) -> str:
        return "rmem://" + self.inner.location

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def diff(self, qtree: str, base: str | None, target: str, skip: int = 0) -> Iterator[Any]:
        self.skips.append(skip)
        return skip_changes(self.inner.diff(qtree, base, target), skip)


class ResumableBackend:
    @hookimpl
    def coalesce_backend_info(self):
        return {"scheme": "rmem", "description": "test: a mem volume that resumes its diffs"}

    @hookimpl
    def coalesce_open_volume(self, url, create):
        if url.scheme != "rmem":
            return None
        return ResumableMem(coalesce_mem.volume_for("mem://" + url.location, create=create))


class Closing:
    """Outermost wrapper of coalesce_diff (registered last): notes whether each diff was closed."""

    def __init__(self) -> None:
        self.closed: list[bool] = []

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree):
        result = yield
        i = len(self.closed)
        self.closed.append(False)
        return _Tracked(result, lambda: self.closed.__setitem__(i, True))


class _Tracked:
    def __init__(self, inner: Any, on_close: Any) -> None:
        self.inner, self.on_close = iter(inner), on_close

    def __iter__(self) -> "_Tracked":
        return self

    def __next__(self) -> Any:
        return next(self.inner)

    def close(self) -> None:
        self.on_close()
        getattr(self.inner, "close", lambda: None)()


class Pair:
    """A source and a destination volume of one plugin manager; ``writer`` writes the source."""

    def __init__(self, *plugins: object, source_scheme: str = "mem") -> None:
        n = next(_ids)
        self.names = (f"tr-src-{n}", f"tr-dst-{n}")
        self.pm = plugin_manager(plugins)
        self.src = Volume.open(self.pm, f"{source_scheme}://{self.names[0]}", create=True)
        self.dst = Volume.open(self.pm, f"mem://{self.names[1]}", create=True)
        self.writer = coalesce_mem.volume_for(f"mem://{self.names[0]}")
        self.dwriter = coalesce_mem.volume_for(f"mem://{self.names[1]}")

    def close(self) -> None:
        for name in self.names:
            coalesce_mem.forget(f"mem://{name}")

    def fill(self, files: int, size: int = 100, prefix: str = "f") -> None:
        for i in range(files):
            self.writer.write_file(f"A/d{i % 3}/{prefix}{i}", bytes([i % 251]) * size)

    def changes(self, base: str | None, target: str) -> list[Any]:
        """The change records of the source's diff (Begin and End left out)."""
        return list(self.src.diff("A", base, target))[1:-1]

    def same(self, target: str) -> bool:
        return self.dst.fingerprint("R") == self.src.fingerprint("A", target)


@pytest.fixture
def pairs():
    made: list[Pair] = []

    def make(*plugins: object, **kw: Any) -> Pair:
        made.append(Pair(*plugins, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def baseline(target: str = "s1", **kw: Any) -> Transfer:
    return Transfer(replica="R", source_qtree="A", base=None, target=target, **kw)


def update(base: str = "s1", target: str = "s2", **kw: Any) -> Transfer:
    return Transfer(replica="R", source_qtree="A", base=base, target=target, **kw)


def _seed(p: Pair) -> None:
    """The source at s1, the replica equal to it, and the destination's PCPI d1 of that."""
    p.fill(12)
    p.writer.snapshot_create("s1")
    run_transfer(baseline(), p.src, p.dst)
    p.dst.snapshot_create("d1")


def _change(p: Pair, files: int = 40) -> None:
    """s2: one file rewritten, one removed, ``files`` new ones."""
    p.writer.write_file("A/d0/f0", b"rewritten")
    p.writer.unlink("A/d1/f1")
    p.fill(files, size=300, prefix="new")
    p.writer.snapshot_create("s2")


def test_crash_points_name_the_kind_of_transfer():
    assert crash_point(baseline()) == "mid_baseline"
    assert crash_point(baseline(reseed=True)) == "mid_reseed"
    assert crash_point(update()) == "mid_apply"


def test_a_baseline_replaces_whatever_the_qtree_held_and_is_checked(pairs):
    p = pairs()
    p.fill(12)
    p.writer.snapshot_create("s1")
    p.dwriter.write_file("R/left-over", b"from a failed baseline")
    changes = p.changes(None, "s1")
    got = run_transfer(baseline(), p.src, p.dst)
    assert got == Transferred(
        records=len(changes), nbytes=sum(len(r.data) for r in changes if type(r) is Write), verified=True
    )
    assert p.same("s1")
    assert not p.dwriter.exists("R/left-over")


def test_an_update_applies_the_changes_with_purgatory(pairs):
    p = pairs()
    _seed(p)
    _change(p)
    got = run_transfer(update(), p.src, p.dst)
    assert got.records == len(p.changes("s1", "s2")) and got.verified
    assert p.same("s2")
    assert p.dwriter.purgatory_size("R") > 0  # the removed and the replaced file wait there


def test_progress_is_reported_every_PROGRESS_EVERY_records(pairs):
    p = pairs()
    p.fill(PROGRESS_EVERY + 30)  # a MkFile and a Write each, plus the directories
    p.writer.snapshot_create("s1")
    calls: list[tuple[int, int]] = []
    got = run_transfer(baseline(), p.src, p.dst, progress=lambda n, nbytes: calls.append((n, nbytes)))
    assert [n for n, _b in calls] == [PROGRESS_EVERY * k for k in range(1, got.records // PROGRESS_EVERY + 1)]
    assert len(calls) >= 2
    assert all(0 < b <= got.nbytes for _n, b in calls) and calls[0][1] < calls[1][1]


def test_a_stream_cut_at_the_source_fails_cleanly(pairs, tmp_path):
    faults = FaultInjector(Rule(hook="coalesce_diff", qtree="A", record=5, times=1, volume="tr-src", updates_only=True))
    closing = Closing()
    p = pairs(faults, closing)
    _seed(p)
    _change(p)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InjectedFault, match="at record 6"):
        run_transfer(update(), p.src, p.dst, spool=spool)
    assert spool.replicas() == []  # a failed update is rolled back, never resumed
    assert closing.closed[-1] is True  # the diff cut short was closed at once
    assert not p.same("s2")  # the partial qtree is left to the rollback
    p.dst.snapshot_create("rb")
    p.dst.rollback("R", "rb", "d1")
    assert run_transfer(update(), p.src, p.dst, spool=spool).verified and p.same("s2")


def test_a_record_the_source_lost_fails_the_check_unless_verification_is_off(pairs):
    drop = DropRecord(of_type(Unlink, "d1/f1"), volume="tr-src")
    p = pairs(drop)
    _seed(p)
    _change(p)
    drop.armed = True
    with pytest.raises(VerificationFailed):
        run_transfer(update(), p.src, p.dst)
    assert drop.dropped
    p.dst.snapshot_create("rb")
    p.dst.rollback("R", "rb", "d1")
    got = run_transfer(update(), p.src, p.dst, verify=False)
    assert not got.verified and not p.same("s2")  # nothing looked: the loss went through


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no spool"])
def test_an_update_goes_through_the_spool_only_when_given_one(pairs, tmp_path, spooled):
    p = pairs()
    _seed(p)
    _change(p, files=150)
    spool = Spool(tmp_path / "spool")
    seen: list[list[str]] = []
    got = run_transfer(
        update(), p.src, p.dst, spool=spool if spooled else None, progress=lambda n, b: seen.append(spool.replicas())
    )
    assert seen and seen == [["R"] if spooled else []] * len(seen)
    assert spool.replicas() == []  # removed once the update is applied
    assert got.records == len(p.changes("s1", "s2")) and p.same("s2")


def _crash(p: Pair, eff: Transfer, spool: Spool, after: int) -> None:
    """Run ``eff`` until ``after`` records went through, then abandon it as a crash would."""
    n = itertools.count()

    def aborted() -> bool:
        return next(n) >= after

    with pytest.raises(SimulatedCrash):
        run_transfer(eff, p.src, p.dst, spool=spool, aborted=aborted)
    gc.collect()  # the abandoned stream lets go of its spool file


def test_a_baseline_never_spools(pairs, tmp_path):
    p = pairs()
    p.fill(100)
    p.writer.snapshot_create("s1")
    spool = Spool(tmp_path / "spool")
    _crash(p, baseline(), spool, after=150)
    assert spool.replicas() == []


@pytest.mark.parametrize("remote", [False, True], ids=["local source", "resumable source"])
def test_an_interrupted_update_resumes_from_its_spool(pairs, tmp_path, caplog, remote):
    """The spool keeps what arrived before the crash; after the rollback the update replays it and
    takes only the rest from the source: a local stream is checked whole by the codec and skipped
    by the pipeline, a resumable source is asked to skip."""
    p = pairs(ResumableBackend(), source_scheme="rmem") if remote else pairs()
    _seed(p)
    _change(p, files=150)
    changes = p.changes("s1", "s2")
    spool = Spool(tmp_path / "spool")
    _crash(p, update(), spool, after=200)
    begin = Begin(qtree="A", base="s1", target="s2")
    assert spool.holds("R", begin)
    kept = spool.count("R")
    assert 0 < kept <= 200
    p.dst.snapshot_create("rb")  # what recovery does before the resume
    p.dst.rollback("R", "rb", "d1")
    with caplog.at_level(logging.INFO, logger="coalesce.spool"):
        got = run_transfer(update(resume=True), p.src, p.dst, spool=spool)
    assert [int(k) for k in re.findall(r"replica R: (\d+) change records replayed", caplog.text)] == [kept]
    assert got.records == len(changes)  # each record once: End counts them all
    assert p.same("s2") and got.verified
    assert spool.replicas() == []
    if remote:
        assert p.src.handle.skips[-1] == kept


def test_a_spool_of_another_stream_is_not_replayed(pairs, tmp_path, caplog):
    p = pairs()
    _seed(p)
    _change(p)
    spool = Spool(tmp_path / "spool")
    list(spool.record("R", iter([Begin(qtree="A", base="s1", target="s9"), MkFile(path="stale")])))
    with caplog.at_level(logging.INFO, logger="coalesce.spool"):
        run_transfer(update(resume=True), p.src, p.dst, spool=spool)
    assert "replayed" not in caplog.text
    assert p.same("s2") and not p.dwriter.exists("R/stale") and spool.replicas() == []


def test_a_fault_on_the_resumed_diff_of_a_resumable_source_fails_the_update_cleanly(pairs, tmp_path):
    """The resumed diff goes through the hook chain like any other: a fault rule cuts it."""
    faults = FaultInjector()
    p = pairs(ResumableBackend(), faults, source_scheme="rmem")
    _seed(p)
    _change(p, files=150)
    spool = Spool(tmp_path / "spool")
    _crash(p, update(), spool, after=200)
    p.dst.snapshot_create("rb")
    p.dst.rollback("R", "rb", "d1")
    rule = faults.add(Rule(hook="coalesce_diff", qtree="A", volume="tr-src", record=3, times=1))
    with pytest.raises(InjectedFault, match="at record 4"):
        run_transfer(update(resume=True), p.src, p.dst, spool=spool)
    assert rule.fired == 1 and p.src.handle.skips[-1] > 0  # it fired for the diff asked to skip
    assert spool.replicas() == []


FORGED = {"qtree": {"qtree": "B"}, "base": {"base": "s0"}, "target": {"target": "s3"}}


@pytest.mark.parametrize("field", sorted(FORGED))
@pytest.mark.parametrize("remote", [False, True], ids=["local source", "resumable source"])
@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no spool"])
def test_a_stream_of_another_qtree_base_or_target_is_refused_before_anything_is_applied(
    pairs, tmp_path, field, remote, spooled
):
    forge = ForgeBegin(volume="tr-src", **FORGED[field])
    p = pairs(ResumableBackend(), forge, source_scheme="rmem") if remote else pairs(forge)
    _seed(p)
    _change(p)
    spool = Spool(tmp_path / "spool")
    forge.armed = True
    with pytest.raises(UnrequestedStream, match="the transfer asked for qtree 'A' from 's1' to 's2'") as info:
        run_transfer(update(), p.src, p.dst, spool=spool if spooled else None)
    assert repr(FORGED[field][field]) in str(info.value)
    assert forge.pulled == [1]  # the Begin, and nothing after it
    assert p.dst.fingerprint("R") == p.dst.fingerprint("R", "d1")  # no rollback needed: nothing applied
    assert spool.replicas() == []
    forge.armed = False
    assert run_transfer(update(), p.src, p.dst, spool=spool if spooled else None).verified and p.same("s2")


def test_a_baseline_of_another_qtree_is_refused_and_leaves_the_replica_empty(pairs):
    forge = ForgeBegin(volume="tr-src", qtree="B")
    p = pairs(forge)
    p.fill(12)
    p.writer.write_file("B/secret", b"not for R")
    p.writer.snapshot_create("s1")
    forge.armed = True
    with pytest.raises(UnrequestedStream, match="stream of qtree 'B' from the empty tree to 's1'"):
        run_transfer(baseline(), p.src, p.dst)
    assert forge.pulled == [1]
    assert not p.dwriter.exists("R/secret") and not p.dwriter.exists("R/d0")


def test_a_resumed_stream_of_another_target_is_refused_after_the_spooled_records(pairs, tmp_path):
    """The spool replays what was checked when it was recorded; the source's rest is checked again."""
    forge = ForgeBegin(volume="tr-src", target="s3")
    p = pairs(ResumableBackend(), forge, source_scheme="rmem")
    _seed(p)
    _change(p, files=150)
    spool = Spool(tmp_path / "spool")
    _crash(p, update(), spool, after=200)
    p.dst.snapshot_create("rb")
    p.dst.rollback("R", "rb", "d1")
    forge.armed = True
    with pytest.raises(UnrequestedStream, match="qtree 'A' from 's1' to 's3'"):
        run_transfer(update(resume=True), p.src, p.dst, spool=spool)
    assert forge.pulled == [1] and p.src.handle.skips[-1] > 0
    assert spool.replicas() == []
