"""The ``mem`` backend: a complete in-memory volume, and the template for backend writers.

URL forms:

* ``mem://NAME`` -- a volume in a process-wide registry: an abandoned agent
  and a new one in the same process see the same volume (as disks survive a
  crash).  Gone when the process ends.
* ``mem:///ABS/PATH`` -- the same, and written to the file PATH after every
  mutating primitive (temp file, fsync, ``os.replace``), so separate
  processes and a process restarted after SIGKILL see it.  The group's
  metadata goes to ``PATH.coalesce/``.

This module is the entry point (``coalesce.backends``: ``mem =
"coalesce_mem"``): it holds only the ``@hookimpl`` functions, each a thin
guard (``_mine``: "is this my volume?" -- else return None so another backend
answers) around :class:`~coalesce_mem.volume.MemVolume`.  The model lives in
``tree.py``, the diff in ``diffing.py``, apply in ``applying.py``, the file
format in ``persist.py``, the descriptions for verification in ``describing.py``.  See docs/writing-a-backend.md.

Plain API for writing source data (tests, demo)::

    import coalesce_mem
    vol = coalesce_mem.volume_for("mem://src")         # creates it if missing
    vol.write_file("q1/dir/a.txt", b"hello", mode=0o644)
    vol.mkdir("q1/d", parents=True); vol.symlink("q1/l", "dir/a.txt")
    vol.link("q1/dir/a.txt", "q1/hard"); vol.rename("q1/hard", "q1/hard2")
    vol.unlink("q1/l"); vol.rmdir("q1/d"); vol.read_file("q1/dir/a.txt")
    vol.listing("q1"); vol.snapshot_create("s1"); vol.read_file("q1/dir/a.txt", snapshot="s1")
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from coalesce_core.hookspecs import hookimpl
from coalesce_core.volume import VolumeURL

from .volume import MAX_PCPIS, MemVolume, forget as _forget, open_volume as _open_volume

SCHEME = "mem"

__all__ = ["SCHEME", "MAX_PCPIS", "MemVolume", "volume_for", "forget"]


def volume_for(url: str, *, create: bool = True) -> MemVolume:
    """The :class:`MemVolume` of a ``mem://`` URL (created if missing unless ``create=False``),
    for writing and reading source data without the plugin manager."""
    parsed = VolumeURL.parse(url)
    if parsed.scheme != SCHEME:
        raise ValueError(f"{url!r} is not a mem:// URL")
    return _open_volume(SCHEME, parsed.location, create)


def forget(url: str | None = None) -> None:
    """Drop one ``mem://`` volume (or all of them) from the process registry.
    Files of ``mem:///PATH`` volumes stay; the next open reads them again."""
    _forget(SCHEME, None if url is None else VolumeURL.parse(url).location)


def _mine(volume: Any) -> bool:
    return isinstance(volume, MemVolume) and volume.scheme == SCHEME


# ----------------------------------------------------------------- hooks
@hookimpl
def coalesce_backend_info() -> dict[str, str]:
    return {"scheme": SCHEME,
            "description": "in-memory volumes (mem://NAME), optionally kept in a file (mem:///ABS/PATH); "
                           "the reference backend"}


@hookimpl
def coalesce_open_volume(url: VolumeURL, create: bool) -> MemVolume | None:
    if url.scheme != SCHEME:
        return None
    return _open_volume(SCHEME, url.location, create)


@hookimpl
def coalesce_close_volume(volume: Any) -> bool | None:
    if not _mine(volume):
        return None
    return True  # the registry keeps the volume (its "disks") for the next open


@hookimpl
def coalesce_metadata_dir(volume: Any) -> str | None:
    return volume.metadata_dir() if _mine(volume) else None


@hookimpl
def coalesce_snapshot_create(volume: Any, name: str) -> str | None:
    return volume.snapshot_create(name) if _mine(volume) else None


@hookimpl
def coalesce_snapshot_delete(volume: Any, name: str) -> bool | None:
    return volume.snapshot_delete(name) if _mine(volume) else None


@hookimpl
def coalesce_snapshot_list(volume: Any) -> list[str] | None:
    return volume.snapshot_list() if _mine(volume) else None


@hookimpl
def coalesce_qtree_list(volume: Any, snapshot: str | None) -> list[str] | None:
    return volume.qtree_list(snapshot) if _mine(volume) else None


@hookimpl
def coalesce_diff(volume: Any, qtree: str, base: str | None, target: str) -> Iterator[Any] | None:
    return volume.diff(qtree, base, target) if _mine(volume) else None


@hookimpl
def coalesce_apply(volume: Any, qtree: str, records: Iterable[Any], use_purgatory: bool) -> dict[str, int] | None:
    return volume.apply(qtree, records, use_purgatory) if _mine(volume) else None


@hookimpl
def coalesce_purge_purgatory(volume: Any, qtrees: list[str]) -> bool | None:
    return volume.purge_purgatory(list(qtrees)) if _mine(volume) else None


@hookimpl
def coalesce_remove_qtree(volume: Any, qtree: str) -> bool | None:
    return volume.remove_qtree(qtree) if _mine(volume) else None


@hookimpl
def coalesce_export(volume: Any, mapping: Mapping[str, str | None]) -> bool | None:
    return volume.export(dict(mapping)) if _mine(volume) else None


@hookimpl
def coalesce_exported(volume: Any) -> dict[str, str | None] | None:
    return volume.exported() if _mine(volume) else None


@hookimpl
def coalesce_export_path(volume: Any, replica: str) -> str | None:
    return None  # mem images have no file-system path


@hookimpl
def coalesce_fingerprint(volume: Any, qtree: str, snapshot: str | None) -> str | None:
    return volume.fingerprint(qtree, snapshot) if _mine(volume) else None


@hookimpl
def coalesce_describe(volume: Any, qtree: str, snapshot: str | None, paths: Any) -> list | None:
    return volume.describe(qtree, snapshot, paths) if _mine(volume) else None


@hookimpl
def coalesce_describe_tree(volume: Any, qtree: str, snapshot: str | None, content: bool) -> Iterator[Any] | None:
    if not _mine(volume):
        return None
    from coalesce_core.verify import generic_tree

    return generic_tree(lambda batch: volume.describe(qtree, snapshot, batch), content)


@hookimpl
def coalesce_describe_holds(volume: Any) -> Any:
    from .describing import HOLDS

    return HOLDS if _mine(volume) else None
