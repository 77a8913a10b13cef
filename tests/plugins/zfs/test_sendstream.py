"""The ZFS send stream reader (coalesce_zfs.sendstream): pure, no pool needed.

Streams are built by tests/zfsstream.py from the record layout; a real
``zfs send -i`` stream is read in tests/plugins/zfs/test_senddata.py."""

from __future__ import annotations

import io

import pytest
import zfsstream as Z
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce_core.errors import CorruptStream, StreamError, TruncatedStream
from coalesce_zfs import sendstream as S


def parse(data: bytes) -> list:
    return list(S.records(io.BytesIO(data)))


@pytest.mark.parametrize("order", ["<", ">"])
def test_reads_every_record_in_either_byte_order(order):
    data = b"".join(
        [
            Z.begin("tank/src@b", fromguid=7, order=order),
            Z.obj(12, blksz=4096, bonus=Z.znode(9, order), order=order),
            Z.free(12, 8192, Z.TO_END, order=order),
            Z.write(12, 0, b"a" * 4096, order=order),
            Z.freeobjects(40, 8, order=order),
            Z.write(12, 4096, b"b" * 4096, order=order),
            Z.free(12, 100, 50, order=order),
            Z.end(order=order),
        ]
    )
    recs = parse(data)
    assert recs == [
        S.Begin(toguid=Z.GUID, fromguid=7, toname="tank/src@b", incremental=True),
        S.Object(object=12, type=Z.FILE_DATA, blksz=4096, gen=9),
        S.Free(object=12, offset=8192, length=S.TO_END),
        S.Write(object=12, type=Z.FILE_DATA, offset=0, data=b"a" * 4096),
        S.FreeObjects(first=40, count=8),
        S.Write(object=12, type=Z.FILE_DATA, offset=4096, data=b"b" * 4096),
        S.Free(object=12, offset=100, length=50),
        S.End(toguid=Z.GUID),
    ]


def test_only_a_znode_bonus_gives_a_generation():
    """zp_gen is read from a ZNODE bonus (bonus type 17) long enough to hold it, nothing else."""
    recs = parse(
        Z.begin()
        + Z.obj(3, bonus=Z.znode(77))
        + Z.obj(4, bonus=Z.znode(77), bonustype=44)
        + Z.obj(5, bonus=b"\x05" * 40)
        + Z.obj(6, bonus=b"")
        + Z.end()
    )
    assert [r.gen for r in recs[1:-1]] == [77, None, None, None]


def test_a_full_stream_is_not_incremental():
    (begin, end) = parse(Z.begin(fromguid=0) + Z.end())
    assert begin.incremental is False and end == S.End(toguid=Z.GUID)


def test_the_reader_stops_at_end():
    f = io.BytesIO(Z.begin() + Z.end() + b"more")
    assert [type(r) for r in S.records(f)] == [S.Begin, S.End]
    assert f.read() == b"more"  # left for the caller (senddata.ZfsSend refuses it)


def test_a_truncated_stream_is_truncated_at_every_length():
    data = Z.begin() + Z.obj(5) + Z.write(5, 0, bytes(range(256)) * 4) + Z.free(5, 1024, Z.TO_END) + Z.end()
    for n in range(len(data)):
        with pytest.raises(TruncatedStream):
            parse(data[:n])
    assert type(parse(data)[-1]) is S.End


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\0" * 312, "not a ZFS send stream"),
        (Z.begin(magic=0xDEADBEEF), "not a ZFS send stream"),
        (Z.begin(versioninfo=1 | (1 << 2)) + Z.end(), "format this reader does not know"),  # a feature flag (dedup)
        (Z.begin(versioninfo=2) + Z.end(), "format this reader does not know"),  # a compound (-R) stream
        (Z.begin() + Z.record(6) + Z.end(), "WRITE_BYREF"),
        (Z.begin() + Z.record(9) + Z.end(), "type 9"),
        (Z.begin() + Z.record(3, payloadlen=8) + Z.end(), "payload length"),
        (Z.begin() + Z.write(5, 0, b"") + Z.end(), "WRITE of 0 bytes"),
        (Z.begin() + Z.obj(5, bonus=b"x" * 400) + Z.end(), "bonus of 400 bytes"),
        (Z.begin() + Z.write(5, 0, b"a" * 8, toguid=99) + Z.end(), "snapshot GUID"),
        (Z.begin() + Z.end(toguid=98), "END of snapshot GUID"),
    ],
)
def test_malformed_streams_are_refused_with_a_reason(data, words):
    with pytest.raises(CorruptStream) as ei:
        parse(data)
    assert words in ei.value.message


def test_a_huge_write_length_is_refused_before_reading_it():
    head = Z.write(5, 0, b"")[:32] + (1 << 40).to_bytes(8, "little") + Z.write(5, 0, b"")[40:]
    with pytest.raises(CorruptStream):
        parse(Z.begin() + head + Z.end())


_VALID = Z.begin() + Z.obj(3) + Z.write(3, 0, b"x" * 512) + Z.free(3, 512, Z.TO_END) + Z.freeobjects(9, 2) + Z.end()


@settings(max_examples=300)
@given(st.data())
def test_fuzz_the_reader_raises_only_stream_errors(data):
    """Random bytes, and a valid stream with bytes flipped, cut or inserted: the reader yields records
    or raises a StreamError, never anything else (no crash, no unbounded read)."""
    kind = data.draw(st.sampled_from(["random", "mutated"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2000))
    else:
        blob = bytearray(_VALID)
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(blob) - 1))
            op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip":
                blob[i] ^= data.draw(st.integers(1, 255))
            elif op == "cut":
                del blob[i : i + data.draw(st.integers(1, 400))]
            else:
                blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
            if not blob:
                break
        blob = bytes(blob)
    try:
        for rec in S.records(io.BytesIO(blob)):
            if type(rec) is S.Write:
                assert 0 < len(rec.data) <= S.MAX_BLOCK
    except StreamError:
        pass
