"""POSIX helpers shared by the btrfs and zfs backends (import name ``coalesce_posix``).

* :mod:`.apply` -- the one applier of change records into a mounted qtree
  (directory-fd relative, never follows a symlink, purgatory, ENOSPC -> NoSpace);
* :mod:`.walk` -- tree reading: canonical fingerprint, full-create records,
  the tree-compare diff;
* :mod:`.exports` -- the export table switched by one atomic rename;
* :mod:`.volume` -- the handle base class and the hooks every mounted backend shares;
* :mod:`.run` -- running tools with argument lists and clear errors.

This package is not a backend itself (it registers no entry point).
"""

from .apply import Applier, ApplyFailed, NoSpace, rmtree
from .exports import ExportTable
from .volume import PURGATORY, RESERVED_PREFIX, PosixVolume, check_qtree

__all__ = [
    "Applier",
    "ApplyFailed",
    "NoSpace",
    "rmtree",
    "ExportTable",
    "PURGATORY",
    "RESERVED_PREFIX",
    "PosixVolume",
    "check_qtree",
]
