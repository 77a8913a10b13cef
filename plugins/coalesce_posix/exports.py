"""Exports: every replica's stable path, switched for all replicas in ONE rename.

Layout under an export root ``R``::

    R/exports            -> exports.<gen>     (a symlink: the one thing that switches)
    R/exports.<gen>/<replica> -> <image of the replica>   (one symlink per replica)

A replica's stable export path is ``R/exports/<replica>``.  A switch builds
``exports.<gen+1>/`` aside (its symlinks, fsynced), then points a fresh
symlink at it and ``rename``s that over ``R/exports``: rename(2) replaces the
symlink atomically, so a reader resolving any replica's path sees either the
whole old table or the whole new one.  A reader that already opened a file
holds the inode of the old image and keeps reading it.  Old generations are
removed afterwards (only the symlink directories; images are PCPIs and are
released by the agent).

The table is read back from the file system (``read``): each replica symlink's
target is mapped back to a PCPI name (or ACTIVE) by the backend's ``parse``.

Exports are reachable by root only: ``R`` and every directory through which the images are
reached (:func:`make_private`, the backend's ``private_dirs``) are mode 0700, so that no local
user runs what a source planted (docs/operations.md, "Publishing exports").
"""

from __future__ import annotations

import logging
import os
import re
import stat
from typing import Callable, Iterable, Mapping

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import check_path

from .apply import rmtree

_GEN = re.compile(r"^exports\.(\d+)$")

log = logging.getLogger("coalesce.posix")

#: the mode of the directories through which a destination's images are reached
PRIVATE_MODE = 0o700


def make_private(dirs: Iterable[str]) -> list[str]:
    """Create each of ``dirs`` (and missing parents) mode 0700, or narrow an existing one that
    its group or others may enter to 0700 (a warning in the log); returns the ones narrowed."""
    narrowed = []
    for d in dirs:
        os.makedirs(d, PRIVATE_MODE, exist_ok=True)
        mode = stat.S_IMODE(os.stat(d).st_mode)
        if mode & 0o077:
            os.chmod(d, PRIVATE_MODE)
            narrowed.append(d)
            log.warning(
                "%s was mode %s, now 0o700: exports are reachable by root only "
                '(publish them with a nosuid,nodev bind mount, docs/operations.md "Publishing exports")',
                d,
                oct(mode),
            )
    return narrowed


class ExportTable:
    def __init__(
        self, root: str, image_path: Callable[[str, str], str], parse: Callable[[str, str], str | None]
    ) -> None:
        """``image_path(replica, pcpi_or_ACTIVE)`` -> absolute path of the image;
        ``parse(replica, link_target)`` -> the PCPI name (or ACTIVE) it shows."""
        self.root = root
        self.image_path = image_path
        self.parse = parse

    @property
    def link(self) -> str:
        return os.path.join(self.root, "exports")

    def path(self, replica: str) -> str:
        return os.path.join(self.link, replica)

    def _current_gen(self) -> int | None:
        try:
            m = _GEN.match(os.readlink(self.link))
        except (FileNotFoundError, OSError):
            return None
        return int(m.group(1)) if m else None

    def read(self) -> dict[str, str | None]:
        gen = self._current_gen()
        if gen is None:
            return {}
        d = os.path.join(self.root, f"exports.{gen}")
        out: dict[str, str | None] = {}
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return {}
        for name in names:
            p = os.path.join(d, name)
            if os.path.islink(p):
                out[name] = self.parse(name, os.readlink(p))
        return out

    def switch(self, mapping: Mapping[str, str | None]) -> bool:
        wanted = {r: v for r, v in mapping.items() if v is not None}
        for r in wanted:
            check_path(r, what="replica name")
            if "/" in r:
                raise BackendError(f"replica name {r!r} must be one path component")
        make_private([self.root])
        if self.read() == wanted and self._current_gen() is not None:
            self._gc(self._current_gen())
            return True
        gens = [int(m.group(1)) for n in os.listdir(self.root) if (m := _GEN.match(n))]
        gen = max(gens + [self._current_gen() or 0]) + 1
        new_dir = os.path.join(self.root, f"exports.{gen}")
        rmtree(new_dir)
        tmp_dir = new_dir + ".tmp"
        rmtree(tmp_dir)
        os.mkdir(tmp_dir, 0o755)  # inside the private root
        for replica, pcpi in sorted(wanted.items()):
            os.symlink(self.image_path(replica, pcpi), os.path.join(tmp_dir, replica))
        _fsync_dir(tmp_dir)
        os.rename(tmp_dir, new_dir)
        tmp_link = os.path.join(self.root, f".exports.{gen}.link")
        try:
            os.unlink(tmp_link)
        except FileNotFoundError:
            pass
        os.symlink(f"exports.{gen}", tmp_link)
        os.rename(tmp_link, self.link)  # THE atomic switch of the whole table
        _fsync_dir(self.root)
        self._gc(gen)
        return True

    def _gc(self, keep: int | None) -> None:
        for n in os.listdir(self.root):
            m = _GEN.match(n)
            if (
                (m and int(m.group(1)) != keep)
                or n.endswith(".tmp")
                or (n.startswith(".exports.") and n.endswith(".link"))
            ):
                rmtree(os.path.join(self.root, n))

    def remove(self) -> None:
        rmtree(self.root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_under(prefix: str, replica: str, target: str, live: str) -> str | None:
    """Helper for backends: ``<prefix>/<pcpi>/<replica>`` -> pcpi, ``live`` -> ACTIVE."""
    if target == live:
        return ACTIVE
    pre = prefix.rstrip("/") + "/"
    if target.startswith(pre):
        rest = target[len(pre) :]
        pcpi, _, rep = rest.partition("/")
        if rep == replica:
            return pcpi
    return None
