"""A change stream read as the paths it changes (`coalesce diff`, docs/cli.md).

Each path a record names gets one kind: ``added`` (not in the old image), ``deleted`` (not in the
new one), ``replaced`` (removed and made again: another kind of entry, or a new file),
``modified`` (contents, size or attributes). A rename counts as its old path deleted and its new
path added (what lies below a renamed directory is not listed); an entry made and removed again
within the stream is not listed. Pure: records in, changes out.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from coalesce_core.stream import records as R
from coalesce_core.verify import path_key

ADDED = "added"
DELETED = "deleted"
REPLACED = "replaced"
MODIFIED = "modified"
KINDS = (ADDED, DELETED, REPLACED, MODIFIED)

_MAKE = (R.MkDir, R.MkFile, R.Symlink, R.HardLink)
_REMOVE = (R.Unlink, R.RmDir)
_CHANGE = (R.Write, R.Truncate, R.SetAttr, R.SetXattr)


@attrs.frozen
class Change:
    """Path ``path`` ("" the qtree root) changed as ``kind`` (one of :data:`KINDS`)."""

    path: str
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))


def _made(kind: str | None) -> str:
    """The kind of a path made again after ``kind`` (None: the stream has not named it)."""
    if kind is None:
        return ADDED
    return ADDED if kind == ADDED else REPLACED


def changes(records: Iterable[object]) -> list[Change]:
    """The paths ``records`` (a change stream, Begin and End included or not) change, in path
    order (coalesce_core.verify.path_key), each once with its kind (the module's docstring)."""
    kinds: dict[str, str] = {}
    for rec in records:
        if isinstance(rec, R.Rename):
            _remove(kinds, rec.old)
            kinds[rec.new] = _made(kinds.get(rec.new))
        elif isinstance(rec, _MAKE):
            kinds[rec.path] = _made(kinds.get(rec.path))
        elif isinstance(rec, _REMOVE):
            _remove(kinds, rec.path)
        elif isinstance(rec, _CHANGE):
            kinds.setdefault(rec.path, MODIFIED)
    return [Change(p, kinds[p]) for p in sorted(kinds, key=path_key)]


def _remove(kinds: dict[str, str], path: str) -> None:
    if kinds.get(path) == ADDED:
        del kinds[path]  # made in this stream: the old image never had it
    else:
        kinds[path] = DELETED
