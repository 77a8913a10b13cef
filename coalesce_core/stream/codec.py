"""Binary codec of the change stream (DESIGN §4 "Change stream").

The byte layout is documented in ``docs/stream-format.md``; in short::

    header   b"COALSTRM" u8 version(=1)
    frame*   u32 length | u8 type | u64 seq | payload | u32 crc32
    trailer  32-byte sha256 of header+frames | b"COALEND!"

All integers are big-endian (network order).  ``length`` counts the bytes
after the length field (type, seq, payload and crc, so at least 13); the crc
covers every byte of the frame before it, the length field included.  The
payload is the record's attrs fields in declaration order, typed from the
class annotations, so a new record type needs only an entry in
:data:`coalesce_core.stream.records.RECORD_TYPES`:

=========  ==================================================
``str``    u32 byte length + UTF-8 (``surrogateescape``)
``bytes``  u32 length + the bytes
``int``    i64
``bool``   u8 0 or 1
``float``  IEEE-754 f64
``X|None`` u8 presence flag (0 none, 1 present) + ``X``
=========  ==================================================

:func:`decode` checks everything and raises a :class:`StreamError` subclass
(TruncatedStream, CorruptStream, HostilePath) naming the frame and byte offset.
It is lazy and bounded in memory: it holds at most one frame (at most
``MAX_FRAME`` bytes) plus the caller's current chunk, and yields each record
as soon as its frame is verified.  ``End`` is yielded only after the trailer
digest has been verified and the source is known to hold nothing more, so an
applier may commit when it sees ``End`` and must roll back on any exception.
"""

from __future__ import annotations

import hashlib
import types
import typing
import zlib
from struct import Struct
from struct import error as StructError
from typing import Any, Iterable, Iterator, NamedTuple

import attrs

from coalesce_core.errors import CorruptStream, HostilePath, StreamError, TruncatedStream
from coalesce_core.stream.records import MAX_DATA, MAX_PATH, RECORD_TYPES, Begin, End, Record

__all__ = [
    "MAGIC",
    "END_MAGIC",
    "FORMAT_VERSION",
    "MAX_FRAME",
    "MAX_STR",
    "MAX_BYTES",
    "HEADER_SIZE",
    "FRAME_OVERHEAD",
    "TRAILER_SIZE",
    "encode",
    "decode",
    "write_stream",
    "read_stream",
    "roundtrip",
    "StreamEncoder",
]

MAGIC = b"COALSTRM"
END_MAGIC = b"COALEND!"
FORMAT_VERSION = 1
#: Largest value of a frame's length field (type + seq + payload + crc): the largest record
#: carries two paths (Rename, HardLink) or a path and a Write's data, plus small fields.
MAX_FRAME = MAX_DATA + 2 * MAX_PATH + (64 << 10)
#: Largest encoded ``str`` field (bytes); paths are capped at MAX_PATH, symlink targets at MAX_TARGET.
MAX_STR = MAX_PATH
#: Largest ``bytes`` field; a Write carries at most MAX_DATA.
MAX_BYTES = MAX_DATA
HEADER_SIZE = len(MAGIC) + 1
#: length(4) + type(1) + seq(8) + crc(4)
FRAME_OVERHEAD = 17
TRAILER_SIZE = 32 + len(END_MAGIC)
_MIN_LENGTH = FRAME_OVERHEAD - 4

_HEAD = Struct(">IBQ")  # length, type code, sequence number
_TYPESEQ = Struct(">BQ")
_U32 = Struct(">I")
_I64 = Struct(">q")
_F64 = Struct(">d")
_BIG = 16 << 10  # bytes fields at least this long are passed through uncopied

_HINT_TRUNCATED = "the source or the link failed mid-transfer; the update is rolled back and retried next cycle"
_HINT_CORRUPT = (
    "the stream was damaged in transit or at rest; the update is rolled back and retried next cycle "
    "(if it repeats, check the link, the disks and the memory of both hosts)"
)
_HINT_VERSION = "source and destination run incompatible coalesce versions; upgrade the older side"
_HINT_HOSTILE = "the source sent a hostile or corrupt stream; the update is rolled back"
_HINT_PRODUCER = "the source backend produced an invalid change stream (a bug); the update is rolled back"

# Field kinds.
_STR, _BYTES, _INT, _BOOL, _FLOAT = "str", "bytes", "int", "bool", "float"
_KINDS = {str: _STR, bytes: _BYTES, int: _INT, bool: _BOOL, float: _FLOAT}


class _Field(NamedTuple):
    name: str  # attribute name (getattr)
    arg: str  # __init__ keyword (attrs alias)
    kind: str
    optional: bool


class _Plan(NamedTuple):
    cls: type
    code: int
    fields: tuple[_Field, ...]


_PLANS_BY_CLASS: dict[type, _Plan] = {}
_PLANS_BY_CODE: dict[int, _Plan] = {}


def _make_plan(cls: type, code: int) -> _Plan:
    if not attrs.has(cls):
        raise TypeError(f"record type {cls.__name__} (code {code}) is not an attrs class")
    hints = typing.get_type_hints(cls)
    fields = []
    for f in attrs.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1 or len(typing.get_args(tp)) != 2:
                raise TypeError(f"{cls.__name__}.{f.name}: the codec carries only X or X | None, not {tp!r}")
            optional, tp = True, args[0]
        kind = _KINDS.get(tp)
        if kind is None:
            raise TypeError(
                f"{cls.__name__}.{f.name} has type {tp!r}; the codec carries str, bytes, int, bool, "
                "float and Optional of those"
            )
        fields.append(_Field(f.name, getattr(f, "alias", None) or f.name.lstrip("_"), kind, optional))
    return _Plan(cls, code, tuple(fields))


def _plan_for_class(cls: type) -> _Plan:
    plan = _PLANS_BY_CLASS.get(cls)
    if plan is None:
        for code, c in RECORD_TYPES.items():
            if c is cls:
                plan = _PLANS_BY_CLASS[cls] = _PLANS_BY_CODE[code] = _make_plan(cls, code)
                break
        else:
            raise StreamError(
                f"cannot encode a {cls.__name__}: it has no wire code in records.RECORD_TYPES",
                hint=_HINT_PRODUCER,
            )
    return plan


def _plan_for_code(code: int) -> _Plan | None:
    plan = _PLANS_BY_CODE.get(code)
    if plan is None:
        cls = RECORD_TYPES.get(code)
        if cls is None:
            return None
        plan = _PLANS_BY_CODE[code] = _PLANS_BY_CLASS[cls] = _make_plan(cls, code)
    return plan


# --------------------------------------------------------------------------- encode


class _NoDigest:
    def update(self, _data: Any) -> None:
        pass

    def digest(self) -> bytes:
        raise StreamError("this encoder keeps no digest: it cannot write a trailer")


class StreamEncoder:
    """Low-level frame writer: ``header()``, ``frame(record)`` per record, ``trailer()``.

    It numbers frames and keeps the running digest but does not check the
    Begin/End order contract; :func:`encode` does.  Chunks are bytes, or the
    caller's own bytes-like object for a large bytes field.
    """

    def __init__(self, digest: bool = True) -> None:
        self.seq = 0
        self.bytes_out = 0
        # digest=False: frames only (the spool, which is never read past its last whole frame)
        self._sha: Any = hashlib.sha256() if digest else _NoDigest()

    def header(self) -> bytes:
        head = MAGIC + bytes((FORMAT_VERSION,))
        self._sha.update(head)
        self.bytes_out += len(head)
        return head

    def frame(self, record: object) -> list[bytes]:
        """Return the frame of ``record`` as a list of chunks (large bytes fields are not copied)."""
        plan = _plan_for_class(type(record))
        parts: list[Any] = []
        size = 0
        for fld in plan.fields:
            value = getattr(record, fld.name)
            if fld.optional:
                if value is None:
                    parts.append(b"\x00")
                    size += 1
                    continue
                parts.append(b"\x01")
                size += 1
            kind = fld.kind
            if kind is _STR:
                raw = _encode_str(plan, fld, value)
                parts.append(_U32.pack(len(raw)))
                parts.append(raw)
                size += 4 + len(raw)
            elif kind is _BYTES:
                raw = _as_bytes(plan, fld, value)
                parts.append(_U32.pack(len(raw)))
                parts.append(raw)
                size += 4 + len(raw)
            elif kind is _INT:
                if not isinstance(value, int):
                    _bad_value(plan, fld, value, "an int")
                try:
                    parts.append(_I64.pack(value))
                except StructError:
                    _bad_value(plan, fld, value, "an int that fits in 64 signed bits")
                size += 8
            elif kind is _BOOL:
                if not isinstance(value, bool):
                    _bad_value(plan, fld, value, "a bool")
                parts.append(b"\x01" if value else b"\x00")
                size += 1
            else:  # float
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    _bad_value(plan, fld, value, "a float")
                parts.append(_F64.pack(value))
                size += 8
        length = 1 + 8 + size + 4
        if length > MAX_FRAME:
            raise StreamError(
                f"cannot encode {plan.cls.__name__} record {self.seq}: its frame would be {length} bytes, "
                f"more than the limit of {MAX_FRAME}",
                hint=_HINT_PRODUCER,
            )
        head = _HEAD.pack(length, plan.code, self.seq)
        self.seq += 1
        self.bytes_out += 4 + length
        if length < _BIG:
            # a small frame is one chunk: one crc32 call, one digest update
            body = b"".join([head, *parts])
            frame = body + _U32.pack(zlib.crc32(body))
            self._sha.update(frame)
            return [frame]
        # Join runs of small pieces; pass large bytes fields through as their own chunk.
        chunks: list[Any] = []
        small: list[Any] = [head]
        for p in parts:
            if len(p) >= _BIG:
                if small:
                    chunks.append(b"".join(small))
                    small = []
                chunks.append(p)
            else:
                small.append(p)
        crc = 0
        sha = self._sha.update
        if small:
            chunks.append(b"".join(small))
        for c in chunks:
            crc = zlib.crc32(c, crc)
            sha(c)
        crc_raw = _U32.pack(crc)
        sha(crc_raw)
        if len(chunks[-1]) < _BIG:
            chunks[-1] = chunks[-1] + crc_raw
        else:
            chunks.append(crc_raw)
        return chunks

    def trailer(self) -> bytes:
        tail = self._sha.digest() + END_MAGIC
        self.bytes_out += len(tail)
        return tail


def _bad_value(plan: _Plan, fld: _Field, value: object, want: str) -> typing.NoReturn:
    raise StreamError(
        f"cannot encode {plan.cls.__name__}.{fld.name}={value!r}: the codec needs {want}",
        hint=_HINT_PRODUCER,
    )


def _encode_str(plan: _Plan, fld: _Field, value: object) -> bytes:
    if not isinstance(value, str):
        _bad_value(plan, fld, value, "a str")
    if value.isascii():
        raw = value.encode("ascii")
    else:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            _bad_value(plan, fld, value, "a str whose surrogates came from os.fsdecode (surrogateescape)")
        if raw.decode("utf-8", "surrogateescape") != value:
            # e.g. "\udcc3\udca9" would arrive as "é": a different name.
            _bad_value(plan, fld, value, "a str that survives os.fsencode/os.fsdecode unchanged")
    if len(raw) > MAX_STR:
        _bad_value(plan, fld, value, f"a str of at most {MAX_STR} bytes")
    return raw


def _as_bytes(plan: _Plan, fld: _Field, value: object) -> Any:
    if isinstance(value, bytes):
        if len(value) > MAX_BYTES:
            _bad_value(plan, fld, f"<{len(value)} bytes>", f"at most {MAX_BYTES} bytes")
        return value
    if isinstance(value, (bytearray, memoryview)):
        mv = memoryview(value).cast("B")
        if len(mv) > MAX_BYTES:
            _bad_value(plan, fld, f"<{len(mv)} bytes>", f"at most {MAX_BYTES} bytes")
        return mv
    _bad_value(plan, fld, value, "bytes")


def encode(records: Iterable[Record]) -> Iterator[bytes]:
    """Serialise ``Begin, change*, End`` lazily into byte chunks (header, frames, trailer).

    A large ``bytes`` field (a Write's data) is yielded as its own chunk, the
    very object the record holds, so it is never copied here.

    Raises :class:`StreamError` subclasses if the records break the stream
    contract: CorruptStream when the first record is not Begin, on a second
    Begin, a wrong End count or a record after End; TruncatedStream when the
    records end without End (no trailer is written then); StreamError when a
    field cannot be carried (wrong type, int beyond 64 bits, oversize).
    """
    enc = StreamEncoder()
    yield enc.header()
    it = iter(records)
    changes = 0
    first = True
    for rec in it:
        if first:
            if type(rec) is not Begin:
                raise CorruptStream(
                    f"a change stream must start with Begin, the first record is {rec!r}", hint=_HINT_PRODUCER
                )
            first = False
        elif type(rec) is Begin:
            raise CorruptStream(f"a second Begin record (record {enc.seq}) inside one stream", hint=_HINT_PRODUCER)
        elif type(rec) is End:
            if rec.records != changes:
                raise CorruptStream(
                    f"End says {rec.records} change records, the stream carried {changes}", hint=_HINT_PRODUCER
                )
            yield from enc.frame(rec)
            for extra in it:
                raise CorruptStream(f"record {extra!r} comes after End", hint=_HINT_PRODUCER)
            yield enc.trailer()
            return
        else:
            changes += 1
        yield from enc.frame(rec)
    raise TruncatedStream(
        f"the records ended after {changes} change records without End"
        if not first
        else "there were no records at all (not even Begin)",
        hint=_HINT_TRUNCATED,
    )


# --------------------------------------------------------------------------- decode


class _FileReader:
    """Exact reads from a blocking binary file object (pipes and sockets may return short reads)."""

    def __init__(self, f: Any) -> None:
        self._read = f.read

    def read(self, n: int) -> Any:
        data = self._read(n)
        if data is None:
            raise StreamError(
                "the stream source is in non-blocking mode and had no data",
                hint="give decode() a blocking file object or an iterable of chunks",
            )
        if len(data) == n or not data:
            return data
        buf = bytearray(data)
        while len(buf) < n:
            more = self._read(n - len(buf))
            if more is None:
                raise StreamError(
                    "the stream source is in non-blocking mode and had no data",
                    hint="give decode() a blocking file object or an iterable of chunks",
                )
            if not more:
                break
            buf += more
        return buf

    def at_eof(self) -> bool:
        return not self._read(1)


class _ChunkReader:
    """Exact reads from an iterable of bytes-like chunks of any size (1 byte up)."""

    _EMPTY = memoryview(b"")

    def __init__(self, chunks: Iterable[Any]) -> None:
        self._next = iter(chunks).__next__
        self._mv = self._EMPTY
        self._pos = 0

    def _pull(self) -> memoryview | None:
        while True:
            try:
                chunk = self._next()
            except StopIteration:
                return None
            if not isinstance(chunk, bytes):
                # Copy mutable buffers: the producer may reuse them after we return.
                chunk = bytes(memoryview(chunk).cast("B"))
            if chunk:
                return memoryview(chunk)

    def read(self, n: int) -> Any:
        mv, pos = self._mv, self._pos
        end = pos + n
        if end <= len(mv):
            self._pos = end
            return mv[pos:end]
        buf = bytearray(mv[pos:])
        self._mv, self._pos = self._EMPTY, 0
        while len(buf) < n:
            nxt = self._pull()
            if nxt is None:
                break
            need = n - len(buf)
            if len(nxt) > need:
                buf += nxt[:need]
                self._mv, self._pos = nxt, need
            else:
                buf += nxt
        return buf

    def at_eof(self) -> bool:
        return self._pos >= len(self._mv) and self._pull() is None

    def whole_frame(self) -> memoryview | None:
        """The next frame (length field included) when the current chunk holds all of it
        and its length is within bounds, else None (nothing consumed; use :meth:`read`)."""
        mv, pos = self._mv, self._pos
        if pos >= len(mv):
            nxt = self._pull()
            if nxt is None:
                return None
            self._mv, self._pos = mv, pos = nxt, 0
        if pos + 4 > len(mv):
            return None
        (length,) = _U32.unpack_from(mv, pos)
        end = pos + 4 + length
        if end > len(mv) or length < _MIN_LENGTH or length > MAX_FRAME:
            return None
        self._pos = end
        return mv[pos:end]


def _reader_for(source: Any) -> _FileReader | _ChunkReader:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _ChunkReader((source,))
    if hasattr(source, "read"):
        return _FileReader(source)
    try:
        iter(source)
    except TypeError:
        raise TypeError(
            f"decode() needs a binary file object or an iterable of bytes chunks, not {type(source).__name__}"
        ) from None
    return _ChunkReader(source)


def decode(source: Any) -> Iterator[Record]:
    """Decode and verify a change stream lazily, yielding Begin, the changes, then End.

    ``source`` is a blocking binary file object (anything with ``.read``), a
    bytes-like object, or an iterable of bytes chunks with any boundaries.
    Raises TruncatedStream, CorruptStream or HostilePath (all StreamError).
    """
    return _decode(_reader_for(source))


def _decode(reader: _FileReader | _ChunkReader) -> Iterator[Record]:
    read = reader.read
    sha = hashlib.sha256()
    head = read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise TruncatedStream(
            "the change stream is empty"
            if not head
            else f"the change stream ended after {len(head)} bytes, inside its {HEADER_SIZE}-byte header",
            hint=_HINT_TRUNCATED,
        )
    if head[:8] != MAGIC:
        raise CorruptStream(
            f"not a coalesce change stream: byte offset 0 holds {bytes(head[:8])!r}, not the magic {MAGIC!r}",
            hint="the source sent something else (a banner, an error text?) or the stream is damaged; "
            "the update is rolled back",
        )
    if head[8] != FORMAT_VERSION:
        raise CorruptStream(
            f"change stream format version {head[8]} at byte offset 8; this coalesce reads version {FORMAT_VERSION}",
            hint=_HINT_VERSION,
        )
    sha.update(head)
    offset = HEADER_SIZE
    seq = 0
    changes = 0
    crc32 = zlib.crc32
    whole_frame = getattr(reader, "whole_frame", None)
    while True:
        frame_at = offset
        whole = whole_frame() if whole_frame is not None else None
        if whole is not None:
            # the frame lies in one chunk (every small frame the encoder makes): one crc32
            # call over it and one digest update
            length = len(whole) - 4
            offset += 4 + length
            mv = whole[4:]
            (want,) = _U32.unpack_from(whole, length)
            got = crc32(whole[:length])
            if got != want:
                raise _checksum_error(seq, frame_at, length, got, want)
            sha.update(whole)
        else:
            length, mv = _read_frame(read, seq, frame_at, changes, sha)
            offset += 4 + length
        code, fseq = _TYPESEQ.unpack_from(mv, 0)
        if fseq != seq:
            raise CorruptStream(
                f"frame {seq} at byte offset {frame_at} carries sequence number {fseq}; expected {seq} "
                "(a frame was lost, repeated or reordered)",
                hint=_HINT_CORRUPT,
            )
        plan = _plan_for_code(code)
        if plan is None:
            raise CorruptStream(
                f"frame {seq} at byte offset {frame_at} has unknown record type code {code}",
                hint=_HINT_VERSION,
            )
        record = _decode_record(plan, mv, length - 4, seq, frame_at)
        cls = plan.cls
        if seq == 0:
            if cls is not Begin:
                raise CorruptStream(
                    f"the change stream starts with a {cls.__name__} record (frame 0 at byte offset {frame_at}), "
                    "not Begin",
                    hint=_HINT_CORRUPT,
                )
        elif cls is Begin:
            raise CorruptStream(f"a second Begin record in frame {seq} at byte offset {frame_at}", hint=_HINT_CORRUPT)
        elif cls is End:
            assert isinstance(record, End)
            if record.records != changes:
                raise CorruptStream(
                    f"the End record (frame {seq} at byte offset {frame_at}) says {record.records} change "
                    f"records; the stream carried {changes}",
                    hint=_HINT_CORRUPT,
                )
            _check_trailer(reader, sha.digest(), changes, offset)
            yield record
            return
        else:
            changes += 1
        seq += 1
        yield record


def _checksum_error(seq: int, frame_at: int, length: int, got: int, want: int) -> CorruptStream:
    return CorruptStream(
        f"frame {seq} at byte offset {frame_at} ({4 + length} bytes) fails its checksum "
        f"(crc32 {got:#010x}, frame says {want:#010x})",
        hint=_HINT_CORRUPT,
    )


def _read_frame(read: Any, seq: int, frame_at: int, changes: int, sha: Any) -> tuple[int, memoryview]:
    """Read and check one frame through ``read`` (a frame split across chunks, or any frame of
    a file object): its length field and a memoryview of the bytes after it."""
    crc32 = zlib.crc32
    raw_len = read(4)
    if len(raw_len) < 4:
        if not raw_len:
            what = f"without its End record (frame {seq} at byte offset {frame_at} is missing)"
        else:
            what = f"inside the length field of frame {seq} at byte offset {frame_at} ({len(raw_len)} of 4 bytes)"
        raise TruncatedStream(f"the change stream ended after {changes} change records, {what}", hint=_HINT_TRUNCATED)
    (length,) = _U32.unpack(raw_len)
    if length < _MIN_LENGTH or length > MAX_FRAME:
        raise CorruptStream(
            f"frame {seq} at byte offset {frame_at} claims a length of {length} bytes; "
            f"a frame is {_MIN_LENGTH} to {MAX_FRAME} bytes",
            hint=_HINT_CORRUPT,
        )
    body = read(length)
    if len(body) < length:
        raise TruncatedStream(
            f"the change stream ended after {changes} change records, inside frame {seq} at byte offset "
            f"{frame_at} ({4 + len(body)} of its {4 + length} bytes arrived)",
            hint=_HINT_TRUNCATED,
        )
    mv = memoryview(body)
    (want,) = _U32.unpack_from(mv, length - 4)
    got = crc32(mv[: length - 4], crc32(raw_len))
    if got != want:
        raise _checksum_error(seq, frame_at, length, got, want)
    sha.update(raw_len)
    sha.update(mv)
    return length, mv


def _check_trailer(reader: _FileReader | _ChunkReader, digest: bytes, changes: int, offset: int) -> None:
    tail = reader.read(TRAILER_SIZE)
    if len(tail) < TRAILER_SIZE:
        raise TruncatedStream(
            f"the change stream ended after its End record ({changes} change records), inside the "
            f"{TRAILER_SIZE}-byte trailer at byte offset {offset} ({len(tail)} bytes arrived)",
            hint=_HINT_TRUNCATED,
        )
    if bytes(tail[:32]) != digest:
        raise CorruptStream(
            f"the trailer digest at byte offset {offset} does not match the sha256 of the stream "
            f"(computed {digest.hex()[:16]}..., trailer says {bytes(tail[:32]).hex()[:16]}...)",
            hint=_HINT_CORRUPT,
        )
    if bytes(tail[32:]) != END_MAGIC:
        raise CorruptStream(
            f"the trailer at byte offset {offset + 32} ends with {bytes(tail[32:])!r}, not {END_MAGIC!r}",
            hint=_HINT_CORRUPT,
        )
    if not reader.at_eof():
        raise CorruptStream(
            f"data follows the trailer at byte offset {offset + TRAILER_SIZE}; a stream ends with its trailer",
            hint=_HINT_CORRUPT,
        )


def _bad_field(plan: _Plan, seq: int, frame_at: int, fld: _Field, pos: int, what: str) -> typing.NoReturn:
    raise CorruptStream(
        f"frame {seq} at byte offset {frame_at} ({plan.cls.__name__}): field {fld.name!r} at byte offset "
        f"{frame_at + 4 + pos}: {what}",
        hint=_HINT_CORRUPT,
    )


def _decode_record(plan: _Plan, mv: memoryview, end: int, seq: int, frame_at: int) -> Record:
    pos = 9  # after type code and sequence number
    kwargs: dict[str, Any] = {}
    name = plan.cls.__name__

    for fld in plan.fields:
        if fld.optional:
            if pos >= end:
                _bad_field(plan, seq, frame_at, fld, pos, "the frame ends before its presence flag")
            flag = mv[pos]
            if flag == 0:
                kwargs[fld.arg] = None
                pos += 1
                continue
            if flag != 1:
                _bad_field(plan, seq, frame_at, fld, pos, f"presence flag is {flag}, not 0 or 1")
            pos += 1
        kind = fld.kind
        if kind is _STR or kind is _BYTES:
            if pos + 4 > end:
                _bad_field(plan, seq, frame_at, fld, pos, "the frame ends inside its length")
            (n,) = _U32.unpack_from(mv, pos)
            limit = MAX_STR if kind is _STR else MAX_BYTES
            if n > limit:
                _bad_field(plan, seq, frame_at, fld, pos, f"length {n} exceeds the limit of {limit} bytes")
            if pos + 4 + n > end:
                _bad_field(plan, seq, frame_at, fld, pos, f"length {n} runs past the end of the frame payload")
            pos += 4
            raw = mv[pos : pos + n]
            kwargs[fld.arg] = str(raw, "utf-8", "surrogateescape") if kind is _STR else bytes(raw)
            pos += n
        elif kind is _INT:
            if pos + 8 > end:
                _bad_field(plan, seq, frame_at, fld, pos, "the frame ends inside this 8-byte integer")
            kwargs[fld.arg] = _I64.unpack_from(mv, pos)[0]
            pos += 8
        elif kind is _BOOL:
            if pos >= end:
                _bad_field(plan, seq, frame_at, fld, pos, "the frame ends before this boolean")
            b = mv[pos]
            if b > 1:
                _bad_field(plan, seq, frame_at, fld, pos, f"boolean byte is {b}, not 0 or 1")
            kwargs[fld.arg] = bool(b)
            pos += 1
        else:
            if pos + 8 > end:
                _bad_field(plan, seq, frame_at, fld, pos, "the frame ends inside this 8-byte float")
            kwargs[fld.arg] = _F64.unpack_from(mv, pos)[0]
            pos += 8
    if pos != end:
        raise CorruptStream(
            f"frame {seq} at byte offset {frame_at} ({name}): {end - pos} bytes of garbage after the last "
            f"field, at byte offset {frame_at + 4 + pos}",
            hint=_HINT_CORRUPT,
        )
    try:
        return plan.cls(**kwargs)
    except StreamError as exc:
        located = f"frame {seq} at byte offset {frame_at} ({name}): {exc.message}"
        hint = exc.hint or (_HINT_HOSTILE if isinstance(exc, HostilePath) else _HINT_CORRUPT)
        try:
            new = type(exc)(located, hint=hint)
        except TypeError:
            new = CorruptStream(located, hint=hint)
        raise new from exc
    except Exception as exc:  # a validator said no: ValueError, TypeError, ...
        raise CorruptStream(
            f"frame {seq} at byte offset {frame_at} does not hold a valid {name} record: {exc}",
            hint=_HINT_CORRUPT,
        ) from exc


# --------------------------------------------------------------------------- conveniences


def write_stream(records: Iterable[Record], fileobj: Any) -> dict[str, int]:
    """Encode ``records`` into the binary file object ``fileobj``.

    Returns ``{"records": frames written (Begin and End included),
    "changes": change records (End's count), "bytes": bytes written}``.
    """
    counter = [0]

    def count(it: Iterable[Record]) -> Iterator[Record]:
        for r in it:
            counter[0] += 1
            yield r

    write = fileobj.write
    total = 0
    for chunk in encode(count(records)):
        n = write(chunk)
        if n is not None and n < len(chunk):  # raw files and sockets may write short
            view = memoryview(chunk)[n:]
            while view:
                n = write(view)
                if not n:
                    raise OSError(f"write() to {fileobj!r} wrote nothing")
                view = view[n:]
        total += len(chunk)
    return {"records": counter[0], "changes": counter[0] - 2, "bytes": total}


def read_stream(fileobj: Any) -> Iterator[Record]:
    """Decode and verify the change stream in ``fileobj`` (see :func:`decode`)."""
    return decode(fileobj)


def roundtrip(records: Iterable[Record]) -> Iterator[Record]:
    """``decode(encode(records))``, lazily: the local-transfer path, so every transfer exercises the codec."""
    return decode(encode(records))
