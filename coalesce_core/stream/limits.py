"""Sizes and offsets the destination can honour.

Every backend declares the largest file it stores (``VolumeHandle.max_file_size``, read through
``Volume.max_file_size``; at most :data:`~coalesce_core.stream.records.MAX_FILE_SIZE`, 2^63 - 1,
which the record validators and so the codec enforce for every stream).  A ``Write`` that would
end past the destination's limit, or a ``Truncate`` beyond it, fails the update with
:class:`~coalesce_core.errors.FileTooLarge` naming the file, the size and the limit, before the
record reaches the spool or the applier (the update takes the rollback path).  The same error
serves a hostile source (a 2^62-byte hole) and a source file legitimately larger than the
destination's file system stores (a sparse file of 20 TiB on a source replicated to ext4).
"""

from __future__ import annotations

from typing import Any, Generator, Iterator

from coalesce_core.errors import FileTooLarge
from coalesce_core.stream.closing import ClosingFilter
from coalesce_core.stream.records import Truncate, Write


def human(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``16 TiB``, ``8 EiB``)."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{n} bytes"


def check_record(record: object, limit: int, destination: str) -> None:
    """Raise FileTooLarge if ``record`` would make its file larger than ``limit`` bytes."""
    t = type(record)
    if t is Write:
        size = record.offset + len(record.data)  # type: ignore[attr-defined]
        what = f"a Write of {len(record.data)} bytes at offset {record.offset}"  # type: ignore[attr-defined]
    elif t is Truncate:
        size = record.size  # type: ignore[attr-defined]
        what = "a Truncate"
    else:
        return
    if size > limit:
        path: str = record.path  # type: ignore[attr-defined]
        raise FileTooLarge(
            f"file {path!r} would be {size} bytes ({human(size)}; {what}); {destination} stores files of "
            f"at most {limit} bytes ({human(limit)})",
            hint=(
                "nothing past the limit was written and the update is rolled back; if the source really holds "
                "a file that large, replicate the qtree to a destination whose file system stores larger files "
                "(btrfs, ZFS and XFS store 8 EiB, ext4 16 TiB with 4 KiB blocks) or keep the file out of it; "
                "if it does not, the source is corrupt or hostile"
            ),
        )


class within_limits(ClosingFilter):
    """``records`` unchanged, raising FileTooLarge (:func:`check_record`) at the first record past
    ``limit``; ``close()`` closes the wrapped stream too."""

    def __init__(self, records: Any, limit: int, destination: str) -> None:
        self.limit, self.destination = limit, destination
        super().__init__(records)

    def _filter(self, it: Iterator[Any]) -> Generator[Any, None, None]:
        limit, destination = self.limit, self.destination
        for rec in it:
            t = type(rec)
            if t is Write or t is Truncate:
                check_record(rec, limit, destination)
            yield rec
