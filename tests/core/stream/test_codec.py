"""Tests of the change-stream codec (coalesce_core/stream/codec.py, docs/stream-format.md).

The helpers ``ref_*`` build streams byte by byte from the documented layout,
independently of the codec, so the layout itself is under test and hostile
or damaged frames can be made with correct checksums.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
import zlib

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalesce_core.errors import CorruptStream, HostilePath, StreamError, TruncatedStream
from coalesce_core.stream import codec
from coalesce_core.stream import records as R

# --------------------------------------------------------------------------- reference layout

MAGIC = b"COALSTRM"
END_MAGIC = b"COALEND!"
CODE = {cls: code for code, cls in R.RECORD_TYPES.items()}


def ref_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogateescape")
    return struct.pack(">I", len(raw)) + raw


def ref_bytes(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ref_i64(v: int) -> bytes:
    return struct.pack(">q", v)


def ref_frame(code: int, seq: int, payload: bytes, *, length: int | None = None, crc: int | None = None) -> bytes:
    body = bytes([code]) + struct.pack(">Q", seq) + payload
    pre = struct.pack(">I", len(body) + 4 if length is None else length) + body
    return pre + struct.pack(">I", zlib.crc32(pre) if crc is None else crc)


def ref_begin(seq: int = 0, qtree: str = "q", base: str | None = None, target: str = "t") -> bytes:
    opt = b"\x00" if base is None else b"\x01" + ref_str(base)
    return ref_frame(CODE[R.Begin], seq, ref_str(qtree) + opt + ref_str(target))


def ref_mkdir(seq: int, path: str, mode: int = 0o755) -> bytes:
    return ref_frame(CODE[R.MkDir], seq, ref_str(path) + ref_i64(mode))


def ref_end(seq: int, count: int) -> bytes:
    return ref_frame(CODE[R.End], seq, ref_i64(count))


def ref_stream(*frames: bytes, trailer: bool = True, digest: bytes | None = None) -> bytes:
    data = MAGIC + b"\x01" + b"".join(frames)
    if trailer:
        data += (hashlib.sha256(data).digest() if digest is None else digest) + END_MAGIC
    return data


F1 = 9 + len(ref_begin(0))  # byte offset of frame 1 after the default Begin


def decode_all(source) -> list:
    return list(codec.decode(source))


def enc(records) -> bytes:
    return b"".join(codec.encode(records))


# --------------------------------------------------------------------------- examples

NON_UTF8 = os.fsdecode(b"caf\xe9-\xff\xfe")  # latin-1 name: not UTF-8, carried by surrogateescape

EXAMPLES: dict[type, list] = {
    R.Begin: [R.Begin("q", None, "snap-1"), R.Begin("a/b", "snap-0", "snap-1"), R.Begin(NON_UTF8, NON_UTF8, "é")],
    R.MkDir: [R.MkDir("d"), R.MkDir("d/e", 0o700), R.MkDir(NON_UTF8 + "/x", 0o40755)],
    R.MkFile: [R.MkFile("f"), R.MkFile("d/" + NON_UTF8, 0)],
    R.Symlink: [R.Symlink("l", "../../outside/is/fine/for/a/target"), R.Symlink(NON_UTF8, "/abs/" + NON_UTF8)],
    R.HardLink: [R.HardLink("a", "b"), R.HardLink("d/" + NON_UTF8, "d/x")],
    R.Rename: [R.Rename("a", "b/c"), R.Rename(NON_UTF8, "ascii")],
    R.Unlink: [R.Unlink("x"), R.Unlink("ü/ß/" + NON_UTF8)],
    R.RmDir: [R.RmDir("d"), R.RmDir(NON_UTF8)],
    R.Write: [
        R.Write("f", 0, b""),
        R.Write("f", 2**62, b"\x00\xff" * 10),
        R.Write("f", 7, bytes(range(256)) * (R.MAX_DATA // 256)),
    ],  # exactly 1 MiB
    R.Truncate: [R.Truncate("f", 0), R.Truncate("f", 2**63 - 1)],
    R.SetAttr: [
        R.SetAttr("f"),
        R.SetAttr("f", mode=0o4755, uid=2**32 - 2, gid=0, mtime_ns=-1),
        R.SetAttr("f", mtime_ns=1_700_000_000_123_456_789),
    ],
    R.SetXattr: [
        R.SetXattr("f", "user.a"),
        R.SetXattr("f", "user.b", b""),
        R.SetXattr("f", "security." + NON_UTF8, b"\x00" * 65536),
    ],
    R.End: [R.End(0), R.End(3)],
}


def test_every_wire_type_has_examples():
    assert set(EXAMPLES) == set(R.RECORD_TYPES.values())


def test_golden_layout_of_a_minimal_stream():
    data = enc([R.Begin("q", None, "t"), R.MkDir("d", 0o755), R.End(1)])
    expected = ref_stream(ref_begin(0, "q", None, "t"), ref_mkdir(1, "d", 0o755), ref_end(2, 1))
    assert data == expected
    # Spot-check the documented offsets: header, first frame length/type/seq.
    assert data[:9] == b"COALSTRM\x01"
    length, code, seq = struct.unpack_from(">IBQ", data, 9)
    assert (code, seq) == (1, 0) and length == 1 + 8 + (4 + 1) + 1 + (4 + 1) + 4
    assert data.endswith(b"COALEND!")
    assert data[-40:-8] == hashlib.sha256(data[:-40]).digest()


@pytest.mark.parametrize(
    "rec", [r for cls in R.RECORD_TYPES.values() if cls not in (R.Begin, R.End) for r in EXAMPLES[cls]], ids=repr
)
def test_every_change_record_roundtrips(rec):
    stream = [R.Begin("q", None, "t"), rec, R.End(1)]
    out = list(codec.roundtrip(stream))
    assert out == stream
    assert [type(r) for r in out] == [type(r) for r in stream]


@pytest.mark.parametrize("begin", EXAMPLES[R.Begin], ids=repr)
def test_begin_variants_roundtrip(begin):
    assert list(codec.roundtrip([begin, R.End(0)])) == [begin, R.End(0)]


def test_non_utf8_names_survive_byte_exact():
    rec = R.MkFile("d/" + NON_UTF8)
    (_, out, _) = codec.roundtrip([R.Begin("q", None, "t"), rec, R.End(1)])
    assert os.fsencode(out.path) == b"d/caf\xe9-\xff\xfe"


def test_one_mib_write_is_passed_through_uncopied_by_the_encoder():
    data = os.urandom(R.MAX_DATA)
    chunks = list(codec.encode([R.Begin("q", None, "t"), R.Write("f", 0, data), R.End(1)]))
    assert any(c is data for c in chunks)
    (_, w, _) = decode_all(chunks)
    assert w.data == data and len(w.data) == R.MAX_DATA


# --------------------------------------------------------------------------- hypothesis

_component = (
    st.binary(min_size=1, max_size=12)
    .filter(lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b".."))
    .map(os.fsdecode)
)
_path = st.lists(_component, min_size=1, max_size=4).map("/".join)
_text = st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b).map(os.fsdecode)
_i64 = st.integers(-(2**63), 2**63 - 1)
_u63 = st.integers(0, 2**63 - 1)
_opt_i64 = st.none() | _i64

CHANGE_STRATEGIES = {
    R.MkDir: st.builds(R.MkDir, _path, _i64),
    R.MkFile: st.builds(R.MkFile, _path, _i64),
    R.Symlink: st.builds(R.Symlink, _path, _text),
    R.HardLink: st.builds(R.HardLink, _path, _path),
    R.Rename: st.builds(R.Rename, _path, _path),
    R.Unlink: st.builds(R.Unlink, _path),
    R.RmDir: st.builds(R.RmDir, _path),
    R.Write: st.builds(R.Write, _path, st.integers(0, 2**63 - 1 - 3000), st.binary(max_size=3000)),  # ends by 2^63 - 1
    R.Truncate: st.builds(R.Truncate, _path, _u63),
    R.SetAttr: st.builds(R.SetAttr, _path, _opt_i64, _opt_i64, _opt_i64, _opt_i64),
    R.SetXattr: st.builds(R.SetXattr, _path, _component, st.none() | st.binary(max_size=300)),
}
_changes = st.one_of(*CHANGE_STRATEGIES.values())
_streams = st.builds(
    lambda q, base, target, cs: list(R.framed(q, base, target, cs)),
    _path,
    st.none() | _text,
    _text,
    st.lists(_changes, max_size=25),
)


def test_strategy_covers_every_change_type():
    # Keep the property tests honest when a record type is added.
    assert set(CHANGE_STRATEGIES) == set(R.CHANGE_TYPES)


@settings(max_examples=300, deadline=None)
@given(_streams)
def test_any_stream_roundtrips(stream):
    assert list(codec.roundtrip(stream)) == stream
    data = enc(stream)
    assert decode_all(data) == stream
    assert decode_all(io.BytesIO(data)) == stream


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams, st.data())
def test_any_chunking_decodes_the_same(stream, data):
    raw = enc(stream)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=40)))
    bounds = [0, *cuts, len(raw)]
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:])]  # includes empty chunks
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
    assert decode_all([kind(c) for c in chunks]) == stream


def test_one_byte_chunks():
    stream = [
        R.Begin("q", "b", "t"),
        *[r for cls in R.CHANGE_TYPES for r in EXAMPLES[cls] if cls is not R.Write],
        R.Write("f", 1, os.urandom(70_000)),
    ]
    stream.append(R.End(len(stream) - 1))
    raw = enc(stream)
    assert decode_all(raw[i : i + 1] for i in range(len(raw))) == stream


class ShortReads(io.RawIOBase):
    """A pipe-like file object: read(n) returns between 1 and 7 bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.max_request = 0
        self.requested = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.max_request = max(self.max_request, n)
        self.requested += n
        k = min(n, 1 + (self._pos % 7))
        out = self._data[self._pos : self._pos + k]
        self._pos += len(out)
        return out


def test_file_object_with_short_reads():
    stream = [R.Begin("q", None, "t"), R.Write("f", 0, os.urandom(5000)), R.SetAttr("f", 1, 2, 3, 4), R.End(2)]
    src = ShortReads(enc(stream))
    assert decode_all(src) == stream


# --------------------------------------------------------------------------- truncation

SMALL = [
    R.Begin("q", "s1", "s2"),
    R.MkDir("d"),
    R.MkFile("d/f", 0o600),
    R.Write("d/f", 0, b"hello"),
    R.SetAttr("d/f", mode=0o644),
    R.SetXattr("d/f", "user.x", b"v"),
    R.Symlink("d/l", "f"),
    R.End(6),
]


def test_truncation_at_every_byte_offset_raises_truncated():
    raw = enc(SMALL)
    assert decode_all(raw) == SMALL
    for cut in range(len(raw)):
        for source in (raw[:cut], io.BytesIO(raw[:cut]), [raw[i : i + 1] for i in range(cut)]):
            it = codec.decode(source)
            got = []
            with pytest.raises(TruncatedStream) as ei:
                for rec in it:
                    got.append(rec)
            assert R.End(6) not in got, f"End was yielded from a stream cut at byte {cut}"
            assert ei.value.hint and "rolled back" in ei.value.hint
            assert "ended" in ei.value.message or "empty" in ei.value.message


@settings(max_examples=60, deadline=None)
@given(_streams, st.data())
def test_truncation_of_generated_streams(stream, data):
    raw = enc(stream)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(TruncatedStream):
        decode_all(raw[:cut])


def test_truncation_messages_say_where():
    raw = enc(SMALL)
    frame_starts = _frame_offsets(raw)
    # cut in the middle of frame 3 (the Write)
    off = frame_starts[3]
    with pytest.raises(TruncatedStream, match=rf"after 2 change records, inside frame 3 at byte offset {off}"):
        decode_all(raw[: off + 10])
    # cut exactly at a frame boundary: the End is missing
    with pytest.raises(TruncatedStream, match=r"after 2 change records, without its End record"):
        decode_all(raw[:off])
    with pytest.raises(TruncatedStream, match=r"inside the 40-byte trailer"):
        decode_all(raw[:-1])
    with pytest.raises(TruncatedStream, match="empty"):
        decode_all(b"")


def _frame_offsets(raw: bytes) -> list[int]:
    offs, pos = [], 9
    while pos < len(raw) - 40:
        offs.append(pos)
        pos += 4 + struct.unpack_from(">I", raw, pos)[0]
    assert pos == len(raw) - 40
    return offs


# --------------------------------------------------------------------------- corruption


def test_flipping_any_single_byte_is_detected():
    raw = enc(SMALL)
    for i in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(raw)
            bad[i] ^= mask
            got = []
            with pytest.raises(StreamError) as ei:
                for rec in codec.decode(bytes(bad)):
                    got.append(rec)
            assert type(ei.value) in (CorruptStream, TruncatedStream, HostilePath), (i, mask, ei.value)
            assert not any(isinstance(r, R.End) for r in got), f"End yielded though byte {i} was changed"


@settings(max_examples=100, deadline=None)
@given(_streams, st.data())
def test_flipping_a_byte_of_generated_streams_is_detected(stream, data):
    raw = bytearray(enc(stream))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((CorruptStream, TruncatedStream, HostilePath)):
        decode_all(bytes(raw))


def test_flipped_byte_in_a_large_write_is_caught_by_its_crc():
    data = os.urandom(R.MAX_DATA)
    raw = bytearray(enc([R.Begin("q", None, "t"), R.Write("f", 0, data), R.End(1)]))
    for i in (F1 + 40, F1 + 4000, len(raw) - 40 - 28 - 5):  # inside the data, near its end
        bad = bytearray(raw)
        bad[i] ^= 0x10
        it = codec.decode(bytes(bad))
        assert next(it) == R.Begin("q", None, "t")
        with pytest.raises(CorruptStream, match=rf"frame 1 at byte offset {F1} .*fails its checksum"):
            next(it)


def test_checksum_failure_names_frame_and_offset():
    raw = bytearray(enc(SMALL))
    off = _frame_offsets(bytes(raw))[3]
    raw[off + 20] ^= 0x01
    with pytest.raises(CorruptStream, match=rf"frame 3 at byte offset {off} .*fails its checksum") as ei:
        decode_all(bytes(raw))
    assert "rolled back" in ei.value.hint


def test_bad_magic_and_unknown_version():
    raw = enc(SMALL)
    with pytest.raises(CorruptStream, match="not a coalesce change stream"):
        decode_all(b"HTTP/1.1 400 Bad Request\r\n" + raw)
    with pytest.raises(CorruptStream, match="format version 2") as ei:
        decode_all(raw[:8] + b"\x02" + raw[9:])
    assert "upgrade" in ei.value.hint


def test_digest_mismatch_is_corrupt_and_end_is_withheld():
    frames = (ref_begin(0), ref_mkdir(1, "d"), ref_end(2, 1))
    it = codec.decode(ref_stream(*frames, digest=b"\x00" * 32))
    assert next(it) == R.Begin("q", None, "t")
    assert next(it) == R.MkDir("d")
    with pytest.raises(CorruptStream, match="trailer digest"):
        next(it)


def test_bad_end_magic():
    raw = enc(SMALL)
    with pytest.raises(CorruptStream, match="COALEND!"):
        decode_all(raw[:-8] + b"COALEND?")


def test_trailing_data_after_trailer():
    raw = enc(SMALL)
    with pytest.raises(CorruptStream, match="follows the trailer"):
        decode_all(raw + b"\x00")
    with pytest.raises(CorruptStream, match="follows the trailer"):
        decode_all(io.BytesIO(raw + raw))
    with pytest.raises(CorruptStream, match="follows the trailer"):
        decode_all([raw, b"", b"x"])
    assert decode_all([raw, b"", b""]) == SMALL  # empty chunks are not data


def test_sequence_gap_and_duplicate():
    b, m1, m2 = ref_begin(0), ref_mkdir(1, "a"), ref_mkdir(2, "b")
    with pytest.raises(CorruptStream, match="sequence number 2; expected 1"):
        decode_all(ref_stream(b, m2, m1, ref_end(3, 2)))
    with pytest.raises(CorruptStream, match="sequence number 1; expected 2"):
        decode_all(ref_stream(b, m1, m1, ref_end(3, 2)))


def test_unknown_type_code():
    assert 13 not in R.RECORD_TYPES
    with pytest.raises(CorruptStream, match="unknown record type code 13") as ei:
        decode_all(ref_stream(ref_begin(0), ref_frame(13, 1, b""), ref_end(2, 1)))
    assert "versions" in ei.value.hint


def test_order_contract_begin_first_and_once():
    with pytest.raises(CorruptStream, match="starts with a MkDir record"):
        decode_all(ref_stream(ref_mkdir(0, "a"), ref_end(1, 0)))
    with pytest.raises(CorruptStream, match="starts with a End record"):
        decode_all(ref_stream(ref_end(0, 0)))
    with pytest.raises(CorruptStream, match="second Begin record in frame 1"):
        decode_all(ref_stream(ref_begin(0), ref_begin(1), ref_end(2, 0)))


def test_missing_end():
    data = ref_stream(ref_begin(0), ref_mkdir(1, "a"), trailer=False)
    it = codec.decode(data)
    assert next(it) == R.Begin("q", None, "t")
    assert next(it) == R.MkDir("a")
    with pytest.raises(TruncatedStream, match="after 1 change records, without its End record"):
        next(it)


@pytest.mark.parametrize("count", [0, 2, 2**63 - 1, -1])
def test_bad_end_count(count):
    data = ref_stream(ref_begin(0), ref_mkdir(1, "a"), ref_end(2, count))
    got = []
    with pytest.raises(CorruptStream) as ei:
        for r in codec.decode(data):
            got.append(r)
    assert got == [R.Begin("q", None, "t"), R.MkDir("a")]
    msg = ei.value.message
    assert ("End record" in msg and f"says {count}" in msg) or "non-negative" in msg


def test_garbage_after_last_field_inside_a_frame():
    frame = ref_frame(CODE[R.MkDir], 1, ref_str("a") + ref_i64(0o755) + b"\x00\x00")
    with pytest.raises(
        CorruptStream,
        match=rf"frame 1 at byte offset {F1} \(MkDir\): 2 bytes of garbage after the last field, at byte offset {F1 + 4 + 9 + 5 + 8}\b",
    ):
        decode_all(ref_stream(ref_begin(0), frame, ref_end(2, 1)))


def test_frame_too_short_for_its_fields():
    frame = ref_frame(CODE[R.MkDir], 1, ref_str("a") + b"\x00\x00")  # mode cut to 2 bytes
    with pytest.raises(CorruptStream, match="'mode'.*ends inside"):
        decode_all(ref_stream(ref_begin(0), frame, ref_end(2, 1)))


def test_bad_presence_flag():
    frame = ref_frame(CODE[R.SetAttr], 1, ref_str("a") + b"\x02" + ref_i64(1) + b"\x00\x00\x00")
    with pytest.raises(CorruptStream, match="presence flag is 2"):
        decode_all(ref_stream(ref_begin(0), frame, ref_end(2, 1)))


def test_validator_value_errors_become_corrupt_stream():
    frame = ref_frame(CODE[R.Write], 1, ref_str("f") + ref_i64(-5) + ref_bytes(b"x"))
    with pytest.raises(CorruptStream, match="does not hold a valid Write record.*offset must be a non-negative"):
        decode_all(ref_stream(ref_begin(0), frame, ref_end(2, 1)))


# --------------------------------------------------------------------------- hostile paths


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs", "a/../../b", "a/./b", "a//b", "a/", "", "a\x00b"])
def test_hostile_path_with_a_correct_crc(path):
    frames = (ref_begin(0), ref_frame(CODE[R.MkFile], 1, ref_str(path) + ref_i64(0o644)), ref_end(2, 1))
    it = codec.decode(ref_stream(*frames))
    assert next(it) == R.Begin("q", None, "t")
    with pytest.raises(HostilePath) as ei:
        next(it)
    assert isinstance(ei.value, StreamError)
    assert f"frame 1 at byte offset {F1} (MkFile)" in ei.value.message
    assert ei.value.hint


def _verdict(check, path):
    try:
        return check(path)
    except HostilePath:
        return "refused"


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=st.sampled_from(["a", "b", ".", "/", "\x00", "é", "\udcff", " "]), max_size=12),
        st.lists(st.sampled_from(["", ".", "..", "...", "a", "é", "a" * 200, "b" * 255, "c" * 256]), max_size=4).map(
            "/".join
        ),
    )
)
def test_check_path_fast_path_agrees_with_the_full_check(path):
    """check_path's fast path (ASCII, at most MAX_NAME characters) accepts exactly what the full check accepts."""
    assert _verdict(R.check_path, path) == _verdict(R.check_path_fully, path)


def test_hostile_rename_target_and_qtree():
    frame = ref_frame(CODE[R.Rename], 1, ref_str("a") + ref_str("../../x"))
    with pytest.raises(HostilePath, match=r"\(Rename\): new '\.\./\.\./x' has a '\.\.' component"):
        decode_all(ref_stream(ref_begin(0), frame, ref_end(2, 1)))
    with pytest.raises(HostilePath, match="qtree"):
        decode_all(ref_stream(ref_begin(0, qtree="/q"), ref_end(1, 0)))


def test_hostile_record_smuggled_past_the_validators_is_caught_on_decode():
    rec = R.MkDir("ok")
    object.__setattr__(rec, "path", "../escape")  # a buggy or hostile source
    with pytest.raises(HostilePath, match="frame 1"):
        decode_all(codec.encode([R.Begin("q", None, "t"), rec, R.End(1)]))


# --------------------------------------------------------------------------- bounded memory


class Tracking(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.max_request = 0

    def read(self, n: int | None = -1) -> bytes:
        assert n is not None, "an unbounded read(None)"  # (max() below raised TypeError for it)
        self.max_request = max(self.max_request, n)
        return super().read(n)


@pytest.mark.parametrize("length", [0, 12, codec.MAX_FRAME + 1, 0xFFFFFFFF])
def test_bad_frame_length_is_rejected_before_reading(length):
    raw = MAGIC + b"\x01" + struct.pack(">I", length) + b"\x00" * 64
    src = Tracking(raw)
    with pytest.raises(CorruptStream, match=rf"frame 0 at byte offset 9 claims a length of {length} bytes"):
        decode_all(src)
    assert src.max_request <= 9


def test_oversize_field_length_with_a_correct_crc():
    huge = ref_frame(CODE[R.Write], 1, ref_str("f") + ref_i64(0) + struct.pack(">I", 0xFFFFFFF0) + b"x")
    tracemalloc.start()
    try:
        with pytest.raises(CorruptStream, match="'data'.*length 4294967280 exceeds the limit"):
            decode_all(ref_stream(ref_begin(0), huge, ref_end(2, 1)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    n = codec.MAX_STR + 1
    path = ref_frame(CODE[R.MkDir], 1, struct.pack(">I", n) + b"a" * n + ref_i64(0))
    with pytest.raises(CorruptStream, match=f"'path'.*length {n} exceeds the limit of {codec.MAX_STR}"):
        decode_all(ref_stream(ref_begin(0), path, ref_end(2, 1)))
    past = ref_frame(CODE[R.MkDir], 1, struct.pack(">I", 100) + b"a" + ref_i64(0))
    with pytest.raises(CorruptStream, match="'path'.*runs past the end"):
        decode_all(ref_stream(ref_begin(0), past, ref_end(2, 1)))


def test_reads_are_bounded_by_one_frame():
    stream = [R.Begin("q", None, "t"), *[R.Write("f", i << 20, os.urandom(R.MAX_DATA)) for i in range(3)], R.End(3)]
    src = Tracking(enc(stream))
    assert decode_all(src) == stream
    assert src.max_request <= codec.MAX_FRAME


def test_decode_is_lazy():
    stream = [R.Begin("q", None, "t"), R.MkDir("a"), R.MkDir("b"), R.End(2)]
    raw = enc(stream)
    pulled = []

    def chunks():
        for i in range(0, len(raw), 8):
            pulled.append(i)
            yield raw[i : i + 8]
        raise AssertionError("unreachable in this test")

    it = codec.decode(chunks())
    assert pulled == []  # nothing read before the first next()
    assert next(it) == stream[0]
    assert next(it) == R.MkDir("a")
    assert pulled[-1] + 8 < len(raw) - 40  # stopped long before the trailer


def test_roundtrip_is_lazy_and_producer_errors_propagate():
    seen = []

    def producer():
        yield R.Begin("q", None, "t")
        seen.append("begin sent")
        yield R.MkDir("a")
        raise RuntimeError("diff failed")

    it = codec.roundtrip(producer())
    assert next(it) == R.Begin("q", None, "t")
    assert seen == []  # the producer was not run past Begin to decode Begin
    assert next(it) == R.MkDir("a")
    assert seen == ["begin sent"]
    with pytest.raises(RuntimeError, match="diff failed"):
        next(it)


# --------------------------------------------------------------------------- encoder contract


@pytest.mark.parametrize(
    ("records", "exc", "match"),
    [
        ([], TruncatedStream, "no records"),
        ([R.MkDir("a"), R.End(1)], CorruptStream, "must start with Begin"),
        ([R.Begin("q", None, "t"), R.Begin("q", None, "t"), R.End(0)], CorruptStream, "second Begin"),
        ([R.Begin("q", None, "t"), R.MkDir("a")], TruncatedStream, "after 1 change records without End"),
        ([R.Begin("q", None, "t"), R.MkDir("a"), R.End(2)], CorruptStream, "End says 2"),
        ([R.Begin("q", None, "t"), R.End(0), R.MkDir("a")], CorruptStream, "after End"),
        ([R.Begin("q", None, "t"), R.MkDir("a", 2**63), R.End(1)], StreamError, "64 signed bits"),
        ([R.Begin("q", None, "t"), R.MkDir("\udcc3\udca9"), R.End(1)], StreamError, "survives os.fsencode"),
        ([R.Begin("q", None, "\ud800"), R.End(0)], StreamError, "surrogates"),  # MkDir("\ud800") fails in check_path
        ([R.Begin("q", None, 7), R.End(0)], StreamError, "needs a str"),  # type: ignore[arg-type]
        ([R.Begin("q", None, "t" * ((1 << 20) + 1)), R.End(0)], StreamError, f"at most {1 << 20} bytes"),
        ([R.Begin("q", None, "t"), "not a record", R.End(1)], StreamError, "no wire code"),
    ],
)
def test_encoder_rejects_broken_streams(records, exc, match):
    with pytest.raises(exc, match=match):
        enc(records)


def test_encoder_accepts_bytes_like_data():
    rec = R.Write("f", 0, b"x" * 40000)
    object.__setattr__(rec, "data", bytearray(b"y" * 40000))
    (_, out, _) = list(codec.roundtrip([R.Begin("q", None, "t"), rec, R.End(1)]))
    assert out.data == b"y" * 40000 and type(out.data) is bytes


def test_codec_is_generic_over_attrs_fields():
    @attrs.frozen
    class Probe:
        name: str
        blob: bytes | None
        n: int
        flag: bool
        ratio: float | None = None
        tail: bytes = b""

    R.RECORD_TYPES[200] = Probe
    try:
        big = Probe("y", os.urandom(50_000), 0, False, None, os.urandom(60_000))  # two uncopied chunks
        stream = [
            R.Begin("q", None, "t"),
            Probe("x", None, -3, True, 0.5),
            Probe(NON_UTF8, b"\x00", 2**63 - 1, False),
            big,
            R.End(3),
        ]
        assert list(codec.roundtrip(stream)) == stream
        chunks = list(codec.encode(stream))
        assert all(chunks) and any(c is big.blob for c in chunks) and any(c is big.tail for c in chunks)
        raw = b"".join(chunks)
        assert raw[F1 + 4] == 200  # the type code of frame 1
    finally:
        del R.RECORD_TYPES[200]
        codec._PLANS_BY_CLASS.pop(Probe, None)
        codec._PLANS_BY_CODE.pop(200, None)


def test_unsupported_field_type_is_a_clear_error():
    @attrs.frozen
    class Bad:
        xs: list

    R.RECORD_TYPES[201] = Bad
    try:
        with pytest.raises(TypeError, match="Bad.xs has type"):
            enc([R.Begin("q", None, "t"), Bad([1]), R.End(1)])
    finally:
        del R.RECORD_TYPES[201]


# --------------------------------------------------------------------------- conveniences


def test_write_stream_and_read_stream(tmp_path):
    stream = [
        R.Begin("q", None, "t"),
        R.MkFile("f"),
        R.Write("f", 0, os.urandom(R.MAX_DATA)),
        R.Truncate("f", 10),
        R.End(3),
    ]
    p = tmp_path / "s.coal"
    with open(p, "wb") as f:
        stats = codec.write_stream(stream, f)
    assert stats == {"records": 5, "changes": 3, "bytes": p.stat().st_size}
    with open(p, "rb") as f:
        assert list(codec.read_stream(f)) == stream
    # unbuffered raw file objects too
    with open(p, "rb", buffering=0) as f:
        assert list(codec.read_stream(f)) == stream


def test_write_stream_handles_short_writes():
    class Short(io.RawIOBase):
        def __init__(self):
            self.buf = bytearray()

        def writable(self):
            return True

        def write(self, b):
            b = bytes(b)[:1000]
            self.buf += b
            return len(b)

    out = Short()
    stats = codec.write_stream(SMALL, out)
    assert stats["bytes"] == len(out.buf)
    assert decode_all(bytes(out.buf)) == SMALL


def test_decode_rejects_non_sources():
    with pytest.raises(TypeError, match="binary file object or an iterable"):
        codec.decode(42)


# --------------------------------------------------------------------------- structure-aware fuzzing
def _payload_for(code: int, draw_payload: bytes, mode: str) -> bytes:
    """A frame payload: random bytes, or random values in the layout of the type's fields (strings
    and bytes with length prefixes, i64s, presence flags), which gets past the framing into the
    field decoders and the records' validators."""
    if mode == "raw":
        return draw_payload
    out, data = b"", draw_payload
    while data:
        kind, data = data[0] % 4, data[1:]
        piece, data = data[: 1 + (data[0] % 40 if data else 0)], data[1 + (data[0] % 40 if data else 0) :]
        if kind == 0:
            out += ref_bytes(piece)
        elif kind == 1:
            out += ref_i64(int.from_bytes(piece[:8].ljust(8, b"\0"), "big", signed=True))
        elif kind == 2:
            out += bytes([piece[0] % 3]) if piece else b"\x01"
        else:
            out += struct.pack(">I", int.from_bytes(piece[:4].ljust(4, b"\xff"), "big")) + piece
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    frames=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(sorted(R.RECORD_TYPES)), st.integers(0, 255)),
            st.binary(max_size=300),
            st.sampled_from(["raw", "fields"]),
        ),
        max_size=6,
    ),
    end=st.booleans(),
    begin=st.booleans(),
)
def test_fuzz_frames_with_valid_checksums_raise_only_stream_errors(frames, end, begin):
    """Frames whose lengths, sequence numbers, CRCs and trailer digest are all right but whose type
    codes and payloads are anything: the decoder yields records or raises a StreamError subclass
    (TruncatedStream, CorruptStream, HostilePath) with a message, never another exception (an
    IndexError, a struct.error, a UnicodeDecodeError, a validator's ValueError) and never hangs."""
    parts = [ref_begin(0)] if begin else []
    for code, payload, mode in frames:
        parts.append(ref_frame(code, len(parts), _payload_for(code, payload, mode)))
    if end:
        parts.append(ref_end(len(parts), max(0, len(parts) - 1)))
    try:
        for rec in codec.decode(ref_stream(*parts)):
            assert type(rec) in R.RECORD_TYPES.values()
    except StreamError as exc:
        assert exc.message
