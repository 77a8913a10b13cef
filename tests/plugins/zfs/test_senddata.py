"""The data of a zfs diff from ``zfs send -i`` (coalesce_zfs.senddata).

The first part needs no pool: SendData reads a stream built by
tests/zfsstream.py (``cat`` plays ``zfs send``), files of a base and a
target directory, and registrations with the inode numbers the stream names;
its records, applied by the POSIX applier to a copy of the base, must give
the target byte for byte.  The second part (marked zfs) runs the zfs
backend's diff on a real zfs-fuse pool, where the stream comes from ``zfs
send -i`` and the walk registers what it finds.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import zfsstream as Z
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce_core.errors import BackendError, CorruptStream, TruncatedStream
from coalesce_core.stream import records as R
from coalesce_core.stream.records import HardLink, MkFile, Truncate, Write
from coalesce_core.testing import conformance
from coalesce_posix.apply import Applier
from coalesce_zfs.senddata import BlockMaps, SendData, _gaps

NAME = "pool/src@t"
KEY = ("pool/src", 0x55, Z.GUID)  # dataset, base and target GUIDs (zfsstream's BEGIN)
BS = 4096


def fake_stat(ino: int, size: int, mode: int = 0o100644, nlink: int = 1) -> os.stat_result:
    return os.stat_result((mode, ino, 1, nlink, 0, 0, size, 0, 0, 0))


class Case:
    """A base and a target directory (qtree ``q`` of each), the stream file, and the applier's copy."""

    def __init__(self, tmp_path) -> None:
        self.root = tmp_path
        self.base = tmp_path / "base" / "q"
        self.target = tmp_path / "target" / "q"
        self.base.mkdir(parents=True)
        self.target.mkdir(parents=True)
        self.stream = tmp_path / "stream"

    def put(self, side: str, name: str, data: bytes) -> None:
        (getattr(self, side) / name).write_bytes(data)

    def send_data(
        self,
        stream: bytes | None = None,
        argv: list[str] | None = None,
        maps: BlockMaps | None = None,
        base_txg: int | None = None,
    ) -> SendData:
        if stream is not None:
            self.stream.write_bytes(stream)
        return SendData(
            argv or ["cat", str(self.stream)],
            NAME,
            str(self.base),
            str(self.target),
            maps=maps,
            key=KEY if maps is not None else None,
            base_txg=base_txg,
        )

    def apply(self, records: list) -> None:
        """Apply to a copy of the base (volume ``applied``, qtree ``q``)."""
        dest = self.root / "applied"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.root / "base", dest)
        Applier(str(dest), "q", None).apply(iter(records))

    def applied(self, name: str) -> bytes:
        return (self.root / "applied" / "q" / name).read_bytes()


@pytest.fixture
def case(tmp_path):
    return Case(tmp_path)


def test_a_new_file_comes_whole_from_the_stream(case):
    data = os.urandom(300_000)
    case.put("target", "a", data)
    sd = case.send_data(Z.file_stream({7: data}))
    assert list(sd.created(str(case.target), "a", "a", fake_stat(7, len(data)))) == []
    recs = list(sd.finish())
    assert type(recs[0]) is MkFile and all(type(r) is Write for r in recs[1:])
    assert max(len(r.data) for r in recs[1:]) <= 1 << 20
    case.apply(recs)
    assert case.applied("a") == data
    assert sd.stats["read_bytes"] == 0 and sd.stats["stream_bytes"] >= len(data) and sd.stats["fallback"] == 0


def test_a_file_the_stream_does_not_carry_is_read_from_the_target(case):
    """A file moved to its name from elsewhere keeps its blocks: the stream has none of them."""
    data = os.urandom(70_000)
    case.put("target", "moved", data)
    sd = case.send_data(Z.begin(NAME) + Z.obj(9) + Z.end())
    list(sd.created(str(case.target), "moved", "moved", fake_stat(9, len(data))))
    recs = list(sd.finish())
    case.apply(recs)
    assert case.applied("moved") == data and sd.stats["read_bytes"] == len(data)


def test_a_changed_block_is_all_that_is_sent(case):
    base = os.urandom(3 * BS)
    target = base[:BS] + os.urandom(BS) + base[2 * BS :] + b"tail"
    case.put("base", "f", base)
    case.put("target", "f", target)
    stream = (
        Z.begin(NAME)
        + Z.obj(4, blksz=BS)
        + Z.free(4, 4 * BS, Z.TO_END)
        + Z.write(4, BS, target[BS : 2 * BS])
        + Z.write(4, 3 * BS, target[3 * BS :].ljust(BS, b"\0"))
        + Z.end()
    )
    sd = case.send_data(stream)
    list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    recs = list(sd.finish())
    assert recs[0] == Truncate(path="f", size=len(target))
    assert [(r.offset, len(r.data)) for r in recs[1:]] == [(BS, BS), (3 * BS, 4)]
    case.apply(recs)
    assert case.applied("f") == target and sd.stats["read_bytes"] == 0


@pytest.mark.parametrize(
    ("tail", "records"),
    [
        # 1 block after a 2-block hole: truncating at the hole and rewriting the tail writes 1 block
        (1, [("Truncate", BS), ("Write", 3 * BS, BS)]),
        # 3 blocks after it: overwriting the hole with zeros writes fewer
        (3, [("Write", BS, 2 * BS)]),
    ],
    ids=["tail-rewritten", "zeros-written"],
)
def test_a_range_the_stream_frees_is_made_a_hole_or_compared_with_the_base(case, tail, records):
    """A FREEd range over the base copy's data is zeros in the target: the records write whichever
    is fewer bytes, the zeros or the target's data from the hole to the end of file after a
    Truncate (which keeps the hole a hole, where zfs-fuse reports none)."""
    base = os.urandom((3 + tail) * BS)
    target = base[:BS] + bytes(2 * BS) + base[3 * BS :]  # a hole punched in the middle
    case.put("base", "f", base)
    case.put("target", "f", target)
    stream = Z.begin(NAME) + Z.obj(4, blksz=BS) + Z.free(4, BS, 2 * BS) + Z.end()
    sd = case.send_data(stream)
    list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    recs = list(sd.finish())
    case.apply(recs)
    assert case.applied("f") == target
    described = [
        ("Write", r.offset, len(r.data)) if isinstance(r, R.Write) else ("Truncate", r.size)
        for r in recs
        if isinstance(r, (R.Write, R.Truncate))
    ]
    assert described == records
    assert sd.stats["read_bytes"] == sum(d[2] for d in records if d[0] == "Write")


@pytest.mark.parametrize("shared", [False, True], ids=["stream", "block-map"])
def test_a_reborn_object_is_compared_wherever_the_stream_did_not_write(case, shared):
    """The file at f has the object number of the base's f but was born after the base PCPI (its
    OBJECT record's generation is past the base's txg): another object.  Nothing of the base copy
    is trusted where the stream wrote nothing, even if the stream (here, on purpose) left blocks out;
    the same stream for the same object (an older generation) is trusted and nothing is read."""
    base = os.urandom(3 * BS)
    target = os.urandom(BS) + bytes(BS) + os.urandom(BS)
    case.put("base", "f", base)
    case.put("target", "f", target)
    case.put("target", "o", b"other")

    def stream(gen):
        return (
            Z.begin(NAME)
            + Z.obj(4, blksz=BS, bonus=Z.znode(gen))
            + Z.write(4, 0, target[:BS])
            + Z.obj(5, bonus=Z.znode(gen))
            + Z.write(5, 0, b"other".ljust(512, b"\0"))
            + Z.end()
        )

    for gen, reborn in ((1001, True), (1000, False)):
        maps = BlockMaps() if shared else None
        if shared:  # another qtree's diff reads the stream and keeps its map
            first = case.send_data(stream(gen), maps=maps, base_txg=1000)
            list(first.created(str(case.target), "o", "o", fake_stat(5, 5)))
            list(first.finish())
        sd = case.send_data(
            stream(gen) if not shared else None, argv=["false"] if shared else None, maps=maps, base_txg=1000
        )
        if shared:
            sd.READ_COST = 0
        list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
        case.apply(list(sd.finish()))
        assert sd.stats["shared"] == int(shared)
        if reborn:
            assert case.applied("f") == target and sd.stats["read_bytes"] >= 2 * BS
        else:
            assert sd.stats["read_bytes"] == (BS if shared else 0)  # the map's WRITE block is read


def test_late_records_of_an_object_still_count(case):
    """Records of an object that come after another object's (not how zfs orders them) are still applied."""
    base = os.urandom(2 * BS)
    target = bytes(BS) + os.urandom(BS)
    other = os.urandom(BS)
    case.put("base", "f", base)
    case.put("target", "f", target)
    case.put("target", "g", other)
    stream = Z.begin(NAME) + Z.write(4, BS, target[BS:]) + Z.write(5, 0, other) + Z.free(4, 0, BS) + Z.end()
    sd = case.send_data(stream)
    list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    list(sd.created(str(case.target), "g", "g", fake_stat(5, len(other))))
    case.apply(list(sd.finish()))
    assert case.applied("f") == target and case.applied("g") == other


def test_further_names_of_a_new_file_come_after_its_data(case):
    data = os.urandom(5000)
    case.put("target", "a", data)
    sd = case.send_data(Z.file_stream({7: data}))
    list(sd.created(str(case.target), "a", "a", fake_stat(7, len(data), nlink=2)))
    assert list(sd.linked("b", "a")) == []
    assert list(sd.linked("c", "not-new")) == [HardLink(path="c", existing="not-new")]
    recs = list(sd.finish())
    assert recs[-1] == HardLink(path="b", existing="a")
    case.apply(recs)
    assert os.path.samefile(case.root / "applied" / "q" / "a", case.root / "applied" / "q" / "b")


@pytest.mark.parametrize(
    "argv_or_stream",
    [["true"], b"\0" * 400, Z.begin(NAME, versioninfo=5) + Z.end()],
    ids=["no-output", "not-a-stream", "newer-format"],
)
def test_an_unusable_stream_falls_back_to_the_images(case, argv_or_stream, caplog):
    base, target, new = os.urandom(3 * BS), os.urandom(2 * BS), os.urandom(777)
    case.put("base", "f", base)
    case.put("target", "f", target)
    case.put("target", "n", new)
    if isinstance(argv_or_stream, list):
        sd = case.send_data(argv=argv_or_stream)
    else:
        sd = case.send_data(argv_or_stream)
    list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    list(sd.created(str(case.target), "n", "n", fake_stat(5, len(new))))
    with caplog.at_level(logging.WARNING, logger="coalesce.zfs"):
        recs = list(sd.finish())
    assert "reading the changed files from the images instead" in caplog.text
    case.apply(recs)
    assert case.applied("f") == target and case.applied("n") == new and sd.stats["fallback"] == 1


def test_failures_after_the_begin_record_raise(case):
    data = os.urandom(3 * BS)
    case.put("target", "a", data)
    whole = Z.file_stream({7: data}, blksz=BS)

    def run(**kw):
        sd = case.send_data(**kw)
        list(sd.created(str(case.target), "a", "a", fake_stat(7, len(data))))
        return list(sd.finish())

    with pytest.raises(TruncatedStream, match="exit status 0"):  # zfs's status and message are added
        run(stream=whole[:-400])
    with pytest.raises(BackendError, match="1 bytes after the end of its stream"):
        run(stream=whole + b"x")
    case.stream.write_bytes(whole)
    with pytest.raises(TruncatedStream, match="exit status 4: died"):  # not the SIGKILL of a hasty kill
        run(argv=["sh", "-c", 'head -c 700 "$0"; echo died >&2; exit 4', str(case.stream)])
    with pytest.raises(BackendError, match="broken"):
        run(argv=["sh", "-c", 'cat "$0"; echo broken >&2; exit 3', str(case.stream)])
    with pytest.raises(CorruptStream, match="not an incremental stream of"):
        run(stream=whole.replace(NAME.encode(), b"pool/other@x", 1))
    with pytest.raises(CorruptStream, match="full"):
        run(stream=Z.begin(NAME, fromguid=0) + Z.end())
    with pytest.raises(CorruptStream, match="is not a file's data"):
        run(stream=Z.begin(NAME) + Z.write(7, 0, data[:BS], typ=20) + Z.end())
    with pytest.raises(BackendError, match="cannot run"):
        run(argv=["/nonexistent/zfs"])


def test_the_block_map_of_one_stream_serves_the_other_qtrees(case):
    """One qtree's diff reads the stream to its end and keeps its block map; another qtree's diff between
    the same snapshots takes its records from the map (no send: `false` would fail), reading only the
    blocks the stream wrote from the target image; a qtree that holds most of the stream's data runs
    its own send."""
    base = os.urandom(3 * BS)
    target = base[:BS] + os.urandom(BS) + base[2 * BS : 2 * BS + 100]
    new, big = os.urandom(BS + 10), os.urandom(16 * BS)
    for side, name, data in (("base", "f", base), ("target", "f", target), ("target", "n", new), ("target", "o", big)):
        case.put(side, name, data)
    stream = (
        Z.begin(NAME)
        + Z.obj(4, blksz=BS)
        + Z.free(4, 3 * BS, Z.TO_END)
        + Z.write(4, BS, target[BS : 2 * BS])
        + Z.write(4, 2 * BS, target[2 * BS :].ljust(BS, b"\0"))
        + Z.obj(6, blksz=BS)
        + Z.write(6, 0, new[:BS])
        + Z.write(6, BS, new[BS:].ljust(BS, b"\0"))
        + b"".join(Z.write(7, i * BS, big[i * BS : (i + 1) * BS]) for i in range(16))
        + Z.end()
    )
    maps = BlockMaps()

    def register_f_and_n(sd):
        list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
        list(sd.created(str(case.target), "n", "n", fake_stat(6, len(new))))

    first = case.send_data(stream, maps=maps)  # another qtree: object 7 only
    list(first.created(str(case.target), "o", "o", fake_stat(7, len(big))))
    case.apply(list(first.finish()))
    assert case.applied("o") == big and first.stats["shared"] == 0 and maps.published == 1

    second = case.send_data(argv=["false"], maps=maps)
    register_f_and_n(second)
    case.apply(list(second.finish()))
    assert case.applied("f") == target and case.applied("n") == new
    assert second.stats["shared"] == 1 and second.stats["stream_bytes"] == 0 and second.stats["fallback"] == 0
    assert second.stats["read_bytes"] == BS + 100 + len(new)  # its WRITE blocks, clipped; no base copy

    again = case.send_data(stream, maps=maps)  # the big share: its own send
    list(again.created(str(case.target), "o", "o", fake_stat(7, len(big))))
    list(again.finish())
    assert again.stats["shared"] == 0 and again.stats["stream_bytes"] > 0 and maps.published == 2

    alone = case.send_data(argv=["false"], maps=BlockMaps())  # no map yet: a send, which fails
    register_f_and_n(alone)
    list(alone.finish())
    assert alone.stats["fallback"] == 1


def test_a_block_map_is_kept_only_for_a_whole_stream_of_the_named_snapshots(case, monkeypatch):
    data = os.urandom(3 * BS)
    case.put("target", "a", data)
    whole = Z.file_stream({7: data}, blksz=BS)
    maps = BlockMaps()

    def run(stream, consume=None):
        sd = case.send_data(stream, maps=maps)
        list(sd.created(str(case.target), "a", "a", fake_stat(7, len(data))))
        it = sd.finish()
        return list(it) if consume is None else [next(it) for _ in range(consume)]

    with pytest.raises(TruncatedStream):
        run(whole[:-400])
    run(whole, consume=2)  # the consumer stopped early
    with pytest.raises(CorruptStream, match="GUIDs"):
        run(Z.file_stream({7: data}, blksz=BS).replace(Z.begin(NAME), Z.begin(NAME, fromguid=0x66), 1))
    monkeypatch.setattr(BlockMaps, "MAX_RANGES", 1)  # too many ranges (a FREE, a WRITE run)
    run(whole)
    assert maps.published == 0 and maps.get(KEY) is None
    monkeypatch.setattr(BlockMaps, "MAX_RANGES", 10)
    run(whole)
    assert maps.published == 1 and maps.get(KEY).bytes_of([7]) == 3 * BS


def test_block_maps_keep_the_last_few():
    from coalesce_zfs.senddata import BlockMap

    maps = BlockMaps(size=2)
    for i in range(3):
        maps.put(("ds", i, i + 1), BlockMap())
    assert maps.get(("ds", 0, 1)) is None and maps.get(("ds", 2, 3)) is not None and maps.published == 3


def test_nothing_registered_runs_no_send(case):
    sd = case.send_data(argv=["false"])
    assert list(sd.finish()) == []


def test_gaps():
    assert _gaps([], 10) == [(0, 10)]
    assert _gaps([(0, 4), (4, 6), (8, 20)], 10) == [(6, 8)]
    assert _gaps([(2, 3), (1, 5)], 5) == [(0, 1)]
    assert _gaps([(0, 10)], 10) == []
    assert _gaps([(12, 14)], 10) == [(0, 10)]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_any_covering_stream_rebuilds_the_target(tmp_path_factory, data):
    """For a changed file: a stream that WRITEs at least every block that differs (and maybe some that do
    not), FREEs or WRITEs the blocks that became zeros, and FREEs past the end, applied after the
    walk's registration to a copy of the base, gives the target.  For a new file: any subset of its
    blocks in the stream, the rest read from the target image."""
    case = Case(tmp_path_factory.mktemp("prop"))
    blocks = st.sampled_from([bytes(BS), b"\x01" * BS, b"\x02" * BS, os.urandom(BS)])
    base = b"".join(data.draw(st.lists(blocks, max_size=6)))[: data.draw(st.integers(0, 6 * BS))]
    target = b"".join(data.draw(st.lists(blocks, max_size=6)))[: data.draw(st.integers(0, 6 * BS))]
    new = b"".join(data.draw(st.lists(blocks, max_size=5)))[: data.draw(st.integers(0, 5 * BS))]
    case.put("base", "f", base)
    case.put("target", "f", target)
    case.put("target", "n", new)
    parts = [Z.begin(NAME), Z.obj(4, blksz=BS), Z.obj(5, blksz=BS)]
    changing = base[: len(target)].ljust(len(target), b"\0")  # the copy being changed, after the Truncate
    for i in range(0, len(target), BS):
        t, c = target[i : i + BS], changing[i : i + BS]
        if t != c or data.draw(st.booleans()):
            if t.count(0) == len(t) and data.draw(st.booleans()):
                parts.append(Z.free(4, i, BS))
            else:
                parts.append(Z.write(4, i, t.ljust(BS, b"\0")))
    for i in range(0, len(new), BS):
        if data.draw(st.booleans()):
            parts.append(Z.write(5, i, new[i : i + BS].ljust(BS, b"\0")))
    parts += [Z.free(4, -(-len(target) // BS) * BS, Z.TO_END), Z.end()]
    sd = case.send_data(b"".join(parts))
    list(sd.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    list(sd.created(str(case.target), "n", "n", fake_stat(5, len(new))))
    case.apply(list(sd.finish()))
    assert case.applied("f") == target and case.applied("n") == new
    # the same from the stream's block map (data read from the target image)
    maps = BlockMaps()
    first = case.send_data(maps=maps)
    list(first.finish())  # nothing registered: no send, no map
    assert maps.published == 0
    first = case.send_data(maps=maps)
    list(first.created(str(case.target), "n", "n", fake_stat(5, len(new))))
    list(first.finish())
    assert maps.published == 1
    shared = case.send_data(argv=["false"], maps=maps)
    shared.READ_COST = 0
    list(shared.updated(str(case.base), str(case.target), "f", fake_stat(4, len(base)), fake_stat(4, len(target))))
    list(shared.created(str(case.target), "n", "n", fake_stat(5, len(new))))
    case.apply(list(shared.finish()))
    assert shared.stats["shared"] == 1
    assert case.applied("f") == target and case.applied("n") == new


# ---------------------------------------------------------------------------------------------------
# on a real zfs-fuse pool
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def zvol(zfs_url):
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume

    vol = Volume.open(plugin_manager(), zfs_url, create=True)
    yield vol
    vol.close()


def _q(vol, *parts: str) -> str:
    return os.path.join(vol.handle.root, "q", *parts)


def _write_at(path: str, offset: int, data: bytes, truncate: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if truncate is not None:
            os.ftruncate(fd, truncate)
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _check(vol, base: str, target: str) -> dict:
    """The diff reproduces the target (conformance.check_diff: deterministic, framed, applied to a copy
    of the base); returns the stats of the stream data it used."""
    conformance.check_diff(vol, "q", base, target, base_model=None, target_fp=vol.fingerprint("q", target))
    return dict(vol.handle.last_send_data.stats)


@pytest.mark.zfs
def test_zfs_rewritten_and_patched_files_come_from_zfs_send(zvol):
    os.makedirs(_q(zvol, "d"))
    big = os.urandom(3 << 20)
    for name, data in (("big", big), ("mid", os.urandom(5 << 20)), ("grow", os.urandom(200_000)), ("same", b"x")):
        with open(_q(zvol, "d", name), "wb") as f:
            f.write(data)
    zvol.snapshot_create("a")
    with open(_q(zvol, "d", "big"), "wb") as f:  # rewritten whole
        f.write(os.urandom(3 << 20))
    _write_at(_q(zvol, "d", "mid"), (2 << 20) + 5, b"patch" * 100)  # 500 bytes in the middle
    with open(_q(zvol, "d", "grow"), "ab") as f:
        f.write(os.urandom(1 << 20))
    zvol.snapshot_create("b")
    stats = _check(zvol, "a", "b")
    # "same" too, when it was written in the second the base PCPI was taken (the walk's quick test
    # then cannot tell); the stream has no block of it, so it costs nothing
    assert stats["fallback"] == 0 and stats["files"] in (3, 4) and stats["read_bytes"] == 0
    assert stats["stream_bytes"] >= (3 << 20) + (1 << 20)


@pytest.mark.zfs
def test_zfs_truncates_holes_and_sparse_files(zvol):
    os.makedirs(_q(zvol))
    for name in ("shrink", "regrow", "sparse"):
        with open(_q(zvol, name), "wb") as f:
            f.write(os.urandom(3 << 20))
    zvol.snapshot_create("a")
    os.truncate(_q(zvol, "shrink"), 100_000)
    os.truncate(_q(zvol, "regrow"), 100_000)  # cut, then grown with a hole and a bit of data
    _write_at(_q(zvol, "regrow"), (2 << 20) + 7, b"late", truncate=4 << 20)
    os.unlink(_q(zvol, "sparse"))
    _write_at(_q(zvol, "sparse"), 5 << 20, b"end", truncate=1 << 20)  # a new sparse file, another object
    _write_at(_q(zvol, "empty"), 0, b"")
    zvol.snapshot_create("b")
    stats = _check(zvol, "a", "b")
    assert stats["fallback"] == 0
    # the regrown file's freed range was compared with its base copy; nothing else was read
    assert stats["read_bytes"] <= (4 << 20)


@pytest.mark.zfs
def test_zfs_moves_links_and_other_qtrees(zvol):
    os.makedirs(_q(zvol, "d"))
    other = os.path.join(zvol.handle.root, "other")
    os.makedirs(other)
    moved, linked, outside = os.urandom(300_000), os.urandom(40_000), os.urandom(2 << 20)
    for path, data in ((_q(zvol, "d", "old"), moved), (_q(zvol, "keep"), linked), (os.path.join(other, "o"), outside)):
        with open(path, "wb") as f:
            f.write(data)
    zvol.snapshot_create("a")
    os.rename(_q(zvol, "d", "old"), _q(zvol, "new"))  # moved within the qtree: no blocks in the stream
    os.rename(os.path.join(other, "o"), _q(zvol, "came"))  # moved in from another qtree
    os.link(_q(zvol, "keep"), _q(zvol, "also"))  # a new name of an unchanged file
    with open(_q(zvol, "two"), "wb") as f:  # a new file with two names
        f.write(os.urandom(9000))
    os.link(_q(zvol, "two"), _q(zvol, "two-b"))
    with open(os.path.join(other, "x"), "wb") as f:  # data of another qtree: skipped
        f.write(os.urandom(1 << 20))
    zvol.snapshot_create("b")
    stats = _check(zvol, "a", "b")
    assert stats["fallback"] == 0
    assert stats["read_bytes"] >= len(moved) + len(outside)  # read whole: the stream has none of their blocks


@pytest.mark.zfs
def test_zfs_a_qtree_without_changed_data_sends_no_data(zvol):
    os.makedirs(_q(zvol))
    os.makedirs(os.path.join(zvol.handle.root, "other"))
    with open(_q(zvol, "f"), "wb") as f:
        f.write(b"stays")
    time.sleep(1.1)  # zfs-fuse's times have whole seconds: let the quick test see f as old
    zvol.snapshot_create("a")
    with open(os.path.join(zvol.handle.root, "other", "g"), "wb") as f:
        f.write(os.urandom(1 << 20))
    zvol.snapshot_create("b")
    assert _check(zvol, "a", "b") == {
        "files": 0,
        "objects": 0,
        "stream_bytes": 0,
        "read_bytes": 0,
        "fallback": 0,
        "shared": 0,
    }
    os.chmod(_q(zvol, "f"), 0o600)  # only its attributes: the stream has no block of it
    zvol.snapshot_create("c")
    stats = _check(zvol, "b", "c")
    assert stats["files"] == 1 and stats["read_bytes"] == 0 and stats["fallback"] == 0
    assert not any(isinstance(r, Write) for r in zvol.diff("q", "b", "c"))


@pytest.mark.zfs
def test_zfs_an_xattr_set_or_removed_on_an_old_file_is_sent(zvol):
    """zfs-fuse leaves the ctime as it was when an xattr is set or removed, so the walk's quick test
    (inode, size, mtime, ctime older than the base PCPI) found such a file unchanged and the xattr
    never reached the replica (the long differential run: an empty value set on a file)."""
    os.makedirs(_q(zvol))
    for name in ("f", "g"):
        with open(_q(zvol, name), "wb") as f:
            f.write(b"stays")
    os.setxattr(_q(zvol, "g"), "user.gone", b"v")
    time.sleep(1.1)  # zfs-fuse's times have whole seconds: let the quick test see f and g as old
    zvol.snapshot_create("a")
    os.setxattr(_q(zvol, "f"), "user.long-name-of-an-xattr", b"")
    os.removexattr(_q(zvol, "g"), "user.gone")
    zvol.snapshot_create("b")
    xattrs = {(r.path, r.name, r.value) for r in zvol.diff("q", "a", "b") if isinstance(r, R.SetXattr)}
    assert xattrs == {("f", "user.long-name-of-an-xattr", b""), ("g", "user.gone", None)}


@pytest.mark.zfs
def test_zfs_one_send_serves_the_other_qtrees(zvol):
    """Two qtrees changed between the same PCPIs: the diff of the one with most of the change runs
    `zfs send -i` and keeps the stream's block map; the other's takes its records from the map (only
    its changed blocks read from the target image, no send); both are exact."""
    root = zvol.handle.root
    os.makedirs(_q(zvol))
    os.makedirs(os.path.join(root, "big"))
    with open(_q(zvol, "f"), "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(os.path.join(root, "big", "g"), "wb") as f:
        f.write(os.urandom(4 << 20))
    zvol.snapshot_create("a")
    _write_at(_q(zvol, "f"), 300_000, os.urandom(4096))
    with open(os.path.join(root, "big", "g"), "wb") as f:
        f.write(os.urandom(4 << 20))
    zvol.snapshot_create("b")
    maps = type(zvol.handle)._block_maps
    published = maps.published
    conformance.check_diff(zvol, "big", "a", "b", base_model=None, target_fp=zvol.fingerprint("big", "b"))
    big = dict(zvol.handle.last_send_data.stats)
    assert big["shared"] == 0 and big["stream_bytes"] >= 4 << 20 and maps.published > published
    stats = _check(zvol, "a", "b")
    assert stats["shared"] == 1 and stats["stream_bytes"] == 0 and stats["fallback"] == 0
    assert 4096 <= stats["read_bytes"] <= 2 * 131072  # the changed record(s) of f, not its 1 MiB


def _patched_file(zvol) -> None:
    """PCPI a with a 1 MiB file, PCPI b with a few bytes of it changed."""
    os.makedirs(_q(zvol))
    with open(_q(zvol, "f"), "wb") as f:
        f.write(os.urandom(1 << 20))
    zvol.snapshot_create("a")
    _write_at(_q(zvol, "f"), 1000, b"changed")
    zvol.snapshot_create("b")


@pytest.mark.zfs
def test_zfs_walk_mode_reads_the_images(zvol, monkeypatch):
    _patched_file(zvol)
    monkeypatch.setenv("COALESCE_ZFS_DIFF", "walk")
    zvol.handle.last_send_data = None
    conformance.check_diff(zvol, "q", "a", "b", base_model=None, target_fp=zvol.fingerprint("q", "b"))
    assert zvol.handle.last_send_data is None


@pytest.mark.zfs
def test_zfs_a_diff_back_to_an_earlier_pcpi_reads_the_images(zvol, caplog):
    """The generic rollback diffs the rollback PCPI back to the exported base: `zfs send -i` cannot."""
    _patched_file(zvol)
    zvol.handle.last_send_data = None
    with caplog.at_level(logging.WARNING, logger="coalesce.zfs"):
        conformance.check_diff(zvol, "q", "b", "a", base_model=None, target_fp=zvol.fingerprint("q", "a"))
    assert zvol.handle.last_send_data is None and "zfs send" not in caplog.text
