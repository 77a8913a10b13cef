"""A test plugin that loses one change record of a diff, as a buggy translation would.

:class:`DropRecord` wraps ``coalesce_diff`` (like coalesce_core.backend.faults): while
armed, the first record of the source's stream that ``match`` accepts is left
out (End's count follows, so the stream stays well-formed and only its
meaning is wrong).  Used to show that the check before ``done`` catches a
replica that would differ from its source PCPI.
"""

from __future__ import annotations

from typing import Any, Callable

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.stream import records as R


class DropRecord:
    def __init__(self, match: Callable[[Any], bool], volume: str = "src", incremental_only: bool = True) -> None:
        self.match = match
        self.volume = volume
        self.incremental_only = incremental_only
        self.armed = False
        self.dropped: list[Any] = []

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield
        if (
            result is None
            or not self.armed
            or (self.incremental_only and base is None)
            or self.volume not in str(getattr(volume, "url", volume))
        ):
            return result
        return self._drop(result)

    def _drop(self, records):
        gone = 0
        for rec in records:
            if not gone and not isinstance(rec, (R.Begin, R.End)) and self.match(rec):
                self.dropped.append(rec)
                gone = 1
                continue
            if isinstance(rec, R.End):
                rec = R.End(records=rec.records - gone)
            yield rec


def of_type(kind: type, path: str | None = None) -> Callable[[Any], bool]:
    """A match for the first record of ``kind`` (naming ``path``, when given)."""
    return lambda rec: isinstance(rec, kind) and (path is None or path in R.paths_of(rec))
