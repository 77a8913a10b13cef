"""The spool (coalesce_core.stream.spool) and resume after a restart (spec: resume_updates).

An update a restart interrupts is rolled back (Fig. 9) and restarts in the same
cycle: the change records that had arrived are replayed from the spool, the
source is asked only for the rest, and the result is exactly the image an
uninterrupted update leaves (I3).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re

import pytest

from coalesce_core.errors import CorruptStream
from coalesce_core.stream import codec
from coalesce_core.stream.records import Begin, End, MkFile, Write
from coalesce_core.stream.spool import Budget, Spool, _changes, skip_changes
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

BEGIN = Begin(qtree="A", base="s1", target="s2")


def _stream(n: int) -> list:
    recs: list = [BEGIN]
    for i in range(n):
        recs += [MkFile(path=f"f{i}"), Write(path=f"f{i}", offset=0, data=bytes([i % 256]) * 100)]
    return [*recs, End(records=2 * n)]


def test_record_passes_every_record_through_and_spools_the_changes(tmp_path):
    sp = Spool(tmp_path / "g.spool")
    recs = _stream(5)
    assert list(sp.record("A", iter(recs))) == recs
    assert sp.holds("A", BEGIN)
    assert sp.count("A") == 10
    assert sp.replicas() == ["A"]
    assert not sp.holds("A", Begin(qtree="A", base="s1", target="s3"))  # another stream
    assert not sp.holds("B", BEGIN)
    sp.discard("A")
    assert sp.replicas() == [] and not sp.holds("A", BEGIN)


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_torn_or_damaged_tail_is_cut_at_the_last_whole_frame(tmp_path, damage):
    sp = Spool(tmp_path)
    list(sp.record("A", iter(_stream(6))))
    path = sp.path("A")
    raw = bytearray(path.read_bytes())
    if damage == "torn":
        raw = raw[:-50]  # inside the last Write frame
    else:
        raw[-50] ^= 0xFF  # its crc no longer matches
    path.write_bytes(bytes(raw))
    assert sp.holds("A", BEGIN)
    assert sp.count("A") == 11  # every whole, checksummed frame before the damage


def test_resume_replays_the_spool_then_asks_the_source_for_the_rest(tmp_path):
    sp = Spool(tmp_path)
    full = _stream(8)
    it = sp.record("A", iter(full))
    for _ in range(1 + 7):  # Begin and 7 change records arrived, then the agent was killed
        next(it)
    it.close()  # the transfer stopped (a SIGKILL would also lose what was still queued)
    asked: list[int] = []

    def rest(k: int):
        asked.append(k)
        return skip_changes(iter(full), k)

    got = list(sp.resume("A", BEGIN, rest))
    assert got == full  # record for record: what an uninterrupted transfer delivers
    assert asked == [7]
    assert sp.count("A") == 16  # the spool was rewritten as the resumed update went on


def test_resume_refuses_a_source_that_answers_with_another_stream(tmp_path):
    sp = Spool(tmp_path)
    list(sp.record("A", iter(_stream(2))))
    other = [Begin(qtree="A", base="s1", target="s9"), End(records=0)]
    with pytest.raises(CorruptStream, match="not s1..s2"):
        list(sp.resume("A", BEGIN, lambda k: iter(other)))


def test_a_spool_that_cannot_be_written_is_dropped_and_the_records_still_flow(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    sp = Spool(tmp_path / "file" / "g.spool")
    recs = _stream(3)
    with caplog.at_level(logging.WARNING, logger="coalesce.spool"):
        assert list(sp.record("A", iter(recs))) == recs
    assert "goes on without it" in caplog.text
    assert not sp.holds("A", BEGIN)


def _big_stream(mib: int) -> list:
    recs: list = [BEGIN]
    for i in range(mib):
        recs += [Write(path="big", offset=i << 20, data=bytes([i % 251]) * (1 << 20))]
    return [*recs, End(records=mib)]


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page cache"])
def test_the_spool_file_is_exact_written_directly_or_through_the_page_cache(tmp_path, monkeypatch, direct):
    """Blocks of 1 MiB with O_DIRECT, the last one padded, then the file is cut to its length: the
    same bytes as a spool written through the page cache (where O_DIRECT is refused, as on tmpfs)."""
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT")
    sp = Spool(tmp_path)
    recs = [*_big_stream(3)[:-1], *_stream(4)[1:-1], End(records=11)]
    assert list(sp.record("A", iter(recs))) == recs
    raw = sp.path("A").read_bytes()
    enc = codec.StreamEncoder(digest=False)
    assert raw == enc.header() + b"".join(b"".join(bytes(c) for c in enc.frame(r)) for r in recs[:-1])
    assert sp.count("A") == 11


def test_a_file_system_that_opens_with_o_direct_but_refuses_its_writes_gets_the_page_cache(tmp_path, monkeypatch):
    """Some file systems (FUSE ones) take O_DIRECT at open and fail the writes with EINVAL: the
    writer clears O_DIRECT on the file and goes on, the spool is whole and exact."""
    import fcntl

    from coalesce_core.stream import spool as spool_mod

    refused = []
    real_write = os.write

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(spool_mod.os, "write", write)
    sp = Spool(tmp_path)
    recs = [*_big_stream(2)[:-1], *_stream(3)[1:-1], End(records=8)]
    assert list(sp.record("A", iter(recs))) == recs
    monkeypatch.setattr(spool_mod.os, "write", real_write)
    enc = codec.StreamEncoder(digest=False)
    assert refused == [1 << 20]
    assert sp.path("A").read_bytes() == enc.header() + b"".join(
        b"".join(bytes(c) for c in enc.frame(r)) for r in recs[:-1]
    )
    assert sp.count("A") == 8


def test_a_spool_cut_short_by_a_crash_holds_its_whole_blocks(tmp_path):
    """A writer that stops without close (the agent was killed) leaves the 1 MiB blocks it wrote: a
    valid prefix of the stream, which a resume replays; the source sends the rest."""
    from coalesce_core.stream.spool import _Writer

    w = _Writer.create(tmp_path / "A.stream")
    for rec in _big_stream(5)[:-1]:
        w.write(rec)
    w._hand_over()
    w._q.put(None)  # the writer thread ends; nothing flushes the partial block
    w._thread.join()
    size = (tmp_path / "A.stream").stat().st_size
    enc = codec.StreamEncoder(digest=False)
    ends, pos = [], len(enc.header())
    for rec in _big_stream(5)[:-1]:
        pos += sum(len(c) for c in enc.frame(rec))
        ends.append(pos)
    assert size == (ends[-1] // (1 << 20)) * (1 << 20) == 5 << 20
    whole_changes = sum(1 for e in ends[1:] if e <= size)  # ends[0] is Begin's
    assert whole_changes == 4 and Spool(tmp_path).count("A") == whole_changes


def test_skip_changes_keeps_begin_and_end_and_refuses_a_short_stream():
    full = _stream(3)
    assert list(skip_changes(iter(full), 4)) == [BEGIN, *full[5:]]
    assert list(skip_changes(iter(full), 0)) == full
    with pytest.raises(CorruptStream, match="has only 6"):
        list(skip_changes(iter(full), 7))


def test_skip_changes_close_closes_the_wrapped_diff_even_unstarted():
    closed = []

    def diff():
        try:
            yield from _stream(2)
        finally:
            closed.append(True)

    g = diff()
    next(g)  # a started diff (holding, say, a clone)
    skip_changes(g, 1).close()
    assert closed == [True]


def test_the_spool_is_the_codec_format_without_a_trailer(tmp_path):
    sp = Spool(tmp_path)
    list(sp.record("A", iter(_stream(2))))
    data = sp.path("A").read_bytes()
    assert data.startswith(codec.MAGIC)
    assert not data.endswith(codec.END_MAGIC)


def test_a_spool_at_its_bound_keeps_its_prefix_the_stream_flows_and_resume_asks_for_the_rest(tmp_path, caplog):
    """[group] spool_max (docs/config.md): at the bound the spool stops growing and keeps whole frames
    of the stream's start; every record still reaches the applier; a resume replays that prefix and
    asks the source for the rest, and the rewritten spool keeps to the bound too."""
    bound = 4096
    sp = Spool(tmp_path, Budget(replica=bound))
    full = _stream(200)  # about 40 KiB of frames
    with caplog.at_level(logging.INFO, logger="coalesce.spool"):
        assert list(sp.record("A", iter(full))) == full
    assert "reached its size bound" in caplog.text
    size = sp.path("A").stat().st_size
    k = sp.count("A")
    assert 0 < size <= bound and 0 < k < 400
    assert list(_changes(sp.path("A"))) == full[1 : 1 + k]  # a prefix of the stream, whole frames
    asked: list[int] = []

    def rest(n: int):
        asked.append(n)
        return skip_changes(iter(full), n)

    assert list(sp.resume("A", BEGIN, rest)) == full
    assert asked == [k] and sp.path("A").stat().st_size <= bound


def test_the_group_bound_is_shared_by_the_spools_and_freed_when_one_is_discarded(tmp_path):
    bound = 8192
    budget = Budget(group=bound)
    sp = Spool(tmp_path, budget)
    a, b = sp.record("A", iter(_stream(100))), sp.record("B", iter(_stream(100)))
    for x, y in zip(a, b):  # two updates at once
        pass
    for it in (a, b):
        it.close()
    sizes = {r: sp.path(r).stat().st_size for r in "AB"}
    assert 0 < sum(sizes.values()) <= bound and sum(budget.held.values()) == sum(sizes.values())
    assert list(sp.record("C", iter(_stream(10)))) == _stream(10)
    c_before = sp.count("C")
    sp.discard("A")
    sp.discard("B")
    assert set(budget.held) == {"C"}
    assert list(sp.record("C", iter(_stream(10)))) == _stream(10)
    assert sp.count("C") == 20 and c_before < 20  # with A's and B's room back, C's whole stream fits


# ---------------------------------------------------------------------------
# the agent
# ---------------------------------------------------------------------------
def _big_update(h: Harness, files: int = 40, size: int = 100_000) -> None:
    rng = random.Random(3)
    for i in range(files):
        h.writer.write("A", f"new/f{i}", rng.randbytes(size))


def test_an_update_a_restart_interrupts_resumes_from_the_spool_in_the_same_cycle_I3(group_config, caplog):
    h = Harness(group_config(replicas=("A", "B"), spool=True, parallel=1))
    fill(h.writer, "AB")
    h.cycle()
    _big_update(h)
    before = h.agent.state.cycle
    with caplog.at_level(logging.INFO, logger="coalesce.spool"):
        assert h.crash("mid_apply:70", h.cycle)  # Harness.crash reopens the agent: recover() runs
    assert h.agent.state.cycle == before + 1  # finished in the cycle the crash interrupted
    assert h.agent.state.phase == "idle"
    trans = h.recorder.transitions
    assert ("A", "update_failed", "update", "rollback") in trans
    assert ("A", "rollback_succeeded", "rollback", "done") in trans
    assert ("A", "resume_update", "done", "update") in trans
    assert ("A", "update_succeeded", "update", "done") in trans
    replayed = [int(n) for n in re.findall(r"replica A: (\d+) change records replayed", caplog.text)]
    assert replayed and replayed[0] > 0
    assert h.states() == {"A": "stable", "B": "stable"}
    assert h.agent.spool.replicas() == []  # every spool is gone once its update ended
    # B's transfer had not started (one transfer at a time: A's came first): its update is rolled
    # back with the others' at recovery and, with no spool to resume, it keeps its image until the
    # next cycle (the patent: a qtree may stay stable, no update attempted); A moved on
    a, b = (h.agent.state.replicas[n].source_point for n in "AB")
    assert a != b and h.exported_fingerprints()["B"] is not None
    h.assert_invariants()  # I3: A exports exactly the source PCPI's image, B its older one
    h.cycle()
    assert h.agent.state.replicas["A"].source_point == h.agent.state.replicas["B"].source_point
    h.assert_invariants()


def test_without_a_spool_the_interrupted_update_waits_for_the_next_cycle(group_config):
    h = Harness(group_config(replicas=("A", "B"), spool=False))
    fill(h.writer, "AB")
    h.cycle()
    _big_update(h, files=10, size=1000)
    old_point = h.agent.state.replicas["A"].source_point
    assert h.crash("mid_apply:5", h.cycle)
    assert ("A", "resume_update", "done", "update") not in h.recorder.transitions
    assert h.agent.state.phase == "idle"
    a = h.agent.state.replicas["A"]
    assert (a.state, a.source_point) == ("stable", old_point)  # rolled back: the old image, complete
    h.assert_invariants()
    h.cycle()
    a = h.agent.state.replicas["A"]
    assert a.state == "stable" and a.source_point != old_point
    h.assert_invariants()


def test_a_stale_spool_is_removed_at_recovery(group_config):
    h = Harness(group_config(replicas=("A",), spool=True))
    fill(h.writer, "A")
    h.cycle()
    stale = h.agent.spool.path("A")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"left over by a crash of another version")
    h.restart()
    assert not stale.exists()


def test_only_a_resumable_source_is_asked_to_skip(group_config):
    """A local stream's End counts every record, so the agent skips it after the codec check;
    Volume.diff refuses to skip for a backend that cannot."""
    h = Harness(group_config(replicas=("A",)))
    fill(h.writer, "A")
    h.cycle()
    target = h.agent.state.replicas["A"].source_point
    with pytest.raises(ValueError, match="cannot skip"):
        h.agent.source.diff("A", None, target, skip=1)


def test_an_update_larger_than_the_spool_bound_succeeds_and_resumes_from_its_prefix_after_a_restart_I3(
    group_config, caplog
):
    """A 4 MB update through a spool bounded at 256 KiB: the spool stops at its bound, the update
    goes on; killed mid-apply, the restart replays the prefix and asks the source for the rest."""
    import attrs

    cfg = group_config(replicas=("A", "B"), spool=True, parallel=1)
    h = Harness(attrs.evolve(cfg, spool_max=256 << 10, spool_group_max=1 << 20))
    fill(h.writer, "AB")
    h.cycle()
    _big_update(h)
    before = h.agent.state.cycle
    with caplog.at_level(logging.INFO, logger="coalesce.spool"):
        assert h.crash("mid_apply:70", h.cycle)
    assert "reached its size bound" in caplog.text
    replayed = [int(n) for n in re.findall(r"replica A: (\d+) change records replayed", caplog.text)]
    assert replayed and 0 < replayed[0] < 70
    assert h.agent.state.cycle == before + 1 and h.agent.state.phase == "idle"
    assert ("A", "update_succeeded", "update", "done") in h.recorder.transitions
    assert h.states() == {"A": "stable", "B": "stable"} and h.agent.spool.replicas() == []
    h.assert_invariants()  # I3: A exports exactly its source PCPI's image
    _big_update(h, files=60)
    assert h.cycle()["failures"] == 0  # an uninterrupted update larger than the bound succeeds
    h.assert_invariants()
