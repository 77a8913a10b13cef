"""The check before `done` of a file the update only patched in place (docs/verification.md):
compared by its size, its attributes and the bytes of the blocks its records wrote, read
through ``coalesce_describe``'s ``ranges``; a renamed file (M3: names and sizes right, bytes
swapped) is still compared whole; a backend or plugin that gives no part digest gets the
whole comparison.  mem and sim volumes, the check (coalesce_core.verifier.TransferCheck) fed
the records the replica was said to receive; the replica written on its own."""

from __future__ import annotations

import os
import time

import pytest

from coalesce_core import verifier
from coalesce_core import verify as V
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import TransferFailed, VerificationFailed
from coalesce_core.stream import fingerprint
from coalesce_core.stream import records as R
from coalesce_core.stream.fingerprint import BLOCK
from coalesce_core.touched_store import TouchedStore
from coalesce_core.verifier import TransferCheck, verify_export

SNAP = "co-g-src-000002"
SIZE = 4 * BLOCK
SEC = 10**9


def _bytes(seed: int, n: int = SIZE) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))


def _file(path: str, data: bytes) -> list:
    return [R.MkFile(path=path, mode=0o644), R.Write(path=path, offset=0, data=data)]


def _times(*paths: str) -> list:
    return [R.SetAttr(path=p, mtime_ns=5 * SEC) for p in paths]


@pytest.fixture(params=["mem", "sim"])
def pair(request, tmp_path):
    """(source, destination): fresh volumes of one backend."""
    pm = plugin_manager()
    if request.param == "mem":
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        urls = [f"mem://ranges-src-{tag}", f"mem://ranges-dst-{tag}"]
    else:
        urls = [f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst"]
    vols = [Volume.open(pm, u, create=True) for u in urls]
    yield vols[0], vols[1]
    for v in vols:
        v.close()


def _prepare(src: Volume, dst: Volume, base: list, source: list, replica: list) -> None:
    """Source qtree q: ``base`` then ``source``, PCPI SNAP; replica A: ``base`` then ``replica``."""
    src.apply("q", R.framed("q", None, "t", base + source), use_purgatory=False)
    src.snapshot_create(SNAP)
    dst.apply("A", R.framed("A", None, "t", base + replica), use_purgatory=False)


def _check(src: Volume, dst: Volume, records: list):
    check = TransferCheck(src, dst, replica="A", source_qtree="q", target=SNAP, incremental=True)
    try:
        for rec in records:
            check.add(rec)
        return check.run()
    finally:
        check.close()


BASE = _file("f", _bytes(1)) + _times("f", R.ROOT)
PATCH = R.Write(path="f", offset=BLOCK + 100, data=b"patched" * 100)


def test_a_wrong_byte_inside_the_written_range_fails_the_check(pair):
    src, dst = pair
    bad = R.Write(path="f", offset=PATCH.offset, data=PATCH.data[:-1] + b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [bad, *_times("f")])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times("f")])


def test_the_same_bytes_in_the_written_range_pass(pair):
    src, dst = pair
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [PATCH, *_times("f")])
    assert _check(src, dst, [PATCH, *_times("f")]).ok


def test_a_file_of_another_size_fails_the_check(pair):
    src, dst = pair
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [PATCH, R.Truncate(path="f", size=SIZE + 1), *_times("f")])
    with pytest.raises(VerificationFailed, match=f"'f': size is {SIZE + 1} in the replica but {SIZE}"):
        _check(src, dst, [PATCH, *_times("f")])


SWAP = [R.Rename(old="a", new="t"), R.Rename(old="b", new="a"), R.Rename(old="t", new="b")]


def test_a_renamed_file_with_a_wrong_byte_outside_its_written_range_fails_the_check(pair):
    """M3 (docs/verification.md): a and b swapped in the source; the replica kept them where they
    were (a wrong identity): same names, sizes, modes and times, and the written block agrees; only
    the last block of each differs, which no record wrote.  A renamed file is compared whole."""
    src, dst = pair
    one, two = _bytes(1), _bytes(1)[:-10] + b"0123456789"
    base = _file("a", one) + _file("b", two) + _times("a", "b", R.ROOT)
    patch = R.Write(path="a", offset=0, data=b"head")
    _prepare(src, dst, base, [*SWAP, patch, *_times("a", "b", R.ROOT)], [patch, *_times("a", "b", R.ROOT)])
    with pytest.raises(VerificationFailed, match="'a': content is digest"):
        _check(src, dst, [*SWAP, patch, *_times("a", "b", R.ROOT)])


def test_a_patched_files_unwritten_ranges_are_left_to_the_whole_image_checks(pair):
    """The other side of the decision: a byte no record wrote, in a file only patched in place,
    is not read by the check of the update; `coalesce verify --full` and verify_every see it."""
    src, dst = pair
    wrong = R.Write(path="f", offset=SIZE - 1, data=b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [PATCH, wrong, *_times("f")])
    assert _check(src, dst, [PATCH, *_times("f")]).ok

    class Replica:
        name, source_qtree, source_point, exported = "A", "q", SNAP, "co-g-dst-000001"

    dst.snapshot_create(Replica.exported)
    out = verify_export(src, dst, Replica, content=True)
    assert [(d.path, d.field) for d in out.differences] == [("f", "content")]


class _NoParts:
    """A plugin around ``coalesce_describe`` of one volume that drops the part digests (as a
    backend that ignores ``ranges`` while declaring them would)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stripped = 0

    @hookimpl(wrapper=True)
    def coalesce_describe(self, volume, qtree, snapshot, paths, ranges):
        out = yield
        if self.url not in str(getattr(volume, "url", volume)) or not ranges:
            return out
        self.stripped += sum(d.part is not None for d in out)
        return [d.__class__(**{**_fields(d), "part": None}) for d in out]


def _fields(d) -> dict:
    import attrs

    return attrs.asdict(d, recurse=False)


def test_descriptions_without_part_digests_are_compared_whole(pair):
    """A side that answers a ranged path without its part digest: both sides are described
    again with the whole content, so the byte no record wrote is found."""
    src, dst = pair
    strip = _NoParts(str(dst.url))
    dst.pm.register(strip)
    wrong = R.Write(path="f", offset=SIZE - 1, data=b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [PATCH, wrong, *_times("f")])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times("f")])
    assert strip.stripped == 1


def test_a_side_that_does_not_read_ranges_gets_whole_contents(pair):
    src, dst = pair
    src.handle.describes_ranges = False  # as a backend written before the ranges
    wrong = R.Write(path="f", offset=SIZE - 1, data=b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [PATCH, wrong, *_times("f")])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times("f")])


def test_the_check_of_a_patched_file_reads_its_written_blocks_not_the_file(tmp_path):
    """sim counts the blocks it reads (4 KiB each): a 16 MiB file patched in one 64 KiB block
    costs that block and the indirect blocks above it on each side, not 16 MiB."""
    pm = plugin_manager()
    src, dst = (Volume.open(pm, f"sim://{tmp_path}/{n}", create=True) for n in ("src", "dst"))
    big = 16 << 20
    base = [
        R.MkFile(path="big"),
        *(R.Write(path="big", offset=o, data=b"\1" * (1 << 20)) for o in range(0, big, 1 << 20)),
    ]
    patch = R.Write(path="big", offset=8 << 20, data=b"\2" * BLOCK)
    _prepare(src, dst, base + _times("big", R.ROOT), [patch, *_times("big")], [patch, *_times("big")])

    def reads(records: list) -> int:
        before = src.handle.stats["block_reads"] + dst.handle.stats["block_reads"]
        assert _check(src, dst, records).ok
        return src.handle.stats["block_reads"] + dst.handle.stats["block_reads"] - before

    patched = reads([patch, *_times("big")])
    whole = reads([R.Rename(old="big", new="x"), R.Rename(old="x", new="big"), patch, *_times("big")])
    assert whole >= 2 * big // 4096  # both sides read whole: the renamed file
    assert patched <= 2 * (BLOCK // 4096 + 64)  # the written block, its pointers, the qtree's directory
    src.close()
    dst.close()


def test_the_part_digest_is_the_content_digest_of_the_ranges_with_the_ranges():
    data = _bytes(3, 3 * BLOCK + 5)
    ranges = ((BLOCK, 2 * BLOCK), (3 * BLOCK, 4 * BLOCK))
    only = bytearray(len(data))
    for a, b in ranges:
        only[a:b] = data[a:b]
    want = fingerprint.part_digest(len(data), ranges, fingerprint.content_digest_of(bytes(only)))
    assert fingerprint.part_digest_of(data, ranges) == want
    assert fingerprint.part_digest_of(data, ranges[:1]) != want  # the ranges are part of it
    changed = data[: BLOCK - 1] + b"\0" + data[BLOCK:]  # a byte outside the ranges
    assert fingerprint.part_digest_of(changed, ranges) == want


class _Asked:
    """Counts the paths ``coalesce_describe`` of one volume is asked for, with their ranges."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.asked: list[tuple[str, object]] = []

    @hookimpl(wrapper=True)
    def coalesce_describe(self, volume, qtree, snapshot, paths, ranges):
        if self.url in str(getattr(volume, "url", volume)):
            self.asked += [(p, (ranges or {}).get(p)) for p, _c in paths]
        return (yield)


def _prefetch_everything(monkeypatch) -> None:
    from coalesce_core import verifier

    monkeypatch.setattr(verifier, "PREFETCH_FROM", 1)
    monkeypatch.setattr(verifier, "PREFETCH_BYTES", 1)


def test_a_patched_file_is_prefetched_with_its_ranges_and_not_described_again(pair, monkeypatch):
    _prefetch_everything(monkeypatch)
    src, dst = pair
    asked = _Asked(str(src.url))
    src.pm.register(asked)
    _prepare(src, dst, BASE, [PATCH, *_times("f", R.ROOT)], [PATCH, *_times("f", R.ROOT)])
    assert _check(src, dst, [PATCH, *_times(R.ROOT, "f")]).ok  # the SetAttr of "" hands f over
    assert [a for a in asked.asked if a[0] == "f"] == [("f", ((BLOCK, 2 * BLOCK),))]


def test_a_prefetched_part_against_a_side_without_part_digests_is_compared_whole(pair, monkeypatch):
    _prefetch_everything(monkeypatch)
    src, dst = pair
    dst.pm.register(_NoParts(str(dst.url)))
    wrong = R.Write(path="f", offset=SIZE - 1, data=b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f", R.ROOT)], [PATCH, wrong, *_times("f", R.ROOT)])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times(R.ROOT, "f")])


def test_the_prefetch_holds_a_bounded_number_of_files(pair, monkeypatch):
    """Many small files each written once: the bytes written are counted for at most
    PREFETCH_PATHS files at a time; at most PREFETCH_MAX files are prefetched, the rest are
    described by the check, which still passes."""
    monkeypatch.setattr(verifier, "PREFETCH_PATHS", 8)
    monkeypatch.setattr(verifier, "PREFETCH_MAX", 3)
    monkeypatch.setattr(verifier, "PREFETCH_FROM", 200)
    src, dst = pair
    recs = [r for i in range(40) for r in _file(f"f{i:02d}", _bytes(i, 100 if i % 2 else 300))]
    recs += _times(R.ROOT, *(f"f{i:02d}" for i in range(40)))
    _prepare(src, dst, [], recs, recs)
    check = TransferCheck(src, dst, replica="A", source_qtree="q", target=SNAP, incremental=True)
    try:
        assert check.prefetch is not None
        most = 0
        for rec in recs:
            check.add(rec)
            most = max(most, len(check.prefetch.written))
        assert most <= 8 and len(check.prefetch.seen) == 3
        assert check.run().ok
    finally:
        check.close()


def test_the_prefetch_thread_starts_with_the_first_batch_only(pair, monkeypatch):
    """Small writes (below PREFETCH_FROM, most updates) hand nothing over: the check starts no helper
    thread for them (a thread per update is what an hourly cycle of small changes would pay); the
    first batch, a large write, starts it, and the check passes."""
    monkeypatch.setattr(verifier, "PREFETCH_FROM", 200)
    monkeypatch.setattr(verifier, "PREFETCH_BYTES", 1)
    src, dst = pair
    small, large = _file("small", _bytes(1, 100)), _file("large", _bytes(2, 300))
    recs = [*small, *large, *_times(R.ROOT, "small", "large")]
    _prepare(src, dst, [], recs, recs)
    check = TransferCheck(src, dst, replica="A", source_qtree="q", target=SNAP, incremental=True)
    try:
        assert check.prefetch is not None
        for rec in small:
            check.add(rec)
        assert check.prefetch.t is None
        for rec in recs[len(small) :]:
            check.add(rec)
        assert check.prefetch.t is not None and "large" in check.prefetch.seen
        assert check.run().ok
    finally:
        check.close()


SPILLED = pytest.mark.parametrize("spill_at", [10**9, 5], ids=["in-memory", "spilled"])


def _renamed_update(spill_at: int, monkeypatch) -> tuple[list, list]:
    """(base, update): a patch of f, the removal of "gone", the rename of a directory of 12 files;
    the check's touched paths spill past ``spill_at``."""
    monkeypatch.setattr(V, "SPILL_PATHS", spill_at)
    many = [R.MkDir(path="d", mode=0o755)] + [r for i in range(12) for r in _file(f"d/g{i:02d}", _bytes(i, 50))]
    many += _times(*(f"d/g{i:02d}" for i in range(12)), "d")
    return BASE + _file("gone", b"old") + many, [
        PATCH,
        R.Unlink(path="gone"),
        R.Rename(old="d", new="e"),
        *_times("f", "e", R.ROOT),
    ]


@SPILLED
def test_a_spilled_check_finds_a_wrong_byte_in_a_written_block(pair, monkeypatch, spill_at):
    """I3, with the touched paths in memory and spilled to disk (coalesce_core.touched_store)."""
    src, dst = pair
    base, update = _renamed_update(spill_at, monkeypatch)
    wrong = R.Write(path="f", offset=BLOCK + 101, data=b"!")
    _prepare(src, dst, base, update, [update[0], wrong, *update[1:]])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, update)


@SPILLED
def test_a_spilled_check_finds_a_name_the_replica_kept_and_passes_a_right_update(pair, monkeypatch, spill_at):
    src, dst = pair
    base, update = _renamed_update(spill_at, monkeypatch)
    _prepare(src, dst, base, update, [u for u in update if type(u) is not R.Unlink])
    with pytest.raises(VerificationFailed, match="'gone' is a regular file in the replica but absent"):
        _check(src, dst, update)
    dst.apply("A", R.framed("A", None, "t", [R.Unlink(path="gone")]), use_purgatory=False)
    outcome = _check(src, dst, update)
    assert outcome.ok and outcome.checked >= 16  # the root, f, d, e and below e: the 12 files


class _SmallDisk(TouchedStore):
    """A store whose database can grow to 8 pages: SQLite answers "database or disk is full"."""

    def __init__(self) -> None:
        super().__init__()
        self.db.execute("PRAGMA max_page_count = 8")


def test_a_spill_that_finds_no_room_fails_the_update_with_a_hint(pair, monkeypatch):
    """No internal error: a TransferFailed naming the cause, with where the spill goes (the
    update takes the rollback path)."""
    monkeypatch.setattr(V, "SPILL_PATHS", 5)
    monkeypatch.setattr(verifier, "TouchedStore", _SmallDisk)
    src, dst = pair
    recs = [R.MkFile(path=f"f{i:05d}", mode=0o644) for i in range(3000)]
    check = TransferCheck(src, dst, replica="A", source_qtree="q", target=SNAP, incremental=True)
    try:
        with pytest.raises(TransferFailed, match="disk is full") as got:
            for rec in recs:
                check.add(rec)
            check.run()
        assert "SQLITE_TMPDIR" in got.value.hint
    finally:
        check.close()


class _Helpers:
    """Counts the helper threads the check's describe_both starts (verifier._Side)."""

    def __init__(self, monkeypatch) -> None:
        self.started = 0
        real = verifier._Side.start

        def start(side, fn, *args):
            self.started += 1
            return real(side, fn, *args)

        monkeypatch.setattr(verifier._Side, "start", start)


def test_a_small_update_is_checked_without_a_helper_thread(pair, monkeypatch):
    """An update that wrote less than PREFETCH_FROM and touched few paths (an hourly cycle's): both
    sides are described in the caller's thread, and a wrong byte still fails the check; one that wrote
    PREFETCH_FROM or more, or touched more than INLINE_PATHS paths, describes the source side in a
    helper thread."""
    helpers = _Helpers(monkeypatch)
    src, dst = pair
    bad = R.Write(path="f", offset=PATCH.offset, data=PATCH.data[:-1] + b"!")
    _prepare(src, dst, BASE, [PATCH, *_times("f")], [bad, *_times("f")])
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times("f")])
    assert helpers.started == 0
    monkeypatch.setattr(verifier, "PREFETCH_FROM", len(PATCH.data))  # as if the write were large
    with pytest.raises(VerificationFailed, match="'f': content is digest"):
        _check(src, dst, [PATCH, *_times("f")])
    assert helpers.started > 0


def test_an_update_of_many_paths_is_checked_with_a_helper_thread(pair, monkeypatch):
    helpers = _Helpers(monkeypatch)
    monkeypatch.setattr(verifier, "INLINE_PATHS", 4)
    src, dst = pair
    recs = [r for i in range(6) for r in _file(f"f{i}", _bytes(i, 10))] + _times(R.ROOT, *(f"f{i}" for i in range(6)))
    _prepare(src, dst, [], recs, recs)
    assert _check(src, dst, recs).ok and helpers.started > 0
