"""The canonical content digest of a qtree, shared by every backend.

Two trees have the same fingerprint iff they have the same names, entry types,
permission bits (mode & 0o7777), file sizes and bytes, and symlink targets.
Owners, times, xattrs and hard-link identity are not part of it (docs/decisions.md):
they differ legitimately between file systems that store the same image.

A file's bytes enter as its *content digest* (:func:`content_digest_of` and
friends): the file is cut into blocks of :data:`BLOCK` bytes and only the
blocks that hold a non-zero byte are hashed, with their index.  Holes read as
zeros, so the digest depends on the bytes only, never on where a file system
keeps holes or preallocated extents, and a backend that knows its holes
(SEEK_DATA/SEEK_HOLE, a block map) computes it at the cost of the data: a
1 TiB sparse file with a few islands costs its islands (docs/decisions.md).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import attrs

#: Version of the fingerprint (and content digest) format; a digest of another version never matches.
VERSION = "coalesce-fingerprint-v2"
EMPTY = hashlib.sha256(f"{VERSION}\n".encode()).hexdigest()

#: Block size of the content digest (a multiple of every file system's block size).
BLOCK = 64 << 10
_CONTENT_TAG = b"coalesce-content-v2\n"
_ZEROS = bytes(BLOCK)
_PART_TAG = b"coalesce-part-v1\n"


class ContentDigest:
    """The content digest of a file of ``size`` bytes, fed its data piece by piece.

    :meth:`update` takes ``(offset, data)`` pieces in increasing offset order,
    without overlap, at any alignment; whatever is not fed reads as zeros, and
    bytes past ``size`` are ignored.  Feeding a hole as zeros gives the same
    digest as leaving it out.  The digest is SHA-256 of a tag, the size
    (8 bytes, big-endian), then for every block holding a non-zero byte, in
    order, its index (8 bytes) and its bytes (:data:`BLOCK`, the last block
    only up to ``size``)."""

    __slots__ = ("size", "_h", "_block", "_buf", "_fed")

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"a file size is a non-negative int, not {size!r}")
        self.size = size
        self._h = hashlib.sha256(_CONTENT_TAG + size.to_bytes(8, "big"))
        self._block = -1  # index of the block being gathered in _buf
        self._buf = bytearray()
        self._fed = 0  # end of the last piece

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < self._fed:
            raise ValueError(f"content pieces must come in increasing offset order ({offset} < {self._fed})")
        stop = min(offset + len(data), self.size)
        if stop <= offset:
            return
        self._fed = stop
        view = memoryview(data).cast("B")
        pos = offset
        while pos < stop:
            b, inner = divmod(pos, BLOCK)
            end = min((b + 1) * BLOCK, stop)
            piece = view[pos - offset : end - offset]
            if b != self._block:
                self._flush()
                self._block = b
            if inner == 0 and end - pos == self._length(b):
                self._emit(b, bytes(piece))  # a whole block in one piece: no gathering
                self._block = -1
            else:
                if len(self._buf) < inner:  # a hole inside the block reads as zeros
                    self._buf += bytes(inner - len(self._buf))
                self._buf += piece
            pos = end

    def _length(self, b: int) -> int:
        return min(BLOCK, self.size - b * BLOCK)

    def _emit(self, b: int, block: bytes) -> None:
        if block != _ZEROS[: len(block)]:
            self._h.update(b.to_bytes(8, "big"))
            self._h.update(block)

    def _flush(self) -> None:
        if self._block >= 0:
            n = self._length(self._block)
            if len(self._buf) < n:
                self._buf += bytes(n - len(self._buf))
            self._emit(self._block, bytes(self._buf))
        self._block = -1
        self._buf = bytearray()

    def hexdigest(self) -> str:
        self._flush()
        return self._h.hexdigest()


def content_digest_of(data: bytes | bytearray | memoryview, size: int | None = None) -> str:
    """Content digest of a file holding ``data`` (``size``: a larger size, the rest a hole)."""
    d = ContentDigest(len(data) if size is None else size)
    d.update(0, data)
    return d.hexdigest()


def part_digest(size: int, ranges: Sequence[tuple[int, int]], content: ContentDigest | str) -> str:
    """The *part digest* of a file of ``size`` bytes over ``ranges`` (sorted, disjoint
    ``(start, end)`` byte ranges, as asked; the check before ``done`` asks them aligned to
    :data:`BLOCK`): SHA-256 of a tag, the ranges (8 + 8 bytes each) and the content digest of
    the file as if it held only the bytes of those ranges, zeros elsewhere (``content``: the
    :class:`ContentDigest` fed those pieces, or its hexdigest).  Two files of the same size
    have the same part digest iff their bytes in the ranges are the same.  Not a content
    digest: it never leaves the verification of one update (docs/verification.md)."""
    h = hashlib.sha256(_PART_TAG)
    for start, end in ranges:
        h.update(start.to_bytes(8, "big") + end.to_bytes(8, "big"))
    h.update((content if isinstance(content, str) else content.hexdigest()).encode("ascii"))
    return h.hexdigest()


def part_digest_of(data: bytes | bytearray | memoryview, ranges: Sequence[tuple[int, int]]) -> str:
    """:func:`part_digest` of a file holding ``data`` (reads only the ranges of it)."""
    d = ContentDigest(len(data))
    view = memoryview(data)
    for start, end in ranges:
        if start < len(data):
            d.update(start, view[start:end])
    return part_digest(len(data), ranges, d)


def part_digest_of_pieces(
    size: int, ranges: Sequence[tuple[int, int]], pieces: Iterable[tuple[int, bytes | bytearray | memoryview]]
) -> str:
    """:func:`part_digest` of a file of ``size`` bytes whose data inside ``ranges`` are the
    ``(offset, bytes)`` pieces, in increasing offset order, none outside the ranges (holes left out)."""
    d = ContentDigest(size)
    for offset, data in pieces:
        d.update(offset, data)
    return part_digest(size, ranges, d)


def content_digest_of_pieces(size: int, pieces: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> str:
    """Content digest of a file of ``size`` bytes whose data are ``(offset, bytes)`` pieces in
    increasing offset order (a block map's non-hole blocks); everything else reads as zeros."""
    d = ContentDigest(size)
    for offset, data in pieces:
        d.update(offset, data)
    return d.hexdigest()


@attrs.frozen
class Entry:
    """One entry below the qtree root: kind is "d", "f" or "l".

    ``content_sha256`` is a regular file's content digest (:class:`ContentDigest`)."""

    path: str
    kind: str = attrs.field(validator=attrs.validators.in_(("d", "f", "l")))
    mode: int = 0
    size: int = 0
    content_sha256: str = ""
    target: str = ""

    def line(self) -> bytes:
        fields = (self.kind, self.path, oct(self.mode & 0o7777), str(self.size), self.content_sha256, self.target)
        return "\0".join(fields).encode("utf-8", "surrogateescape") + b"\n"


def file_entry(path: str, mode: int, data: bytes | bytearray, size: int | None = None) -> Entry:
    """The entry of a regular file holding ``data`` (``size``: a larger size, the rest a hole)."""
    n = len(data) if size is None else size
    return Entry(path=path, kind="f", mode=mode, size=n, content_sha256=content_digest_of(data, n))


def sparse_file_entry(
    path: str, mode: int, size: int, pieces: Iterable[tuple[int, bytes | bytearray | memoryview]]
) -> Entry:
    """The entry of a regular file of ``size`` bytes given its data pieces (:func:`content_digest_of_pieces`)."""
    return Entry(path=path, kind="f", mode=mode, size=size, content_sha256=content_digest_of_pieces(size, pieces))


def digest(entries: Iterable[Entry]) -> str:
    """Digest of a tree given its entries in any order (sorted here by path)."""
    h = hashlib.sha256(f"{VERSION}\n".encode())
    for e in sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape")):
        h.update(e.line())
    return h.hexdigest()
