"""Files of the host into a sim qtree and out of a sim image (``coalesce sim put`` and ``get``).

``put`` turns host files, directories and symlinks into change records (never following a
symlink; permission bits and mtimes kept) that the volume's own ``apply`` writes in one CP, as a
source writer would.  ``get`` writes a file, directory or symlink of an image into a new host path:
every file is created exclusively (``O_EXCL | O_NOFOLLOW``) below a directory it made itself, so
nothing that was there is overwritten and no host symlink is followed; holes stay holes.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R

from .fs import BS, DIR, LNK, REG, SimFS, View, nblocks
from .reader import entries

CHUNK = 1 << 20
DAMAGED = "the volume is damaged: `coalesce sim scrub` checks it"


def put_records(sources: list[str], into: str, make: list[str], skipped: list[str]) -> Iterator[object]:
    """Records creating each host path of ``sources`` at ``into/<its name>`` (``into``: a path in
    the qtree, "" for its root), after making the directories ``make`` (the missing ones of
    ``into``, parents first).  Host entries that are neither a file, a directory nor a symlink are
    left out and named in ``skipped``."""
    for d in make:
        yield R.MkDir(path=d, mode=0o755)
    for src in sources:
        name = os.path.basename(os.path.abspath(src))
        yield from _host(src, f"{into}/{name}" if into else name, skipped)


def _host(src: str, path: str, skipped: list[str]) -> Iterator[object]:
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        yield R.Symlink(path=path, target=os.readlink(src))
        yield R.SetAttr(path=path, mtime_ns=st.st_mtime_ns)
    elif stat.S_ISDIR(st.st_mode):
        yield R.MkDir(path=path, mode=stat.S_IMODE(st.st_mode))
        with os.scandir(src) as it:
            names = sorted(e.name for e in it)
        for name in names:
            yield from _host(os.path.join(src, name), f"{path}/{name}", skipped)
        yield R.SetAttr(path=path, mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
    elif stat.S_ISREG(st.st_mode):
        yield R.MkFile(path=path, mode=stat.S_IMODE(st.st_mode))
        with open(src, "rb") as f:
            offset = 0
            while chunk := f.read(CHUNK):
                if chunk.count(0) != len(chunk):  # an all-zero chunk stays a hole
                    yield R.Write(path=path, offset=offset, data=chunk)
                offset += len(chunk)
        yield R.Truncate(path=path, size=offset)
        yield R.SetAttr(path=path, mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns)
    else:
        skipped.append(src)


def get_tree(fs: SimFS, view: View, rec_ino: int, dest: str) -> int:
    """Write the image's inode ``rec_ino`` (and what is below it) to the new host path ``dest``;
    returns the number of entries written."""
    rec = view.existing(rec_ino)
    if rec.kind == LNK:
        os.symlink(view.data(rec).decode("utf-8", "surrogateescape"), dest)
        os.utime(dest, ns=(rec.mtime, rec.mtime), follow_symlinks=False)
        return 1
    if rec.kind == REG:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            limit = nblocks(rec.size)
            for fbn, vbn in fs.leaves(rec.top, rec.height):
                if fbn < limit:
                    os.pwrite(fd, fs.read(vbn)[: min(BS, rec.size - fbn * BS)], fbn * BS)
            os.ftruncate(fd, rec.size)
            os.fchmod(fd, rec.mode & 0o7777)
        finally:
            os.close(fd)
        os.utime(dest, ns=(rec.mtime, rec.mtime), follow_symlinks=False)
        return 1
    if rec.kind != DIR:
        raise BackendError(f"inode {rec_ino} of {fs.path} is of no kind a host can hold ({rec.kind})", hint=DAMAGED)
    os.mkdir(dest, 0o700)
    n = 1
    for name, ino, _crec in entries(view, rec):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            continue  # never in a volume coalesce wrote; a damaged one must not steer the writes
        n += get_tree(fs, view, ino, os.path.join(dest, name))
    os.chmod(dest, rec.mode & 0o7777)
    os.utime(dest, ns=(rec.mtime, rec.mtime), follow_symlinks=False)
    return n
