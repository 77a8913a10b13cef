"""Reading the coalesced images the destination keeps: a replica's entries in one, what changed
between two, and a copy of one out to a directory (docs/cli.md: `ls`, `diff`, `restore`).

Everything goes through the backend's hooks (coalesce_core.backend.volume.Volume): the entries
through ``coalesce_describe_tree``, the changes and the copy through ``coalesce_diff`` (a baseline
of the image for the copy, written by the POSIX applier). Reads only: no PCPI, replica or ledger
is changed.
"""

from __future__ import annotations

from typing import Any, Iterator

from coalesce_core.backend.volume import Volume
from coalesce_core.errors import NotFound
from coalesce_core.stream import records as R


def _under(path: str, top: str) -> bool:
    return not top or path == top or path.startswith(top + "/")


def entries(dest: Volume, qtree: str, pcpi: str, top: str = "") -> Iterator[Any]:
    """The Descriptions (coalesce_core.verify) of ``qtree`` in PCPI ``pcpi`` at and below ``top``
    ("" the qtree root), in path order; NotFound when ``top`` is not in the image."""
    top = R.check_path_or_root(top.strip("/"), what="path")
    found = False
    for d in dest.describe_tree(qtree, pcpi):
        if d.kind == "absent":
            continue
        if _under(d.path, top):
            found = True
            yield d
        elif found:
            break  # pre-order in path order: the subtree is one run of entries
    if not found:
        raise NotFound(
            f"{top or 'the root'} is not in replica {qtree!r} of {pcpi}",
            hint=f"`coalesce ls {qtree}@GEN` lists what the image holds",
        )


def entry_data(d: Any) -> dict[str, Any]:
    """One entry in `ls --json`."""
    return {
        "path": d.path,
        "kind": d.kind,
        "mode": d.mode,
        "size": d.size if d.kind == "f" else None,
        "mtime_ns": d.mtime_ns,
        "target": d.target if d.kind == "l" else None,
    }


def changed(dest: Volume, qtree: str, old: str, new: str) -> list[Any]:
    """The paths of ``qtree`` that differ between PCPIs ``old`` and ``new``, from the backend's own
    diff (coalesce_core.stream.changes.Change, in path order)."""
    from coalesce_core.stream.changes import changes

    stream = dest.diff(qtree, old, new)
    try:
        return changes(stream)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
