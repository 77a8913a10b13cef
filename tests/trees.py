"""What a real directory tree holds, for tests that compare trees: :func:`capture` and :func:`differences`.

Independent of the code under test (it does not use coalesce's fingerprint
or walk), so a comparison cannot share a bug with what it checks.  An entry
is described by its kind, permission bits, owner, group, size, content
digest (holes and zeros alike: a sparse file of any size is digested at the
cost of its data), symlink target, xattrs and modification time; the tree's
root is the entry ``""``.  Hard links are compared as groups of paths that
share an inode.  Special files (devices, FIFOs, sockets) are not replicated
(docs/real-backends.md) and are left out.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Any

import attrs

BLOCK = 64 << 10


@attrs.frozen
class Tree:
    entries: dict[str, tuple[Any, ...]]
    links: tuple[tuple[str, ...], ...]  # groups of two or more paths of one inode, sorted


def content_digest(path: str) -> str:
    """sha256 over the non-zero 64 KiB blocks (index and bytes) and the size; holes are zeros."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha256(str(size).encode())
        pos = 0
        zero = bytes(BLOCK)
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            block = pos // BLOCK
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while block * BLOCK < end:
                data = os.pread(fd, BLOCK, block * BLOCK)
                if data and data != zero[: len(data)]:
                    h.update(block.to_bytes(8, "little"))
                    h.update(data)
                block += 1
            pos = block * BLOCK
        return h.hexdigest()
    finally:
        os.close(fd)


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def _describe(full: str, st: os.stat_result, times: bool) -> tuple[Any, ...] | None:
    t = st.st_mtime_ns if times else 0
    if stat.S_ISDIR(st.st_mode):
        return ("d", st.st_mode & 0o7777, st.st_uid, st.st_gid, _xattrs(full), t)
    if stat.S_ISREG(st.st_mode):
        return ("f", st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size, content_digest(full), _xattrs(full), t)
    if stat.S_ISLNK(st.st_mode):
        return ("l", os.fsdecode(os.readlink(full)), st.st_uid, st.st_gid, t)
    return None


def capture(root: str, *, times: bool = True, root_entry: bool = True) -> Tree:
    """Everything below ``root`` (iteratively: any depth).  A missing root is the empty tree.
    ``root`` itself may be a symlink (an export path): it is followed, nothing below it is."""
    root = os.path.realpath(root)
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    try:
        rst = os.lstat(root)
    except FileNotFoundError:
        return Tree({}, ())
    if root_entry:
        d = _describe(root, rst, times)
        if d is not None:
            entries[""] = d
    stack = [""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else root
        with os.scandir(base) as it:
            names = [e.name for e in it]
        for name in names:
            r = f"{rel}/{name}" if rel else name
            full = os.path.join(root, r)
            st = os.lstat(full)
            d = _describe(full, st, times)
            if d is None:
                continue
            entries[r] = d
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)
            else:
                inodes.setdefault(st.st_ino, []).append(r)
    links = tuple(sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1))
    return Tree(entries, links)


def stripped(tree: Tree) -> Tree:
    """``tree`` as a replica under ``[group] privileges = "strip"`` holds it (written from
    docs/config.md, not from coalesce's code): no setuid or setgid bit, no ``security.*`` or
    ``trusted.*`` xattr."""

    def strip(e: tuple[Any, ...]) -> tuple[Any, ...]:
        if e[0] == "l":
            return e
        x = tuple((n, v) for n, v in e[-2] if not n.startswith(("security.", "trusted.")))
        return (e[0], e[1] & ~0o6000, *e[2:-2], x, e[-1])

    return Tree({p: strip(e) for p, e in tree.entries.items()}, tree.links)


def differences(want: Tree, got: Tree, limit: int = 20) -> list[str]:
    """The first ``limit`` differences between two trees, by path; [] when they are equal."""
    out = []
    for path in sorted(set(want.entries) | set(got.entries)):
        w, g = want.entries.get(path), got.entries.get(path)
        if w != g:
            out.append(f"{path or '(root)'}: want {w!r:.300} got {g!r:.300}")
            if len(out) >= limit:
                return out
    if want.links != got.links:
        out.append(f"hard links: want {want.links!r:.500} got {got.links!r:.500}")
    return out


def assert_same(want_root: str, got_root: str, *, times: bool = True, root_entry: bool = True, what: str = "") -> None:
    """Fail with the first differences when the trees below the two roots differ."""
    diff = differences(
        capture(want_root, times=times, root_entry=root_entry), capture(got_root, times=times, root_entry=root_entry)
    )
    assert not diff, f"{what or got_root} differs from {want_root}:\n  " + "\n  ".join(diff)
