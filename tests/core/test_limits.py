"""Inputs at the file system's limits, through the whole agent, on every backend.

Names of 255 bytes of multi-byte UTF-8, a 1,100-level directory tree, paths
longer than 4096 bytes and a 1 TiB sparse file are ordinary inputs (DESIGN §3):
each is created, changed, moved, hard-linked, removed, rolled back and purged
across cycles, on mem, sim, btrfs and zfs-fuse, and after every cycle every
replica must be ``stable`` at the newest source PCPI with an export equal to
its source qtree there (I3, I9) and to an independent model of what the test
wrote.  The group must keep running: a replica that fails, or an agent that
dies, fails the test.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

import pytest

from coalesce_core.backend.faults import Rule
from coalesce_core.stream import fingerprint as fp
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import Harness

BACKENDS = ["mem", "sim", pytest.param("btrfs", marks=pytest.mark.btrfs), pytest.param("zfs", marks=pytest.mark.zfs)]

#: 255 bytes each, in 2-, 3- and 4-byte UTF-8 characters
NAME_2 = "ü" * 127 + "x"
NAME_3 = "名" * 85
NAME_4 = "😀" * 63 + "abc"
DIR_3 = "目" * 85
DIR_3B = "目" * 84 + "xyz"

#: deeper than Python recurses (sys.getrecursionlimit(), 1,000), shallow enough that btrfs send, which
#: writes every path whole (the square of the depth), stays a few seconds per cycle
DEPTH = 1100
#: where the backend runs in this process (every local volume), the test lowers the recursion limit
#: of this process (the agent and the backend run in it) below a shallower tree instead: the work
#: per level grows with the depth (btrfs's native send, sim's path lookups), so 450 levels cost a
#: sixth of 1,100; a remote source's service is another process, with the default limit
LOCAL_DEPTH, LOCAL_RECURSION_LIMIT = 450, 350
TIB = 1 << 40


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def harness(backend, group_config, request):
    def make(replicas=("A", "B")) -> Harness:
        if backend in ("mem", "sim"):
            cfg = group_config(replicas=replicas, scheme=backend)
        else:
            urls = request.getfixturevalue(f"{backend}_urls")
            cfg = group_config(replicas=replicas, source_url=urls("src"), dest_url=urls("dst"))
        return Harness(cfg)

    return make


class File:
    """A regular file of the model: permission bits, size, data pieces {offset: bytes} (no overlaps)."""

    def __init__(self, mode: int = 0o644) -> None:
        self.mode = mode
        self.size = 0
        self.pieces: dict[int, bytes] = {}

    def write(self, offset: int, data: bytes) -> None:
        assert all(
            o + len(d) <= offset or offset + len(data) <= o or o == offset and len(d) <= len(data)
            for o, d in self.pieces.items()
        ), "the model keeps writes apart"
        self.pieces.pop(offset, None)
        self.pieces[offset] = data
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        kept = {}
        for o, d in self.pieces.items():
            if o < size:
                kept[o] = d[: size - o]
        self.pieces = kept
        self.size = size


class Source:
    """Changes one source qtree through the backend's own apply (``use_purgatory=False``) and keeps
    a model of it (path -> ("d", mode) | ("l", target) | File; a hard link is one File twice)."""

    def __init__(self, h: Harness, qtree: str) -> None:
        self.h = h
        self.qtree = qtree
        self.model: dict[str, File | tuple[Literal["d"], int] | tuple[Literal["l"], str]] = {}
        self.apply()

    def apply(self, *changes: object) -> None:
        volume = getattr(self.h, "local_source", None) or self.h.agent.source  # a remote source: its own volume
        volume.apply(self.qtree, R.framed(self.qtree, None, "limits", list(changes)), use_purgatory=False)

    def mkdirs(self, path: str) -> None:
        parts = path.split("/")
        recs = []
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in self.model:
                self.model[p] = ("d", 0o755)
                recs.append(R.MkDir(path=p, mode=0o755))
        self.apply(*recs)

    def write(self, path: str, offset: int, data: bytes, *, size: int | None = None) -> None:
        f = self.model.get(path)
        recs: list[object] = []
        if f is None:
            f = self.model[path] = File()
            recs.append(R.MkFile(path=path, mode=f.mode))
        assert isinstance(f, File)
        for o in range(0, len(data), 1 << 20):
            recs.append(R.Write(path=path, offset=offset + o, data=data[o : o + (1 << 20)]))
        f.write(offset, data)
        if size is not None:
            recs.append(R.Truncate(path=path, size=size))
            f.truncate(size)
        self.apply(*recs)

    def truncate(self, path: str, size: int) -> None:
        f = self.model[path]
        assert isinstance(f, File)
        f.truncate(size)
        self.apply(R.Truncate(path=path, size=size))

    def symlink(self, path: str, target: str) -> None:
        self.model[path] = ("l", target)
        self.apply(R.Symlink(path=path, target=target))

    def link(self, existing: str, path: str) -> None:
        self.model[path] = self.model[existing]
        self.apply(R.HardLink(path=path, existing=existing))

    def rename(self, old: str, new: str) -> None:
        moved = {p: v for p, v in self.model.items() if p == old or p.startswith(old + "/")}
        for p in moved:
            del self.model[p]
        for p, v in moved.items():
            self.model[new + p[len(old) :]] = v
        self.apply(R.Rename(old=old, new=new))

    def unlink(self, path: str) -> None:
        del self.model[path]
        self.apply(R.Unlink(path=path))

    def remove_tree(self, path: str) -> None:
        victims = sorted(
            (p for p in self.model if p == path or p.startswith(path + "/")), key=lambda p: p.count("/"), reverse=True
        )
        recs = [R.RmDir(path=p) if self.model[p] == ("d", 0o755) else R.Unlink(path=p) for p in victims]
        for p in victims:
            del self.model[p]
        self.apply(*recs)

    def expected(self) -> str:
        """The fingerprint of the model (independent of every backend's walk)."""
        entries = []
        for path, v in self.model.items():
            if isinstance(v, File):
                if v.size <= 64 << 20:
                    data = bytearray(v.size)
                    for o, d in v.pieces.items():
                        data[o : o + len(d)] = d
                    entries.append(fp.file_entry(path, v.mode, bytes(data)))
                else:
                    entries.append(fp.sparse_file_entry(path, v.mode, v.size, sorted(v.pieces.items())))
            elif v[0] == "d":
                entries.append(fp.Entry(path=path, kind="d", mode=v[1]))
            else:
                entries.append(fp.Entry(path=path, kind="l", target=v[1]))
        return fp.digest(entries)


def cycle_and_check(h: Harness, sources: dict[str, Source]) -> None:
    """One cycle, then: every replica stable at the newest source PCPI, exporting an image equal to
    its source qtree there and to the model; I1-I5, I8, I9 on the live volumes."""
    row = h.cycle()
    assert row, "the cycle did not run"
    latest = list(h.writer.snapshots)[-1]
    a = h.agent
    for name, r in sorted(a.state.replicas.items()):
        error = getattr(r, "last_error", None) or getattr(r, "error", "")
        assert r.state == "stable", f"{name}: {r.state} {error}"
        assert r.source_point == latest, (
            f"{name} exports {r.source_point}, not the newest source PCPI {latest} ({error})"
        )
        got = a.dest.fingerprint(name, r.exported)
        assert got == a.source.fingerprint(r.source_qtree, latest), f"{name} differs from its source"
        assert got == sources[r.source_qtree].expected(), f"{name} differs from the model"
    bad = [f for f in h.findings() if not f.ok and f.invariant != "I3-independent"]
    assert not bad, "; ".join(f"{f.invariant}: {f.detail}" for f in bad)


# ---------------------------------------------------------------------------------------- names
def test_names_are_255_bytes_of_multibyte_utf8(harness):
    """Create, write, rename, hard-link and delete entries whose names are 255 bytes of 2-, 3-
    and 4-byte UTF-8 (the destination parks deleted ones in its purgatory), across cycles (I3, I9)."""
    for n in (NAME_2, NAME_3, NAME_4, DIR_3, DIR_3B):
        assert len(n.encode()) == 255
    h = harness()
    A, B = Source(h, "A"), Source(h, "B")
    B.write("neighbour", 0, b"b")
    src = {"A": A, "B": B}
    A.mkdirs(f"{DIR_3}/{DIR_3}")
    A.write(f"{DIR_3}/{NAME_3}", 0, b"three" * 1000)
    A.write(f"{DIR_3}/{DIR_3}/{NAME_2}", 0, b"two")
    A.symlink(NAME_4, f"{DIR_3}/{NAME_3}")
    cycle_and_check(h, src)

    A.write(f"{DIR_3}/{NAME_3}", 5000, b"more")
    A.rename(f"{DIR_3}/{NAME_3}", NAME_2)
    A.link(NAME_2, f"{DIR_3}/{NAME_4}")
    A.unlink(NAME_4)
    A.symlink(NAME_4, NAME_2)
    cycle_and_check(h, src)

    A.unlink(NAME_2)  # one name of two
    A.write(f"{DIR_3}/{NAME_4}", 6000, b"through the other name")
    cycle_and_check(h, src)

    A.unlink(f"{DIR_3}/{NAME_4}")  # the last name: the file is deleted
    A.unlink(NAME_4)
    A.rename(f"{DIR_3}/{DIR_3}", NAME_4)  # a directory of 255 bytes moves up, renamed
    cycle_and_check(h, src)

    A.remove_tree(NAME_4)
    A.remove_tree(DIR_3)
    A.write("after", 0, b"the replica keeps taking updates")
    B.write("neighbour", 1, b"c")
    cycle_and_check(h, src)


def test_purgatory_takes_entries_named_with_255_bytes(harness):
    """The destination's applier moves a replaced file and a replaced directory, both named with
    255 bytes of 3-byte UTF-8, to the purgatory; the purge empties it (the applier's own contract,
    on a qtree of the destination volume that no replica uses)."""
    h = harness(replicas=("A",))
    dest = h.agent.dest
    q = "scratch"

    def apply(*recs: object) -> None:
        dest.apply(q, R.framed(q, None, "limits", list(recs)), use_purgatory=True)

    apply(
        R.MkDir(path=DIR_3),
        R.MkDir(path=DIR_3B),
        R.MkFile(path=f"{DIR_3B}/{NAME_3}"),
        R.Write(path=f"{DIR_3B}/{NAME_3}", offset=0, data=b"kept"),
        R.MkFile(path=NAME_3),
        R.Write(path=NAME_3, offset=0, data=b"replaced"),
        R.MkFile(path="other"),
    )
    apply(
        R.Rename(old=DIR_3B, new=DIR_3),  # over the empty directory DIR_3
        R.Unlink(path=NAME_3),
        R.Rename(old="other", new=NAME_3),
    )
    want = fp.digest(
        [
            fp.Entry(path=DIR_3, kind="d", mode=0o755),
            fp.file_entry(f"{DIR_3}/{NAME_3}", 0o644, b"kept"),
            fp.file_entry(NAME_3, 0o644, b""),
        ]
    )
    assert dest.fingerprint(q) == want
    dest.purge_purgatory([q])
    assert dest.fingerprint(q) == want
    apply(R.Unlink(path=f"{DIR_3}/{NAME_3}"), R.RmDir(path=DIR_3))
    dest.purge_purgatory([q])
    assert dest.fingerprint(q) == fp.digest([fp.file_entry(NAME_3, 0o644, b"")])


# ---------------------------------------------------------------------------------------- depth
def _chain(top: str, depth: int, name: str = "d") -> str:
    return "/".join([top] + [name] * (depth - 1))


def test_a_tree_deeper_than_python_recurses(harness):
    """A tree deeper than Python recurses (450 levels under a recursion limit of 350 on a local
    volume; 1,100 levels through a remote source's service) is created, replicated, moved, written at the bottom, left half-applied
    by a failed update (rolled back: on btrfs the damaged qtree goes to the purgatory), purged,
    removed, and fingerprinted after every cycle; the group keeps running (I3, I9)."""
    h = harness()
    depth = DEPTH
    if str(h.agent.source.url).startswith(("mem:", "sim:", "btrfs:", "zfs:")):
        depth = LOCAL_DEPTH
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(LOCAL_RECURSION_LIMIT)
    try:
        _deep_tree(h, depth)
    finally:
        if depth == LOCAL_DEPTH:
            sys.setrecursionlimit(limit)


def _deep_tree(h: Harness, depth: int) -> None:
    assert depth > sys.getrecursionlimit()
    A, B = Source(h, "A"), Source(h, "B")
    B.write("neighbour", 0, b"b")
    src = {"A": A, "B": B}
    deep = _chain("t", depth)
    A.mkdirs(deep)
    A.write(f"{deep}/bottom", 0, b"deep" * 100)
    A.symlink(f"{deep}/link", "bottom")
    A.link(f"{deep}/bottom", "top-link")
    cycle_and_check(h, src)

    A.mkdirs("u")
    A.rename("t", "u/t")
    A.write(f"u/{deep}/bottom", 400, b"appended")
    cycle_and_check(h, src)

    A.mkdirs(_chain("v", depth))  # cut part-way: the update fails and rolls back
    rule = h.faults.add(Rule(hook="coalesce_diff", qtree="A", record=depth // 2 + 200, times=1, volume="src"))
    h.cycle()
    assert rule.fired == 1
    assert h.agent.state.replicas["A"].state == "stable"
    bad = [f for f in h.findings() if not f.ok and f.invariant != "I3-independent"]
    assert not bad, "; ".join(f"{f.invariant}: {f.detail}" for f in bad)
    cycle_and_check(h, src)  # purges the purgatory, then catches up

    A.remove_tree("u")
    A.remove_tree("v")
    B.write("neighbour", 1, b"c")
    cycle_and_check(h, src)


# ---------------------------------------------------------------------------------------- paths
def test_paths_longer_than_4096_bytes(harness):
    """Paths of about 6,000 bytes (25 directories of 240 bytes of 2-byte UTF-8): a file, a symlink
    and a hard link at the bottom, renamed, written and removed across cycles; and paths just
    short of 4096 bytes inside the qtree, which are longer than that from the file system's root
    (I3, I9)."""
    h = harness()
    A, B = Source(h, "A"), Source(h, "B")
    src = {"A": A, "B": B}
    long = "/".join(["ñ" * 120] * 25)
    assert len(long.encode()) > 6000
    A.mkdirs(long)
    A.write(f"{long}/file", 0, b"far down" * 100)
    A.write("top", 0, b"top")
    A.link("top", f"{long}/top-link")
    A.symlink(f"{long}/link", "file")
    near = "/".join(["m" * 200] * 20)  # 4019 bytes: 4096 with the path to the qtree
    A.mkdirs(near)
    A.write(f"{near}/file", 0, b"near" * 100)
    A.symlink(f"{near}/link", "file")
    cycle_and_check(h, src)

    A.rename(f"{long}/file", f"{long}/{NAME_3}")
    A.write(f"{long}/{NAME_3}", 800, b"more")
    A.mkdirs("x")
    A.rename(long.split("/")[0], "x/moved")
    cycle_and_check(h, src)

    A.remove_tree("x")
    cycle_and_check(h, src)

    A.write(f"{near}/file", 400, b"more")  # the long tree is gone: btrfs send serves the diff
    A.unlink(f"{near}/link")
    A.symlink(f"{near}/link", "other")
    A.rename(f"{near}/file", f"{near}/moved")
    A.write(f"{near}/new", 0, b"new")
    cycle_and_check(h, src)


# ---------------------------------------------------------------------------------------- sparse
def sparse_size(backend: str) -> int:
    """1 TiB, except on zfs-fuse (256 MiB): FUSE without lseek reports no holes, so every read of
    the file reads its zeros (about 0.7 GB/s; docs/real-backends.md), and the checks read it often."""
    return 1 << 28 if backend == "zfs" else TIB


def test_a_sparse_file_of_1_tib(harness, backend):
    """A sparse file of 1 TiB with a few data islands is replicated at the cost of its data, then an
    island is written, the file is truncated and extended again, and every check (fingerprints of
    source PCPIs, exports and active file systems) follows its holes (I3, I9)."""
    size = sparse_size(backend)
    h = harness()
    A, B = Source(h, "A"), Source(h, "B")
    src = {"A": A, "B": B}
    A.write("sparse", 0, b"head" * 1000)
    A.write("sparse", size // 3, os.urandom(200_000))
    A.write("sparse", size - 70_000, b"tail" * 1000, size=size)
    A.write("dense-zeros", 0, bytes(300_000))  # zeros written, not holes: digests like holes
    cycle_and_check(h, src)

    A.write("sparse", size // 2, b"a new island")
    cycle_and_check(h, src)

    A.truncate("sparse", size // 2 + 5)  # cuts the new island and drops the tail
    A.truncate("sparse", size)
    A.write("sparse", size - 10, b"0123456789")
    cycle_and_check(h, src)


def test_content_digest_does_not_depend_on_holes():
    """The content digest of bytes equals that of the same bytes given as pieces with holes, in
    any cut, and differs when a byte or the size differs."""
    data = bytearray(3 * fp.BLOCK + 1234)
    data[10:20] = b"x" * 10
    data[2 * fp.BLOCK - 3 : 2 * fp.BLOCK + 3] = b"yyyyyy"
    whole = fp.content_digest_of(bytes(data))
    assert whole == fp.content_digest_of_pieces(len(data), [(10, b"x" * 10), (2 * fp.BLOCK - 3, b"yyyyyy")])
    cut = fp.ContentDigest(len(data))
    for off in range(0, len(data), 777):
        cut.update(off, bytes(data[off : off + 777]))
    assert cut.hexdigest() == whole
    assert fp.content_digest_of(bytes(data), len(data) + 1) != whole
    data[11] = ord("z")
    assert fp.content_digest_of(bytes(data)) != whole
    assert fp.content_digest_of(b"") != fp.content_digest_of(b"\0")
    with pytest.raises(ValueError):
        cut = fp.ContentDigest(10)
        cut.update(5, b"a")
        cut.update(4, b"b")


# ---------------------------------------------------------------------------------------- file sizes
#: a sparse file of 2^62 bytes, the size of the hostile-source report (docs/network.md, "Threat model")
HUGE = 1 << 62


def huge_size(backend: str) -> int:
    """2^62 bytes, except on zfs-fuse, whose holes read as zeros (sparse_size)."""
    return sparse_size(backend) if backend == "zfs" else HUGE


class DigestMeter:
    """Counts the bytes every content digest is fed (fingerprint.ContentDigest.update): what the
    checks read of files, holes included if a path read them."""

    def __init__(self, monkeypatch) -> None:
        self.nbytes = 0
        update = fp.ContentDigest.update

        def counted(digest, offset, data):
            self.nbytes += len(data)
            return update(digest, offset, data)

        monkeypatch.setattr(fp.ContentDigest, "update", counted)


def run_verb(capsys, h: Harness, *args: str) -> tuple[int, str]:
    """`coalesce --config CONFIG ARGS` in this process (the read verbs run beside the agent)."""
    from coalesce_core.ui import cli as cli_mod

    assert h.config.path
    capsys.readouterr()
    rc = cli_mod.main(["--config", h.config.path, *args])
    return rc, capsys.readouterr().out


def assert_invariants(h: Harness) -> None:
    """I1-I5, I8, I9 on the live volumes (the writer's own record is not kept: Source writes the source)."""
    bad = [f for f in h.findings() if not f.ok and f.invariant != "I3-independent"]
    assert not bad, "; ".join(f"{f.invariant}: {f.detail}" for f in bad)


@pytest.mark.timeout(600)
def test_a_2_62_byte_sparse_file_is_checked_at_the_cost_of_its_data(harness, backend, monkeypatch, capsys):
    """A source file of 2^62 bytes (256 MiB on zfs-fuse, whose holes read as zeros; a second one
    of 1 TiB, smaller there too) with a few islands, one at its last byte:
    baseline, an update, `coalesce check` and `coalesce verify --full` all end, and the content
    digests of every check (the check before `done`, I3, I9, verify) are fed the islands only,
    never the holes (the timeout bounds a walk of the holes, which would never end)."""
    size = huge_size(backend)
    h = harness()
    A, B = Source(h, "A"), Source(h, "B")
    src = {"A": A, "B": B}
    meter = DigestMeter(monkeypatch)
    A.write("huge", 0, b"head" * 1000)
    A.write("huge", size // 5, os.urandom(100_000))
    A.write("huge", size - 1, b"!")
    B.write("small", 0, b"b")
    cycle_and_check(h, src)
    A.write("huge", size // 2, b"an island in the middle")
    A.write("other", min(1 << 40, size // 3), b"a second sparse file")  # zfs-fuse reads holes: keep it small
    cycle_and_check(h, src)
    rc, out = run_verb(capsys, h, "check")
    assert rc == 0, out
    rc, out = run_verb(capsys, h, "verify", "--full")
    assert rc == 0 and "A ok" in out and "B ok" in out, out
    if backend == "zfs":  # zfs-fuse reports no holes (no SEEK_DATA): its files are read whole, zeros too
        assert meter.nbytes < 64 * size, meter.nbytes
    else:  # every digest of the whole run was fed data, not holes: far below one 64 MiB read of a hole
        assert meter.nbytes < 64 << 20, meter.nbytes


@pytest.mark.parametrize("scheme", ["mem", "sim"])
@pytest.mark.parametrize("when", ["update", "baseline"])
def test_a_file_larger_than_the_destination_stores_fails_its_update_with_a_hint(group_config, scheme, when):
    """A source file legitimately larger than the destination stores (a 2 TiB sparse file, the
    destination declaring 1 TiB): the transfer fails with FileTooLarge naming the file, its size and
    the limit, before the record reaches the applier; an update takes the rollback path (the export
    and the active file system stay at the last good image), a baseline leaves the replica
    uninitialized; the neighbour replica is unaffected; once the file fits, the next cycle catches up."""
    h = Harness(group_config(replicas=("A", "B"), scheme=scheme))
    h.agent.dest.handle.max_file_size = TIB  # the test's destination stores 1 TiB per file
    assert h.agent.dest.max_file_size == TIB
    A, B = Source(h, "A"), Source(h, "B")
    B.write("neighbour", 0, b"b")
    if when == "update":
        A.write("small", 0, b"fits")
        h.cycle()
        before = h.agent.state.replicas["A"]
        assert before.state == "stable"
    A.write("huge", 2 * TIB - 4, b"tail")
    B.write("neighbour", 1, b"c")
    report = h.cycle()
    assert report["failures"] == 1
    (failure,) = h.agent.failures
    assert failure["replica"] == "A"
    assert failure["trigger"] == ("update_failed" if when == "update" else "baseline_failed")
    err = failure["error"]
    assert "FileTooLarge: file 'huge' would be 2199023255552 bytes (2 TiB; a Write of " in err  # the last block
    assert "stores files of at most 1099511627776 bytes (1 TiB)" in err
    assert "nothing past the limit was written" in err and "replicate the qtree to a destination" in err
    a = h.agent.state.replicas["A"]
    if when == "update":
        assert a.state == "stable" and a.source_point == before.source_point
        assert h.agent.dest.fingerprint("A", a.exported) == h.agent.source.fingerprint("A", before.source_point)
    else:
        assert a.state == "uninitialized"
    assert h.agent.dest.describe("A", None, [("huge", False)])[0].kind == "absent"
    b = h.agent.state.replicas["B"]
    assert b.state == "stable" and b.source_point == list(h.writer.snapshots)[-1]
    assert_invariants(h)
    A.truncate("huge", TIB)  # now it fits, to the byte
    assert h.cycle()["failures"] == 0
    a = h.agent.state.replicas["A"]
    assert a.state == "stable" and a.source_point == list(h.writer.snapshots)[-1]
    assert h.agent.dest.fingerprint("A", a.exported) == A.expected()
    assert_invariants(h)
