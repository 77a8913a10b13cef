"""What the zfs diff adds to the tree compare so that a path never stands for an object it does not name.

coalesce_posix.walk.tree_diff compares two images of one dataset by path,
which gives the target's names, kinds and bytes whatever moved where.  Three
things it decides by path are about objects, and the zfs diff corrects them
here (docs/real-backends.md, "ZFS: identity"):

* **Pruning** (:func:`prune_for`): a directory that ``zfs diff`` does not
  name is not descended into.  That holds only for the *same* directory
  object at that path in both images (an unchanged directory object has the
  same entries, naming the same objects).  A directory whose path now holds
  another directory (swapped, replaced, a sibling renamed onto it) is named
  by neither side of ``zfs diff`` when neither object changed itself, yet
  its entries are another directory's: :class:`Prune` descends into every
  directory whose inode number differs between the images.  ``zfs diff``
  names a file by ONE of its names (the one its parent pointer leads to), so
  a file with several links written through one of them would leave the
  others' directories unnamed: when a named non-directory has more than one
  link in either image (or a named path is in neither), nothing is pruned.
* **Hard links**: the walk goes in name order, so a new name of a file can
  come before the file's kept name; :func:`walk.tree_diff` itself holds such
  names back (:class:`walk.KeptLinks`), for every backend that falls back to it.
* **Times**: an entry whose mtime is equal in the two images (whole seconds
  on zfs-fuse, set back with ``touch``, or two directories changed within one
  tick of the kernel's clock) got no SetAttr, yet the records that change its
  entries or data move its mtime in the replica: :func:`walk.tree_diff`
  itself gives every such entry a SetAttr from the target image
  (:func:`walk.stamped`), for every backend that falls back to it.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable

from coalesce_posix import walk


# ---------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------
class Prune(set):
    """The qtree-relative directories a pruned :func:`walk.tree_diff` descends into: those given (at or
    above a path ``zfs diff`` names), and every directory whose path holds another directory object in
    ``target`` than in ``base`` (the qtree's directories in the two images)."""

    def __init__(self, dirs: Iterable[str], base: str, target: str) -> None:
        super().__init__(dirs)
        self.base = base
        self.target = target

    def __contains__(self, rel: object) -> bool:
        if set.__contains__(self, rel):
            return True
        assert isinstance(rel, str)
        b = walk.lstat_or_none(os.path.join(self.base, rel))
        t = walk.lstat_or_none(os.path.join(self.target, rel))
        return b is None or t is None or b.st_ino != t.st_ino


def prune_for(changed: set[str], qtree: str, base: str, target: str) -> Prune | None:
    """The prune set of ``qtree`` from the dataset-relative paths ``zfs diff`` named (``changed``),
    with ``base`` and ``target`` the dataset's two images; None (walk everything) when a named path
    is a non-directory with several links in either image, or is in neither image."""
    for rel in changed:
        seen = False
        for root in (base, target):
            st = walk.lstat_below(root, rel)  # a name of one image may pass a symlink in the other
            if st is None:
                continue
            seen = True
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                return None
        if not seen:
            return None
    return Prune(dirs_with_changes(changed, qtree), os.path.join(base, qtree), os.path.join(target, qtree))


def dirs_with_changes(changed: set[str], qtree: str) -> set[str]:
    """Qtree-relative directories at or above a changed path ("" is the qtree root)."""
    out = {""}
    pre = qtree + "/"
    for p in changed:
        if not p.startswith(pre):
            continue
        parts = p[len(pre) :].split("/")
        for i in range(len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out
