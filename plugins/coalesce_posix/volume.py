"""What btrfs and ZFS volumes have in common once mounted: a directory tree.

:class:`PosixVolume` is the base of both backends' handles; :func:`posix_hooks`
builds the hook implementations that only need that tree (apply, purgatory,
qtree removal, qtree list, fingerprint, describe, exports), each answering only for
handles of the given class (firstresult: None for anybody else's volume).

Reserved names: entries of the volume root whose name starts with
``.coalesce`` are never qtrees (the purgatory lives there).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import check_path

from . import describe, durable, fslimits, walk
from .apply import Applier, rmtree
from .exports import ExportTable, make_private, parse_under

RESERVED_PREFIX = ".coalesce"
PURGATORY = ".coalesce-purgatory"


def check_qtree(qtree: str) -> str:
    check_path(qtree, what="qtree")
    if "/" in qtree or qtree.startswith(RESERVED_PREFIX):
        raise BackendError(
            f"{qtree!r} is not a qtree name",
            hint=f"a qtree is one top-level directory name, not starting with {RESERVED_PREFIX!r}",
        )
    return qtree


class PosixVolume(VolumeHandle):
    """A volume whose active file system is the directory ``root``."""

    scheme = "posix"
    describes_ranges = True
    metadir: str | None = None  # set by the backend: the ledger's directory kept with the volume
    _max_file_size: int | None = None

    def __init__(self, url: Any, root: str, export_root: str) -> None:
        self.url = url
        self.root = root
        self.export_root = export_root

    def metadata_dir(self) -> str | None:
        return self.metadir

    @property
    def max_file_size(self) -> int:  # type: ignore[override]
        """The capability (VolumeHandle.max_file_size): what the file system under the volume
        stores (fslimits), read once per handle."""
        if self._max_file_size is None:
            self._max_file_size = fslimits.max_file_size(self.root)
        return self._max_file_size

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} at {self.root}>"

    # -- to be provided by the backend ---------------------------------------
    def image(self, snapshot: str | None) -> contextlib.AbstractContextManager[str]:
        """The root directory of the whole volume as PCPI ``snapshot`` holds it (None: active)."""
        return self._active_image(snapshot)

    @contextlib.contextmanager
    def _active_image(self, snapshot: str | None) -> Iterator[str]:
        if snapshot is None:
            yield self.root
            return
        raise NotImplementedError

    def export_image_path(self, replica: str, pcpi: str) -> str:
        raise NotImplementedError

    def export_image_prefix(self) -> str:
        raise NotImplementedError

    def snapshot_list(self) -> list[str]:
        raise NotImplementedError

    def private_dirs(self) -> list[str]:
        """The directories through which the destination's qtrees, PCPI images and exports are
        reached: mode 0700 (exports.make_private).  The backend adds where its PCPIs live."""
        return [self.root, self.export_root]

    def prepare_export(self, pcpis: set[str]) -> None:
        """Make the images of ``pcpis`` reachable by path (zfs-fuse mounts clones)."""

    def after_export(self, pcpis: set[str]) -> None:
        """Called after a switch with the PCPIs now exported."""

    # -- shared ---------------------------------------------------------------
    def purgatory_dir(self, qtree: str) -> str:
        return os.path.join(self.root, PURGATORY, qtree)

    def qtree_path(self, qtree: str) -> str:
        return os.path.join(self.root, check_qtree(qtree))

    def exports(self) -> ExportTable:
        return ExportTable(self.export_root, self._image_for_export, self._parse_export)

    def _image_for_export(self, replica: str, pcpi: str) -> str:
        if pcpi == ACTIVE:
            return os.path.join(self.root, replica)
        return self.export_image_path(replica, pcpi)

    def _parse_export(self, replica: str, target: str) -> str | None:
        return parse_under(self.export_image_prefix(), replica, target, os.path.join(self.root, replica))

    def apply(self, qtree: str, records: Iterable[Any], use_purgatory: bool) -> dict[str, int]:
        check_qtree(qtree)
        purg = self.purgatory_dir(qtree) if use_purgatory else None
        counts = Applier(self.root, qtree, purg).apply(records)
        durable.syncfs(self.root)  # before the agent records `done` (hookspecs: coalesce_apply)
        return counts

    def purge_purgatory(self, qtrees: list[str]) -> bool:
        for q in qtrees:
            rmtree(self.purgatory_dir(check_qtree(q)))
        return True

    def remove_qtree(self, qtree: str) -> bool:
        rmtree(self.qtree_path(qtree))
        rmtree(self.purgatory_dir(qtree))
        return True

    def qtree_list(self, snapshot: str | None) -> list[str]:
        with self.image(snapshot) as root:
            return [
                n
                for n in walk.listdir_sorted(root)
                if not n.startswith(RESERVED_PREFIX)
                and os.path.isdir(os.path.join(root, n))
                and not os.path.islink(os.path.join(root, n))
            ]

    def fingerprint(self, qtree: str, snapshot: str | None) -> str:
        check_qtree(qtree)
        with self.image(snapshot) as root:
            return walk.fingerprint(os.path.join(root, qtree))

    def describe(
        self,
        qtree: str,
        snapshot: str | None,
        paths: Sequence[tuple[str, bool]],
        ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> list:
        check_qtree(qtree)
        with self.image(snapshot) as root:
            return describe.describe_paths(os.path.join(root, qtree), paths, ranges)

    def describe_tree(self, qtree: str, snapshot: str | None, content: bool) -> Iterator:
        check_qtree(qtree)
        with self.image(snapshot) as root:
            yield from describe.describe_tree(os.path.join(root, qtree), content)

    def describe_holds(self) -> object:
        return describe.holds_of(self.root)

    def export(self, mapping: Mapping[str, str | None]) -> bool:
        pcpis = {v for v in mapping.values() if v is not None and v != ACTIVE}
        for r in mapping:
            check_qtree(r)
        missing = sorted(pcpis - set(self.snapshot_list()))
        if missing:
            raise BackendError(
                f"cannot export PCPI(s) {', '.join(missing)} of {self.url}: they do not exist",
                hint="export only PCPIs that snapshot_list() shows; the export table is unchanged",
            )
        make_private(self.private_dirs())  # at every switch, recovery's at start-up included
        self.prepare_export(pcpis)
        self.exports().switch(mapping)
        self.after_export(pcpis)
        return True

    def exported(self) -> dict[str, str | None]:
        return self.exports().read()

    def export_path(self, replica: str) -> str:
        return self.exports().path(check_qtree(replica))
