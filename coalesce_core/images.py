"""Reading the coalesced images the destination keeps: a replica's entries in one, what changed
between two, and a copy of one out to a directory (docs/cli.md: `ls`, `diff`, `restore`).

Everything goes through the backend's hooks (coalesce_core.backend.volume.Volume): the entries
through ``coalesce_describe_tree``, the changes and the copy through ``coalesce_diff`` (a baseline
of the image for the copy, written by the POSIX applier). Reads only: no PCPI, replica or ledger
is changed.
"""

from __future__ import annotations

from typing import Any, Generator, Iterator

import attrs

from coalesce_core.backend.volume import Volume
from coalesce_core.errors import NotFound, RestoreRefused
from coalesce_core.stream import records as R


def _under(path: str, top: str) -> bool:
    return not top or path == top or path.startswith(top + "/")


def entries(dest: Volume, qtree: str, pcpi: str, top: str = "") -> Generator[Any, None, None]:
    """The Descriptions (coalesce_core.verify) of ``qtree`` in PCPI ``pcpi`` at and below ``top``
    ("" the qtree root), in path order; NotFound when ``top`` is not in the image."""
    top = R.check_path_or_root(top.strip("/"), what="path")
    found = False
    walk = dest.describe_tree(qtree, pcpi)
    try:
        for d in walk:
            if d.kind == "absent":
                continue
            if _under(d.path, top):
                found = True
                yield d
            elif found:
                break  # pre-order in path order: the subtree is one run of entries
    finally:
        _close(walk)
    if not found:
        raise NotFound(
            f"{top or 'the root'} is not in replica {qtree!r} of {pcpi}",
            hint=f"`coalesce ls {qtree}@GEN` lists what the image holds",
        )


def _close(it: object) -> None:
    """End a walk or a diff before its end: the backend's image closes with it."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


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
        _close(stream)


@attrs.frozen
class Restored:
    """What :func:`restore` wrote: ``records`` applied, ``bytes`` of file data, and the hard links
    below PATH whose other name lies outside it (not restored: their data are outside PATH)."""

    records: int
    bytes: int
    skipped_links: tuple[str, ...] = ()


def _path_of(rec: object) -> str | None:
    return getattr(rec, "path", None)


def _keep(rec: object, top: str) -> bool:
    """Whether a baseline record belongs to the copy of ``top``: it names ``top``, a path below it,
    or a directory above it (made so that ``top`` sits at its own path in the copy)."""
    path = _path_of(rec)
    if path is None or _under(path, top):
        return True
    return top.startswith(path + "/") or path == R.ROOT


def _selected(stream: Iterator[Any], top: str, owners: bool, skipped: list[str]) -> Iterator[Any]:
    for rec in R.changes_only(stream):
        if not _keep(rec, top):
            continue
        if isinstance(rec, R.HardLink) and not _under(rec.existing, top):
            skipped.append(rec.path)
            continue
        if not owners and isinstance(rec, R.SetAttr) and (rec.uid is not None or rec.gid is not None):
            rec = attrs.evolve(rec, uid=None, gid=None)
        yield rec


def restore(dest: Volume, qtree: str, pcpi: str, to: str, top: str = "") -> Restored:
    """Copy ``qtree`` as PCPI ``pcpi`` holds it (only ``top`` and what is below it, at its own path,
    when given) into the empty or missing directory ``to``, from a baseline diff of the image
    written by the POSIX applier. Owners are kept only when this process may set them (root); the
    destination volume is only read. RestoreRefused for a ``to`` that is not an empty directory,
    NotFound for a ``top`` the image does not hold."""
    import os

    from coalesce_posix.apply import Applier

    top = R.check_path_or_root(top.strip("/"), what="path")
    target = os.path.abspath(to)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.path.islink(target) or os.listdir(target)):
        raise RestoreRefused(
            f"{to} is not an empty directory: restore writes only into an empty or new directory",
            hint="name a new directory with --to (restore never overwrites files)",
        )
    if top:
        first = entries(dest, qtree, pcpi, top)
        next(first)  # NotFound before anything is written
        first.close()
    os.makedirs(target, exist_ok=True)
    skipped: list[str] = []
    stream = dest.diff(qtree, None, pcpi)
    try:
        parent, name = os.path.split(target)
        got = Applier(parent, name, None).apply(_selected(stream, top, os.geteuid() == 0, skipped))
    finally:
        _close(stream)
    return Restored(records=got["records"], bytes=got["bytes"], skipped_links=tuple(skipped))
