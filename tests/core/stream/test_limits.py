"""Sizes and offsets: the stream's own bound (2^63 - 1, record validators and so the codec) and the
destination's (coalesce_core.stream.limits, VolumeHandle.max_file_size)."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from coalesce_core.errors import CorruptStream, FileTooLarge
from coalesce_core.stream import codec, limits
from coalesce_core.stream import records as R

M = R.MAX_FILE_SIZE


def _stream(*changes: object) -> list[object]:
    stream: Any = R.framed("q", None, "t", [R.MkFile(path="f"), *changes])
    return list(codec.decode(codec.encode(stream)))


def test_records_end_at_2_63_minus_1():
    """A Write may end at 2^63 - 1, not one byte later; a Truncate may reach it, not pass it."""
    assert _stream(R.Write(path="f", offset=M - 1, data=b"x"), R.Truncate(path="f", size=M))[-1] == R.End(records=3)
    with pytest.raises(ValueError, match="ends past"):
        R.Write(path="f", offset=M, data=b"x")
    with pytest.raises(ValueError, match="larger than"):
        R.Truncate(path="f", size=M + 1)


def test_the_decoder_refuses_a_write_past_2_63_minus_1():
    """Bytes on the wire built around the validators: a Write of 3 bytes at 2^63 - 2 is CorruptStream."""
    stream: Any = R.framed("q", None, "t", [R.Write(path="f", offset=M - 3, data=b"xyz")])
    good = b"".join(codec.encode(stream))
    old = struct.pack(">q", M - 3)
    assert good.count(old) == 1
    at = good.index(old)
    records = list(codec.decode(good))
    assert records[1] == R.Write(path="f", offset=M - 3, data=b"xyz")
    raw = bytearray(good)
    raw[at : at + 8] = struct.pack(">q", M - 2)  # offset 2^63 - 2, the frame's crc made right again
    pos = codec.HEADER_SIZE
    while True:
        (length,) = struct.unpack_from(">I", raw, pos)
        end = pos + 4 + length
        if pos < at < end:
            raw[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(raw[pos : end - 4])))
            break
        pos = end
    with pytest.raises(CorruptStream, match="ends past"):
        list(codec.decode(bytes(raw)))


@pytest.mark.parametrize(
    "record, size",
    [
        (R.Write(path="d/f", offset=(1 << 40) - 1, data=b"xy"), (1 << 40) + 1),
        (R.Truncate(path="d/f", size=1 << 41), 1 << 41),
    ],
)
def test_a_record_past_the_limit_names_the_file_the_size_and_the_limit(record, size):
    limits.check_record(record, size, "dest")  # exactly at the limit: fine
    with pytest.raises(FileTooLarge) as err:
        limits.check_record(record, size - 1, "the destination mem://d")
    assert f"file 'd/f' would be {size} bytes" in err.value.message
    assert f"the destination mem://d stores files of at most {size - 1} bytes" in err.value.message
    assert err.value.hint and "rolled back" in err.value.hint


def test_the_filter_stops_at_the_first_record_past_the_limit_and_closes_the_stream():
    closed = []

    def source():
        try:
            yield R.MkFile(path="a")
            yield R.Write(path="a", offset=10, data=b"fits")
            yield R.Truncate(path="a", size=101)
            yield R.MkFile(path="never")
        finally:
            closed.append(True)

    seen = []
    stream = limits.within_limits(source(), 100, "dest")
    with pytest.raises(FileTooLarge, match="'a' would be 101 bytes"):
        for rec in stream:
            seen.append(rec)
    assert [type(r).__name__ for r in seen] == ["MkFile", "Write"]
    stream.close()
    assert closed == [True]


def test_human_sizes():
    assert [limits.human(n) for n in (0, 1023, 1 << 40, (1 << 32) * 4096 - 4096, M, 3 << 61)] == [
        "0 bytes",
        "1023 bytes",
        "1 TiB",
        "16 TiB",
        "8 EiB",
        "6 EiB",
    ]
