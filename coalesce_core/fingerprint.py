"""The canonical content digest of a qtree, shared by every backend.

Two trees have the same fingerprint iff they have the same names, entry types,
permission bits (mode & 0o7777), file sizes and bytes, and symlink targets.
Owners, times, xattrs and hard-link identity are not part of it (docs/decisions.md):
they differ legitimately between file systems that store the same image.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import attrs

EMPTY = hashlib.sha256(b"coalesce-fingerprint-v1\n").hexdigest()


@attrs.frozen
class Entry:
    """One entry below the qtree root: kind is "d", "f" or "l"."""

    path: str
    kind: str = attrs.field(validator=attrs.validators.in_(("d", "f", "l")))
    mode: int = 0
    size: int = 0
    content_sha256: str = ""
    target: str = ""

    def line(self) -> bytes:
        fields = (self.kind, self.path, oct(self.mode & 0o7777), str(self.size), self.content_sha256, self.target)
        return "\0".join(fields).encode("utf-8", "surrogateescape") + b"\n"


def file_entry(path: str, mode: int, data: bytes) -> Entry:
    return Entry(path=path, kind="f", mode=mode, size=len(data), content_sha256=hashlib.sha256(data).hexdigest())


def digest(entries: Iterable[Entry]) -> str:
    """Digest of a tree given its entries in any order (sorted here by path)."""
    h = hashlib.sha256(b"coalesce-fingerprint-v1\n")
    for e in sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape")):
        h.update(e.line())
    return h.hexdigest()
