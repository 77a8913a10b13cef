"""Named file-system change scenarios for the real backends, and how to run them through coalesce.

A :class:`Scenario` is a tree made by ``setup`` and the operations ``change``
makes between two source PCPIs, written as plain ``os`` calls on paths that
its :class:`Paths` maps into qtrees.  Two families (docs/verification.md):

* ``btrfs-NNN``: the pattern of the Linux kernel's fstests regression test
  ``tests/btrfs/NNN`` for incremental send (directory renames, orphans,
  swaps, hard links, holes, clones), rewritten here.  The fstests tree lives
  in one qtree ``q``; where the pattern moves entries between directories,
  ``btrfs-NNN-xq`` places its top-level directories in two qtrees ``x`` and
  ``y``, so the same moves cross qtrees.
* the cases found by replicating real btrfs sources: a directory renamed and a
  new one made under its old name, swapped subtrees whose children swap back,
  the same across qtrees, hard-linked files written through one link, and
  255-byte multi-byte UTF-8 names.

Every file gets its own bytes, so an entry that reaches the right path with
another entry's data is caught.  ``needs`` names what a scenario uses that not
every file system can do (:data:`NEEDS`); a backend that cannot do it does
not run it.  :func:`drive` runs scenarios through a group (one replica per qtree):
every setup, a baseline cycle, every change, one incremental cycle.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import struct
from typing import Any, Callable, Mapping

import attrs

from coalesce_core.backend.hookspecs import hookimpl

NEEDS = {
    "reflink": "sharing extents between or within files (FICLONE, FICLONERANGE)",
    "prealloc": "allocating blocks beyond the end of a file (fallocate KEEP_SIZE)",
    "punch_hole": "deallocating a range inside a file (fallocate PUNCH_HOLE)",
    "large_xattr": "xattr values longer than 128 bytes",
}


@attrs.frozen
class Paths:
    """Maps a scenario's logical path to a path on the source volume.

    ``place`` None: the first component of a logical path is its qtree.
    Otherwise the first component is looked up in ``place`` (``default`` when
    absent) and the whole logical path goes below that qtree.  Qtree
    directories are named ``tag`` + qtree (scenarios sharing one volume);
    ``prefix`` is prepended to every logical path (a sub-case of a tree)."""

    root: str
    place: Mapping[str, str] | None
    default: str = "q"
    tag: str = ""
    prefix: str = ""

    def __call__(self, path: str) -> str:
        path = self.prefix + path
        if self.place is None:
            return os.path.join(self.root, self.tag + path)
        qtree = self.place.get(path.split("/", 1)[0], self.default)
        return os.path.join(self.root, self.tag + qtree, path)

    def sub(self, prefix: str) -> "Paths":
        return attrs.evolve(self, prefix=self.prefix + prefix.rstrip("/") + "/")


Step = Callable[[Paths], None]


@attrs.frozen
class Scenario:
    """A named change: ``setup`` makes the tree of the first source PCPI, ``change`` the second's.

    ``qtrees`` are the qtrees it uses (one replica each), ``place`` how its
    paths map to them (see :class:`Paths`), ``needs`` keys of :data:`NEEDS`."""

    name: str
    origin: str  # "fstests btrfs/NNN" or "replication of real sources"
    about: str  # one line: the pattern
    setup: Step
    change: Step
    qtrees: tuple[str, ...]
    place: Mapping[str, str] | None
    needs: frozenset[str] = frozenset()

    def paths(self, root: str, tag: str = "") -> Paths:
        return Paths(root, self.place, default=self.qtrees[0], tag=tag)

    def replicas(self, tag: str = "") -> tuple[str, ...]:
        """The replica (and source qtree) names of the scenario's qtrees under ``tag``."""
        return tuple(tag + q for q in self.qtrees)


SCENARIOS: dict[str, Scenario] = {}


def _add(sc: Scenario) -> None:
    assert sc.name not in SCENARIOS, sc.name
    assert sc.needs <= set(NEEDS), sc.needs
    SCENARIOS[sc.name] = sc


def fstests(
    number: str,
    about: str,
    setup: Step,
    change: Step,
    *,
    cross: Mapping[str, str] | None = None,
    needs: tuple[str, ...] = (),
    variant: str = "",
) -> None:
    """Register ``btrfs-NNN`` in one qtree and, with ``cross`` (top-level name -> ``x``/``y``), ``btrfs-NNN-xq``.

    ``variant`` names an extension of the fstests pattern (``btrfs-NNN-variant``)."""
    name = f"btrfs-{number}" + (f"-{variant}" if variant else "")
    origin = f"fstests btrfs/{number}" + (", extended" if variant else "")
    _add(Scenario(name, origin, about, setup, change, ("q",), {}, frozenset(needs)))
    if cross is not None:
        assert set(cross.values()) == {"x", "y"}, cross
        _add(
            Scenario(
                f"{name}-xq",
                f"{origin}, across two qtrees",
                about,
                setup,
                change,
                ("x", "y"),
                dict(cross),
                frozenset(needs),
            )
        )


def ours(name: str, about: str, setup: Step, change: Step, qtrees: tuple[str, ...] = ("q",)) -> None:
    """Register a case found by replicating real sources; its paths start with their qtree."""
    _add(Scenario(name, "replication of real sources", about, setup, change, qtrees, None))


# ---------------------------------------------------------------------------
# helpers: the few things plain os calls do not say in one line
# ---------------------------------------------------------------------------
def put(path: str, data: bytes | None = None) -> None:
    """Create (or overwrite) a file; by default with bytes no other file has."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if data is not None else f"bytes first written at {path}\n".encode() * 3)


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def pwrite(path: str, offset: int, data: bytes, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)  # one extent per write, as the fstests pattern wants
    finally:
        os.close(fd)


_FICLONE = 0x40049409
_FICLONERANGE = 0x4020940D


def clone_range(src: str, src_offset: int, dst: str, dst_offset: int, length: int) -> None:
    """Share ``length`` bytes of ``src`` at ``dst_offset`` of ``dst`` (0: to the end of ``src``)."""
    with open(src, "rb") as s, open(dst, "r+b") as d:
        fcntl.ioctl(d.fileno(), _FICLONERANGE, struct.pack("qQQQ", s.fileno(), src_offset, length, dst_offset))


def clone_file(src: str, dst: str) -> None:
    with open(src, "rb") as s, open(dst, "r+b") as d:
        fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())


_libc = ctypes.CDLL(None, use_errno=True)
KEEP_SIZE, PUNCH_HOLE = 0x01, 0x02  # fallocate modes


def fallocate(path: str, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


K = 1024
M = K * K


# ---------------------------------------------------------------------------
# fstests btrfs send tests, in our words.  Each pattern: setup (the tree at the
# first source PCPI), change (what happens before the second).
# ---------------------------------------------------------------------------
# btrfs/030: nested directories turned inside out (children become parents), a file
# hard-linked then moved, a chain of directories reversed, appends on the way.
def _030_setup(p):
    put(p("c/file.txt"), b"hello\n")
    os.makedirs(p("c/d"))
    os.makedirs(p("c2"))
    os.makedirs(p("www"))
    put(p("foobar.txt"), b"hey\n")
    os.makedirs(p("c3/x/y"))
    put(p("foo1/foo2/f.txt"), b"hey there\n")
    os.makedirs(p("foo3"))
    put(p("bar1/bar2/bar3/bar4/hello.txt"), b"ola\n")


def _030_change(p):
    append(p("c/file.txt"), b" world\n")
    os.rename(p("c/d"), p("c2/d2"))
    os.rename(p("c"), p("c2/d2/cc"))
    os.rename(p("c3/x/y"), p("c2/y2"))
    os.rename(p("c3/x"), p("c2/y2/x2"))
    os.rename(p("c3"), p("c2/y2/x2/Z"))
    os.rename(p("www"), p("c2/y2/x2/WWW"))
    os.rename(p("foobar.txt"), p("c2/y2/x2/qwerty.txt"))
    os.link(p("c2/d2/cc/file.txt"), p("c2/y2/x2/Z/file_link.txt"))
    os.rename(p("c2/d2/cc/file.txt"), p("c2/y2/x2/file.txt"))
    os.rename(p("foo3"), p("foo1/foo33"))
    os.rename(p("foo1/foo2"), p("foo1/foo33/foo22"))
    os.rename(p("foo1/foo33/foo22/f.txt"), p("foo1/foo33/foo22/fff.txt"))
    append(p("bar1/bar2/bar3/bar4/hello.txt"), b" hello\n")
    os.rename(p("bar1/bar2/bar3/bar4/hello.txt"), p("bar1/bar2/bar3/bar4/hello2.txt"))
    os.rename(p("bar1/bar2/bar3/bar4"), p("k44"))
    os.rename(p("bar1/bar2/bar3"), p("k44/bar3"))
    os.rename(p("bar1/bar2"), p("k44/bar3/bar2"))
    os.rename(p("bar1"), p("k44/bar3/bar2/k11"))


fstests(
    "030",
    "ancestors become descendants; a chain of directories reversed",
    _030_setup,
    _030_change,
    cross={
        "c": "x",
        "c3": "x",
        "www": "x",
        "foobar.txt": "x",
        "foo3": "x",
        "bar1": "x",
        "c2": "y",
        "foo1": "y",
        "k44": "y",
    },
)


# btrfs/039: a child directory made before its parent (lower inode), both renamed in place.
def _039_setup(p):
    os.makedirs(p("a/b"))
    os.mkdir(p("d"))
    os.mkdir(p("a/b/c"))
    os.rename(p("d"), p("a/b/c/d"))
    os.mkdir(p("e"))
    os.makedirs(p("a/b/f/g"))
    os.rename(p("e"), p("a/b/f/g/e"))
    put(p("a/b/c/d/in-d"))
    put(p("a/b/f/g/e/in-e"))


def _039_change(p):
    os.rename(p("a/b/c"), p("a/b/x"))
    os.rename(p("a/b/x/d"), p("a/b/x/y"))
    os.rename(p("a/b/f"), p("a/b/w"))
    os.rename(p("a/b/w/g/e"), p("a/b/w/g/z"))


fstests("039", "a directory and its older-numbered child both renamed without moving", _039_setup, _039_change)


# btrfs/040: a directory holding several links of one inode is emptied and removed while the
# inode keeps a link elsewhere.
def _040_setup(p):
    put(p("c/hel.txt"), b"hello world\n")
    put(p("c/foo.txt"), b"ola mundo\n")
    os.link(p("c/foo.txt"), p("c/bar.txt"))
    os.link(p("c/foo.txt"), p("baz.txt"))


def _040_change(p):
    for name in ("foo.txt", "bar.txt", "hel.txt"):
        os.unlink(p(f"c/{name}"))
    os.rmdir(p("c"))


fstests(
    "040",
    "a directory with two links of a surviving inode removed",
    _040_setup,
    _040_change,
    cross={"c": "x", "baz.txt": "y"},
)


# btrfs/043: an orphaned directory is removed only once the children moved out of it have gone.
def _043_setup(p):
    os.makedirs(p("b/c"))
    for d in ("0", "1", "x", "x2"):
        os.mkdir(p(f"b/c/{d}"))
    put(p("b/c/foo.txt"), b"ola mundo\n")
    os.mkdir(p("b/y"))
    os.mkdir(p("b/z"))
    os.makedirs(p("b/d1/d2/d3"))
    os.mkdir(p("b/d4"))
    put(p("b/d1/d2/d3/deep"))


def _043_change(p):
    os.unlink(p("b/c/foo.txt"))
    os.rename(p("b/y"), p("b/YY"))
    os.rename(p("b/z"), p("z"))
    os.rename(p("b/c/x"), p("b/YY/x"))
    os.rename(p("b/c/0"), p("b/YY/00"))
    os.rename(p("b/c/x2"), p("z/X_2"))
    os.rename(p("b/c/1"), p("z/X_2/1"))
    os.rmdir(p("b/c"))
    os.rename(p("b/d4"), p("d44"))
    os.rename(p("b/d1/d2"), p("d44/d2"))
    os.rmdir(p("b/d1"))


fstests(
    "043", "directories emptied by moves, then removed", _043_setup, _043_change, cross={"b": "x", "z": "y", "d44": "y"}
)


# btrfs/044: a delayed directory move must not leave the modes and times of its children behind.
def _044_setup(p):
    os.makedirs(p("c/d/e"))
    os.mkdir(p("c/f"))
    put(p("c/d/e/file.txt"), b"ola \n")
    os.chmod(p("c/d/e"), 0o777)


def _044_change(p):
    append(p("c/d/e/file.txt"), b"mundo\n")
    os.rename(p("c/d/e/file.txt"), p("c/d/e/file2.txt"))
    os.rename(p("c/f"), p("f2"))
    os.rename(p("c/d/e"), p("f2/e2"))
    os.rename(p("c"), p("c2"))
    os.rename(p("c2/d"), p("c2/d2"))
    os.chmod(p("f2/e2"), 0o700)


fstests(
    "044",
    "renames that delay a directory move, then a chmod of the moved directory",
    _044_setup,
    _044_change,
    cross={"c": "x", "c2": "x", "f2": "y"},
)


# btrfs/053: xattr values larger than a page, changed and added.
def _053_setup(p):
    put(p("foobar"), b"hello world\n")
    os.setxattr(p("foobar"), "user.xattr_name_1", b"A" * 6000)


def _053_change(p):
    os.setxattr(p("foobar"), "user.xattr_name_1", b"Z" * 6666)
    os.setxattr(p("foobar"), "user.xattr_name_2", b"U" * 5555)


fstests("053", "xattr values larger than 4 KiB replaced and added", _053_setup, _053_change, needs=("large_xattr",))


# btrfs/077: a directory renamed away and made the child of a new directory that takes its
# old name, once directly and once two levels down.
def _077_setup(p):
    os.makedirs(p("merlin/RC/OSD/Source"))
    os.makedirs(p("fdm/RCz/OSDz/Sourcez"))
    os.makedirs(p("Z/Z2"))
    put(p("merlin/RC/OSD/Source/s"))
    put(p("fdm/RCz/OSDz/Sourcez/s"))


def _077_change(p):
    os.mkdir(p("OSD"))
    os.rename(p("merlin/RC/OSD"), p("OSD/OSD-Plane_788"))
    os.rename(p("OSD"), p("merlin/RC/OSD"))
    os.mkdir(p("OSDz"))
    os.rename(p("Z/Z2"), p("OSDz/xz2"))
    os.rename(p("Z"), p("OSDz/xz2/xz"))
    os.rename(p("fdm/RCz/OSDz"), p("OSDz/xz2/xz/OSD-Plane_788z"))
    os.rename(p("OSDz"), p("fdm/RCz/OSDz"))


fstests(
    "077",
    "a renamed directory becomes a descendant of a new directory with its old name",
    _077_setup,
    _077_change,
    cross={"merlin": "x", "Z": "x", "OSDz": "x", "fdm": "y", "OSD": "y"},
)


# btrfs/083: a renamed directory's old name is taken by another directory, and its move must
# wait for a third directory's rename.
def _083_setup(p):
    for d in "abcdef":
        os.mkdir(p(d))
    put(p("a/file"))
    put(p("e/file2"))


def _083_change(p):
    os.rename(p("c"), p("x"))
    os.rename(p("a"), p("x/y"))
    os.rename(p("b"), p("a"))
    os.rename(p("f"), p("f2"))
    os.rename(p("e"), p("f2/e2"))
    os.rename(p("d"), p("e"))


fstests(
    "083",
    "a directory's old name taken by another while it moves under a renamed one",
    _083_setup,
    _083_change,
    cross={"a": "x", "d": "x", "e": "x", "f2": "x", "b": "y", "c": "y", "x": "y", "f": "y"},
)


# btrfs/084: two subtrees with the same path p1/p2 exchange their roots.
def _084_setup(p):
    os.makedirs(p("n1/n2/p1/p2"))
    os.mkdir(p("n4"))
    os.makedirs(p("p1/p2"))
    put(p("n1/n2/p1/p2/deep"))
    put(p("p1/p2/shallow"))


def _084_change(p):
    os.rename(p("p1/p2"), p("p2"))
    os.rename(p("n1/n2/p1/p2"), p("p1/p2"))
    os.rename(p("p2"), p("n1/n2/p1/p2"))
    os.rename(p("n1/n2"), p("p1/n2"))
    os.rename(p("p1"), p("n4/p1"))
    os.rename(p("n4/p1/n2/p1"), p("p1"))


fstests(
    "084",
    "the roots of two subtrees with the same path swapped",
    _084_setup,
    _084_change,
    cross={"n1": "x", "p1": "x", "n4": "y", "p2": "y"},
)


# btrfs/092: a deep chain whose ancestry is inverted, with two entries named t7 that are
# different directories before and after.  (fstests keeps all of it in one directory n4;
# here that directory's contents are at the top, so the chain can start in one qtree and
# end in the other.)
def _092_setup(p):
    os.makedirs(p("n1/n2"))
    os.makedirs(p("t6/t7"))
    for d in ("t5", "t7", "t2", "t4", "t3"):
        os.mkdir(p(d))
    chain = "t2"
    for d in ("t7", "t4", "t5", "t6"):
        os.rename(p(d), p(f"{chain}/{d}"))
        chain += f"/{d}"
    os.rename(p("n1/n2"), p(f"{chain}/n2"))
    os.rename(p("n1"), p(f"{chain}/n1"))
    os.rename(p(f"{chain}/t7"), p(f"{chain}/n2/t7"))
    os.rename(p("t3"), p(f"{chain}/n2/t7/t3"))
    put(p(f"{chain}/n2/t7/t3/leaf"))


def _092_change(p):
    os.rename(p("t2/t7/t4/t5/t6/n1"), p("n1"))
    os.rename(p("t2"), p("n1/t2"))
    os.rename(p("n1/t2/t7/t4/t5/t6/n2"), p("n1/t2/n2"))
    os.rename(p("n1/t2/n2/t7/t3"), p("n1/t2/t3"))
    os.rename(p("n1/t2/t7/t4/t5/t6"), p("n1/t2/t6"))
    os.rename(p("n1/t2/t7/t4"), p("n1/t2/t6/t4"))
    os.rename(p("n1/t2/t7"), p("n1/t2/t3/t7"))
    os.rename(p("n1/t2/n2/t7"), p("n1/t2/t7"))


fstests(
    "092",
    "ancestry inverted along a chain, one name pointing to another directory after",
    _092_setup,
    _092_change,
    cross={"t2": "x", "n1": "y"},
)


# btrfs/097: parts of a file's extent cloned to lower offsets of the same file.
def _097_setup(p):
    pwrite(p("foo"), 32 * 4 * K, b"\xaa" * (16 * 4 * K))


def _097_change(p):
    clone_range(p("foo"), (32 + 4) * 4 * K, p("foo"), 0, 4 * 4 * K)
    clone_range(p("foo"), (32 + 12) * 4 * K, p("foo"), 4 * 4 * K, 4 * 4 * K)


fstests("097", "an extent cloned into lower offsets of its own file", _097_setup, _097_change, needs=("reflink",))


# btrfs/105: a file removed and a new one with other bytes and size made at the same path.
# (fstests also gets the old inode number back, which needs a fresh subvolume root; the
# same path with a different object is what matters here.)
def _105_setup(p):
    put(p("foo/bar"), b"\xaa" * (64 * K))


def _105_change(p):
    os.unlink(p("foo/bar"))
    put(p("foo/bar"), b"\xbb" * (96 * K))


fstests("105", "a file replaced by another at the same path", _105_setup, _105_change)


# btrfs/127: four small worlds where a name in one directory points to different inodes
# before and after, creating circular waits among delayed renames.
def _127_case1(p, step):
    if step == 0:
        os.makedirs(p("d/p1"))
        os.mkdir(p("p1"))
        put(p("d/p1/in-inner"))
        put(p("p1/in-outer"))
    else:
        os.rename(p("d/p1"), p("p1/p1"))  # the inner p1 goes below the outer one,
        os.rename(p("p1"), p("d/p1"))  # which takes its place


def _127_case2(p, step):
    if step == 0:
        for d in ("a/c", "d/ance", "e", "f", "ance"):
            os.makedirs(p(d))
        for d in ("e", "f", "ance"):
            os.rename(p(d), p(f"d/ance/{d}"))
        put(p("d/ance/e/in-e"))
    else:
        os.rename(p("a/c"), p("c"))
        os.rename(p("d/ance"), p("c/ance"))
        os.rename(p("c/ance/ance"), p("d/ance"))
        os.rename(p("c/ance/f"), p("f"))
        os.rename(p("c/ance/e"), p("f/e"))


def _127_case3(p, step):
    if step == 0:
        for d in ("d/ance", "a/c", "waiting_dir", "pre/ance"):
            os.makedirs(p(d))
        os.rename(p("waiting_dir"), p("d/ance/waiting_dir"))
        put(p("pre/ance/in-ance"))
    else:
        os.rename(p("d/ance"), p("a/ance"))
        os.rename(p("a/c"), p("c"))
        os.rename(p("a/ance/waiting_dir"), p("c/waiting_dir"))
        os.rename(p("pre/ance"), p("d/ance"))
        os.rename(p("pre"), p("c/waiting_dir/pre"))


def _127_case4(p, step):
    if step == 0:
        for d in ("tmp", "below_ance", "pre/wait_dir", "desc", "ance"):
            os.makedirs(p(d))
        os.rename(p("below_ance"), p("ance/below_ance"))
        os.mkdir(p("other_dir"))
        put(p("ance/below_ance/in-below"))
    else:
        os.rename(p("other_dir"), p("tmp/other_dir"))
        os.rename(p("ance/below_ance"), p("tmp/other_dir/below_ance"))
        os.rename(p("pre/wait_dir"), p("tmp/other_dir/wait_dir"))
        os.rename(p("pre"), p("tmp/other_dir/below_ance/pre"))
        os.rename(p("desc"), p("tmp/other_dir/wait_dir/desc"))
        os.rename(p("ance"), p("tmp/other_dir/wait_dir/desc/ance"))


_127 = (_127_case1, _127_case2, _127_case3, _127_case4)


def _127_all(step):
    def run(p):
        for i, case in enumerate(_127, 1):
            case(p.sub(f"case_{i}"), step)

    return run


def _127_one(case, step: int) -> Step:
    return lambda p: case(p, step)


fstests(
    "127", "names that point to other inodes after, in four arrangements of delayed renames", _127_all(0), _127_all(1)
)
_127_CROSS = (
    {"d": "x", "p1": "y"},
    {"a": "x", "d": "x", "c": "y", "f": "y", "e": "y", "ance": "y"},
    {"d": "x", "a": "x", "waiting_dir": "x", "pre": "y", "c": "y"},
    {"ance": "x", "pre": "x", "desc": "x", "below_ance": "x", "tmp": "y", "other_dir": "y"},
)
for _i, (_case, _cross) in enumerate(zip(_127, _127_CROSS), 1):
    _add(
        Scenario(
            f"btrfs-127-{_i}-xq",
            f"fstests btrfs/127 (arrangement {_i}), across two qtrees",
            "names that point to other inodes after, the moves crossing qtrees",
            _127_one(_case, 0),
            _127_one(_case, 1),
            ("x", "y"),
            _cross,
        )
    )
del _i, _case, _cross


# btrfs/129: a directory is removed only after the last entry moved out of it.
def _129_setup(p):
    os.mkdir(p("a"))
    os.mkdir(p("tmp"))
    os.mkdir(p("del"))
    os.rename(p("tmp"), p("del/tmp"))
    os.mkdir(p("a/c"))
    os.mkdir(p("del/x"))
    put(p("del/x/in-x"))


def _129_change(p):
    os.rename(p("a/c"), p("c"))
    os.rename(p("del/x"), p("a/x"))
    os.rename(p("del/tmp"), p("c/tmp"))
    os.rmdir(p("del"))


fstests(
    "129",
    "entries moved out of a directory that is then removed",
    _129_setup,
    _129_change,
    cross={"a": "x", "tmp": "x", "del": "y", "c": "y"},
)


# btrfs/134: a directory moved out of its parent, the parent removed and a new entry made
# with the parent's identity.  fstests reuses the inode number (after a remount we cannot
# do on a shared mount); here the new entries reuse the removed directories' names.
def _134_setup(p):
    for d in ("dir257", "dir258", "dir259"):
        os.mkdir(p(d))
    os.rename(p("dir257"), p("dir258/dir257"))
    put(p("dir258/dir257/inner"))


def _134_change(p):
    os.rename(p("dir258/dir257"), p("dir257"))
    os.rmdir(p("dir258"))
    os.rmdir(p("dir259"))
    put(p("dir258"))
    os.mkdir(p("dir259"))
    os.rename(p("dir257"), p("dir259/dir257"))


fstests(
    "134",
    "a removed parent's name reused by a file, a new directory adopts the child",
    _134_setup,
    _134_change,
    cross={"dir257": "x", "dir258": "x", "dir259": "y"},
)


# btrfs/137: holes kept by a full and an incremental send.
def _137_setup(p):
    pwrite(p("foo"), 0, b"\xaa" * (64 * K))
    pwrite(p("bar"), 0, b"\xaa" * (64 * K))
    pwrite(p("bar"), 1088 * K, b"\xbb" * (64 * K))


def _137_change(p):
    pwrite(p("foo"), 1088 * K, b"\xbb" * (64 * K))
    pwrite(p("bar"), 1088 * K, b"\xcc" * (64 * K))


fstests("137", "a file extended past a 1 MiB hole; the extent after a hole overwritten", _137_setup, _137_change)


# btrfs/144: a file renamed and given a second link, another file takes its old name.
def _144_setup(p):
    for f in ("f1", "f2", "f3"):
        put(p(f))


def _144_change(p):
    os.rename(p("f3"), p("f4"))
    os.link(p("f2"), p("f5"))
    os.rename(p("f2"), p("f3"))
    os.rename(p("f1"), p("f2"))


fstests(
    "144",
    "names rotated among files, one gaining a hard link",
    _144_setup,
    _144_change,
    cross={"f1": "x", "f3": "x", "f5": "x", "f2": "y", "f4": "y"},
)


# btrfs/145: a directory renamed, and a file that lived below it takes the directory's old name.
def _145_setup(p):
    os.makedirs(p("dir2"))
    for f in ("file1", "file2", "file3"):
        put(p(f"dir2/{f}"))
    os.mkdir(p("dir3"))
    os.rename(p("dir2/file2"), p("dir3/file22"))
    os.mkdir(p("dir3/dir4"))


def _145_change(p):
    os.rename(p("dir2/file3"), p("dir3/dir4/file33"))
    os.rename(p("dir2/file1"), p("dir3/dir4/file11"))
    os.rename(p("dir3"), p("file3"))
    os.rename(p("file3/file22"), p("dir3"))


fstests(
    "145",
    "a file takes the old name of the directory it lived in",
    _145_setup,
    _145_change,
    cross={"dir2": "x", "file3": "x", "dir3": "y"},
)


# btrfs/147: a directory moved, a file renamed to its old name and linked into it.
def _147_setup(p):
    os.makedirs(p("dir1/dir2/dir3/dir4"))
    os.mkdir(p("dir5"))
    put(p("dir1/dir2/dir3/file1"))


def _147_change(p):
    os.mkdir(p("dir1/dir6"))
    os.rename(p("dir5"), p("dir1/dir2/dir3/dir4/dir55"))
    os.link(p("dir1/dir2/dir3/file1"), p("dir1/dir2/dir3/dir4/file11"))
    os.rename(p("dir1/dir2/dir3/dir4"), p("dir1/dir6/dir44"))
    os.rename(p("dir1/dir2/dir3/file1"), p("dir1/dir2/dir3/dir4"))


fstests(
    "147",
    "a file renamed to a moved directory's old name and hard-linked inside it",
    _147_setup,
    _147_change,
    cross={"dir1": "x", "dir5": "y"},
)


# btrfs/155: several links of two files renamed, one taking a path another inode had.
def _155_setup(p):
    put(p("a/f1"))
    os.makedirs(p("a/b/c"))
    os.link(p("a/f1"), p("a/b/c/f1l1"))
    put(p("a/b/f2"))
    os.mkdir(p("d"))
    os.rename(p("a/b/c/f1l1"), p("d/f1l1_2"))
    os.link(p("a/b/f2"), p("a/f2l1"))
    os.link(p("a/b/f2"), p("d/f2l2"))
    os.rename(p("a/f1"), p("d/f1_2"))


def _155_change(p):
    os.rename(p("d"), p("a/b/d2"))
    os.rename(p("a/f2l1"), p("d"))
    os.mkdir(p("a/f2l1"))
    os.link(p("a/b/d2/f1_2"), p("a/b/f1l2"))
    os.rename(p("a/b"), p("a/f2l1/b2"))
    os.rename(p("a/f2l1/b2/d2"), p("a/f2l1/b2/c/d3"))
    os.rename(p("a/f2l1/b2/c/d3/f2l2"), p("a/f2l1/b2/c/d3/f2l2_2"))


fstests(
    "155",
    "hard links renamed so one takes the path of a moved directory",
    _155_setup,
    _155_change,
    cross={"a": "x", "d": "y"},
)


# btrfs/169: a hole punched into a preallocated range past the end of a file.
def _169_setup(p):
    fallocate(p("foobar"), KEEP_SIZE, 0, 4 * M)
    pwrite(p("foobar"), 0, b"\xea" * M)


def _169_change(p):
    fallocate(p("foobar"), KEEP_SIZE | PUNCH_HOLE, M, 2 * M)


fstests(
    "169",
    "a hole punched in a preallocated extent beyond EOF",
    _169_setup,
    _169_change,
    needs=("prealloc", "punch_hole"),
)


# btrfs/178: many directories whose ancestor/descendant relations are all inverted.
# (Directory names are the inode numbers fstests had; they are only names here.)
def _178_setup(p):
    def mv(a, b):
        os.rename(p(a), p(b))

    for d in ("257", "258"):
        os.mkdir(p(d))
    mv("257", "258/257")
    for d in range(259, 265):
        os.mkdir(p(str(d)))
    mv("258", "264/258")
    os.mkdir(p("265"))
    os.mkdir(p("266"))
    for d in ("259", "260", "264", "265"):
        mv(d, f"266/{d}")
    os.mkdir(p("266/260/267"))
    os.mkdir(p("266/268"))
    os.mkdir(p("266/269"))
    mv("262", "266/269/262")
    os.mkdir(p("266/270"))
    os.mkdir(p("271"))
    mv("266", "271/266")
    os.mkdir(p("271/266/272"))
    mv("263", "271/266/272/263")
    os.mkdir(p("273"))
    os.mkdir(p("271/266/274"))
    mv("273", "271/266/274/273")
    os.mkdir(p("271/266/272/275"))
    mv("271", "261/271")
    put(p("261/271/266/260/267/leaf"))


def _178_change(p):
    def mv(a, b):
        os.rename(p(a), p(b))

    top = "261/271/266"
    mv(f"{top}/272/275", "275")
    mv(f"{top}/274", "275/274")
    mv(f"{top}/269/262", "275/274/273/262")
    mv(f"{top}/269", "275/274/273/262/269")
    mv(f"{top}/264/258/257", f"{top}/272/257")
    mv(f"{top}/264/258", "275/274/273/262/269/258")
    mv("261/271", "275/274/273/262/269/258/271")
    low = "275/274/273/262/269/258/271"
    mv(f"{low}/266/268", f"{low}/268")
    mv(f"{low}/266/260/267", f"{low}/268/267")
    mv(f"{low}/266/270", f"{low}/268/267/270")
    mv(f"{low}/266/265", f"{low}/266/259/265")
    mv(f"{low}/266/259", f"{low}/268/267/270/259")
    mv(f"{low}/266/272/263", f"{low}/266/264/263")
    mv(f"{low}/266/272", f"{low}/268/267/270/272")
    mv(f"{low}/266/260", f"{low}/268/267/270/272/257/260")
    mv(f"{low}/266/264", f"{low}/268/267/270/272/257/264")
    mv("261", f"{low}/268/267/270/272/257/264/263/261")
    mv(f"{low}/266", f"{low}/268/267/270/272/257/264/263/261/266")


fstests(
    "178",
    "every ancestor/descendant relation among twenty directories inverted",
    _178_setup,
    _178_change,
    cross={"261": "x", "275": "y"},
)


# btrfs/203: a file grown and given an extent shared with itself across a hole.
def _203_setup(p):
    pwrite(p("foobar"), 0, b"\xf1" * (64 * K))


def _203_change(p):
    for i, byte in enumerate(b"\xab\xcd\xef\x64\x73"):
        pwrite(p("foobar"), 512 * K + i * 64 * K, bytes([byte]) * (64 * K))
    clone_range(p("foobar"), 448 * K, p("foobar"), 192 * K, 192 * K)


fstests(
    "203",
    "a grown file shares, within itself, a range that starts in a hole",
    _203_setup,
    _203_change,
    needs=("reflink",),
)


# btrfs/221: a file swaps name and place with the directory it lived in, and gains a link
# with a third file's old name.
def _221_setup(p):
    put(p("a"))
    put(p("b"))
    os.mkdir(p("testdir"))
    os.rename(p("a"), p("testdir/a"))


def _221_change(p):
    os.rename(p("testdir/a"), p("a2"))
    put(p("testdir/a"))
    os.rename(p("b"), p("b2"))
    os.link(p("a2"), p("b"))
    os.rename(p("testdir"), p("testdir_2"))
    os.rename(p("a2"), p("testdir"))


fstests(
    "221",
    "a file takes the name of its old directory and a link with another file's name",
    _221_setup,
    _221_change,
    cross={"testdir": "x", "b": "x", "a": "y", "a2": "y", "b2": "y", "testdir_2": "y"},
)


# btrfs/222: one file's two links swap names and places with a directory and its subdirectory.
def _222_setup(p):
    put(p("f1"))
    put(p("f2"))
    os.makedirs(p("d1/d2"))


def _222_change(p):
    os.link(p("f2"), p("d1/f2_link"))
    os.rename(p("f1"), p("d1/d2/f1"))
    os.rename(p("d1"), p("tmp"))
    os.rename(p("f2"), p("d1"))
    os.rename(p("tmp"), p("f2"))
    os.rename(p("f2/d2"), p("tmp"))
    os.rename(p("f2/f2_link"), p("f2/d2"))
    os.rename(p("tmp"), p("f2/f2_link"))


fstests(
    "222",
    "two links of a file swap places with a directory and its child",
    _222_setup,
    _222_change,
    cross={"f1": "x", "d1": "x", "f2": "y", "tmp": "y"},
)


# btrfs/227: a directory and its files removed, a new file made (fstests also reuses the
# directory's inode number after a remount); here a file also takes the directory's name.
def _227_setup(p):
    for f in ("file1", "file2", "file3"):
        put(p(f"dir/{f}"))


def _227_change(p):
    shutil.rmtree(p("dir"))
    put(p("newfile"))
    put(p("dir"))


fstests("227", "a directory removed with its files; new files, one with its name", _227_setup, _227_change)


# btrfs/241: files with several links renamed so one takes a directory's old place and another
# a file's old place inside that directory.
def _241_setup(p):
    for f in ("file1", "file2", "file3"):
        put(p(f))
    os.mkdir(p("A"))
    os.link(p("file3"), p("A/hard_link"))


def _241_change(p):
    os.rename(p("file1"), p("A/file1"))
    os.rename(p("A/hard_link"), p("tmp"))
    os.rename(p("file2"), p("A/hard_link"))
    os.rename(p("A"), p("B"))
    os.link(p("B/hard_link"), p("A"))


fstests(
    "241",
    "a hard link takes a renamed directory's old name",
    _241_setup,
    _241_change,
    cross={"A": "x", "file3": "x", "file1": "y", "file2": "y", "tmp": "y", "B": "y"},
)


# btrfs/272: a file with 2000 links (so some are extended refs) loses them all and gets
# half of them back.
def _272_setup(p):
    put(p("foo"))
    for i in range(1, 2001):
        os.link(p("foo"), p(str(i)))


def _272_change(p):
    for i in range(1, 2001):
        os.unlink(p(str(i)))
    for i in range(1001, 2001):
        os.link(p("foo"), p(str(i)))


fstests("272", "2000 hard links removed and 1000 of them made again", _272_setup, _272_change)


# btrfs/322: a file shrunk to nothing, then a whole file with an unaligned size cloned into it.
def _322_setup(p):
    pwrite(p("foo"), 0, b"\xab" * (128 * K), sync=True)
    pwrite(p("foo"), 128 * K, b"\xcd" * (128 * K + 5), sync=True)
    pwrite(p("bar"), 0, b"\xef" * M)


def _322_change(p):
    os.truncate(p("bar"), 0)
    clone_file(p("foo"), p("bar"))


fstests(
    "322",
    "a truncated file made a clone of one whose size is not block aligned",
    _322_setup,
    _322_change,
    needs=("reflink",),
)


# btrfs/338: two directories holding 1000 links each of one file are removed.
def _338_setup(p):
    os.mkdir(p("a"))
    os.mkdir(p("b"))
    put(p("a/foo"))
    for i in range(1, 1001):
        os.link(p("a/foo"), p(f"a/foo.{i}"))
        os.link(p("a/foo"), p(f"b/foo.{i}"))


def _338_change(p):
    shutil.rmtree(p("a"))
    shutil.rmtree(p("b"))


fstests(
    "338",
    "two directories of interleaved hard links (extended refs) removed",
    _338_setup,
    _338_change,
    cross={"a": "x", "b": "y"},
)


# ---------------------------------------------------------------------------
# cases found by replicating real sources
# ---------------------------------------------------------------------------
def _m1_setup(p):
    put(p("q/d1/p/c/f"))


def _m1_change(p):
    os.rename(p("q/d1/p"), p("q/d1/q"))
    os.mkdir(p("q/d1/p"))
    os.rename(p("q/d1/q/c"), p("q/d1/p/c"))


ours(
    "m1-renamed-dir-new-dir-takes-name-child-moves-in",
    "a directory renamed, a new one made with its old name, its child directory moved into the new one",
    _m1_setup,
    _m1_change,
)


def _m2_setup(p):
    put(p("q/p/f"))


def _m2_change(p):
    os.rename(p("q/p"), p("q/q"))
    os.mkdir(p("q/p"))
    os.rename(p("q/q/f"), p("q/p/f"))


ours(
    "m2-renamed-dir-new-dir-takes-name-file-moves-in",
    "a directory renamed, a new one made with its old name, its file moved back to the same path",
    _m2_setup,
    _m2_change,
)


def _m3_setup(p):
    put(p("q/n/p1/p2/f"), b"the bytes of n/p1/p2/f\n")
    put(p("q/p1/p2/f"), b"the bytes of p1/p2/f, longer\n")


def _m3_change(p):
    os.rename(p("q/n/p1"), p("q/t"))  # swap n/p1 and p1
    os.rename(p("q/p1"), p("q/n/p1"))
    os.rename(p("q/t"), p("q/p1"))
    os.rename(p("q/n/p1/p2"), p("q/t"))  # then swap their p2 children back
    os.rename(p("q/p1/p2"), p("q/n/p1/p2"))
    os.rename(p("q/t"), p("q/p1/p2"))


ours(
    "m3-swapped-dirs-children-swapped-back",
    "two directories swapped, their same-named children swapped back: paths unchanged, parents changed",
    _m3_setup,
    _m3_change,
)


def _m5_setup(p):
    put(p("q/d/p/f"))
    put(p("q/d/s/g"))


def _m5_change(p):
    os.rename(p("q/d/p"), p("q/d/q"))
    os.rename(p("q/d/s"), p("q/d/p"))
    os.rename(p("q/d/q/f"), p("q/d/p/f"))


ours(
    "m5-renamed-dir-sibling-takes-name-file-moves-in",
    "a directory renamed, a sibling renamed to its old name, its file moved into the sibling",
    _m5_setup,
    _m5_change,
)


def _084r_change(p):
    _084_change(p)
    os.rmdir(p("n1"))  # emptied by the moves above


fstests(
    "084",
    "the roots of two same-path subtrees swapped, an emptied directory removed",
    _084_setup,
    _084r_change,
    cross={"n1": "x", "p1": "x", "n4": "y", "p2": "y"},
    variant="emptied",
)


def _m4_setup(p):
    put(p("a/p/c/f"))
    put(p("b/other"))


def _m4_change(p):
    os.rename(p("a/p"), p("b/p"))
    os.mkdir(p("a/p"))
    os.rename(p("b/p/c"), p("a/p/c"))


ours(
    "m4-dir-to-other-qtree-new-dir-child-moves-back",
    "a/p moves to qtree b, a new a/p is made and its old child moves back into it",
    _m4_setup,
    _m4_change,
    qtrees=("a", "b"),
)


def _m6_setup(p):
    put(p("a/p/c/f"), b"the bytes of a/p/c/f\n")
    put(p("b/p/c/f"), b"the bytes of b/p/c/f, longer\n")


def _m6_change(p):
    os.rename(p("a/p"), p("b/t"))  # swap a/p and b/p across the qtrees
    os.rename(p("b/p"), p("a/p"))
    os.rename(p("b/t"), p("b/p"))
    os.rename(p("a/p/c"), p("b/t"))  # then swap their children back
    os.rename(p("b/p/c"), p("a/p/c"))
    os.rename(p("b/t"), p("b/p/c"))


ours(
    "m6-dirs-swapped-across-qtrees-children-swapped-back",
    "a/p and b/p swapped across qtrees, their children swapped back: paths unchanged",
    _m6_setup,
    _m6_change,
    qtrees=("a", "b"),
)


def _hl1_setup(p):
    put(p("q/x/f"), b"before\n")
    os.makedirs(p("q/y"))
    os.link(p("q/x/f"), p("q/y/g"))


def _hl1_change(p):
    append(p("q/y/g"), b"appended through the second link\n")


ours(
    "hardlink-appended-through-other-link",
    "a file with two links in one qtree appended through one",
    _hl1_setup,
    _hl1_change,
)


def _hl2_setup(p):
    put(p("a/f"), b"before\n")
    os.link(p("a/f"), p("a/f2"))
    os.link(p("a/f"), p("b/g"))


def _hl2_change(p):
    append(p("b/g"), b"appended through the link in qtree b\n")


ours(
    "hardlink-across-qtrees-appended",
    "a file linked from two qtrees appended through the link in one",
    _hl2_setup,
    _hl2_change,
    qtrees=("a", "b"),
)


# 255 bytes each: 2-, 3- and 4-byte UTF-8 characters
LONG_2 = "é" * 127 + "a"
LONG_3 = "€" * 85
LONG_4 = "𝄞" * 63 + "xyz"
assert {len(os.fsencode(n)) for n in (LONG_2, LONG_3, LONG_4)} == {255}


def _u_setup(p):
    put(p(f"q/{LONG_2}"))
    put(p(f"q/{LONG_3}/{LONG_4}"))
    put(p("q/plain"))


def _u_deleted(p):
    os.unlink(p(f"q/{LONG_2}"))
    shutil.rmtree(p(f"q/{LONG_3}"))


def _u_renamed(p):
    os.rename(p(f"q/{LONG_2}"), p(f"q/{LONG_3}/{LONG_2}"))
    os.rename(p(f"q/{LONG_3}"), p(f"q/{LONG_4}"))


def _u_created(p):
    put(p(f"q/plain-dir/{LONG_2}"))
    os.mkdir(p(f"q/{LONG_4}"))
    os.symlink(LONG_3, p(f"q/{LONG_4}/{LONG_3}"))


ours(
    "utf8-255-byte-names-deleted",
    "a file and a directory with 255-byte multi-byte UTF-8 names deleted",
    _u_setup,
    _u_deleted,
)
ours(
    "utf8-255-byte-names-renamed",
    "255-byte multi-byte UTF-8 names renamed into and as directories",
    _u_setup,
    _u_renamed,
)
ours(
    "utf8-255-byte-names-created",
    "a file, a directory and a symlink with 255-byte UTF-8 names created",
    _u_setup,
    _u_created,
)


# ---------------------------------------------------------------------------
# running scenarios through coalesce
# ---------------------------------------------------------------------------
class KeepSourcePcpis:
    """Plugin: skips the agent's releases of source PCPIs, so a native control can send between them
    (the test's volume clean-up removes them).  Set ``source`` to the source volume's handle."""

    def __init__(self) -> None:
        self.source: Any = None

    @hookimpl(tryfirst=True)
    def coalesce_snapshot_delete(self, volume: Any, name: str) -> bool | None:
        return False if volume is self.source else None


@attrs.frozen
class Outcome:
    old: str  # the source PCPI of the baseline
    new: str  # the source PCPI of the incremental
    baseline: dict[str, Any]  # the two cycles' history rows
    incremental: dict[str, Any]


def drive(harness: Any, scenarios: Mapping[str, Scenario]) -> Outcome:
    """Every setup, a baseline cycle, every change, one incremental cycle.

    ``scenarios`` maps a tag to a scenario; its qtrees are tag + qtree, and
    the harness's group has one replica of each (:meth:`Scenario.replicas`)."""
    root = harness.agent.source.handle.root
    for tag, sc in scenarios.items():
        for q in sc.replicas(tag):
            os.makedirs(os.path.join(root, q), exist_ok=True)
    for tag, sc in scenarios.items():
        sc.setup(sc.paths(root, tag))
    baseline = harness.cycle()
    old = _last_source_pcpi(harness)
    for tag, sc in scenarios.items():
        sc.change(sc.paths(root, tag))
    incremental = harness.cycle()
    new = _last_source_pcpi(harness)
    assert new != old, "the incremental cycle took no source PCPI"
    return Outcome(old, new, baseline, incremental)


def _last_source_pcpi(harness: Any) -> str:
    taken = list(harness.writer.snapshots)  # the harness records every source PCPI as it is taken
    assert taken, "no source PCPI was taken"
    return taken[-1]
