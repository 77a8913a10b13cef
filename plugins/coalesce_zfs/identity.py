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
* **Times** (:func:`stamped`): an entry whose mtime is equal in the two
  images (whole seconds on zfs-fuse, or set back with ``touch``) got no
  SetAttr, yet the records that change its entries or data move its mtime in
  the replica: every such entry gets a SetAttr from the target image.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable, Iterator

from coalesce_core.stream import records as R
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
            st = walk.lstat_or_none(os.path.join(root, rel))
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


# ---------------------------------------------------------------------------
# times
# ---------------------------------------------------------------------------
def _parent(path: str) -> str:
    return path.rpartition("/")[0] if "/" in path else R.ROOT


def stamped(records: Iterable[object], target: str) -> Iterator[object]:
    """``records`` (a tree diff into the qtree image ``target``), then a SetAttr from ``target`` for
    every entry whose mtime they move in the replica and that they gave none: a file written or
    truncated, a directory (the qtree root included) an entry was made in or removed from.
    Deepest first; a SetAttr of one entry changes no other entry's mtime."""
    moved: set[str] = set()
    done: set[str] = set()
    for rec in records:
        yield rec
        if isinstance(rec, (R.Write, R.Truncate)):
            moved.add(rec.path)
        elif isinstance(rec, R.SetAttr):
            done.add(rec.path)
        elif isinstance(rec, (R.MkDir, R.MkFile, R.Symlink, R.HardLink, R.Unlink, R.RmDir)):
            moved.add(_parent(rec.path))
        elif isinstance(rec, R.Rename):
            moved.update((_parent(rec.old), _parent(rec.new)))
    for path in sorted(moved - done, key=lambda p: (-p.count("/"), p == R.ROOT, p)):
        st = walk.lstat_or_none(os.path.join(target, path) if path else target)
        if st is not None and walk.kind_of(st) is not None:
            yield walk.setattr_record(path, st)
