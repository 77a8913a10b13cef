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
"coalesce_mem"``): it holds only the two hooks a backend writes,
``coalesce_backend_info`` and ``coalesce_open_volume``; the primitives are the
methods of the handle :class:`~coalesce_mem.volume.MemVolume`, which the core's
default hooks call (coalesce_core.backend.handles).  The model lives in
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

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.urls import VolumeURL

from .volume import MAX_PCPIS, MemVolume
from .volume import forget as _forget
from .volume import open_volume as _open_volume

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


# ----------------------------------------------------------------- hooks
@hookimpl
def coalesce_backend_info() -> dict[str, str]:
    return {
        "scheme": SCHEME,
        "description": "in-memory volumes (mem://NAME), optionally kept in a file (mem:///ABS/PATH); "
        "the reference backend",
    }


@hookimpl
def coalesce_open_volume(url: VolumeURL, create: bool) -> MemVolume | None:
    if url.scheme != SCHEME:
        return None
    return _open_volume(SCHEME, url.location, create)
