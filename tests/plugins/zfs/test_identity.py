"""Identity in the zfs backend's diff (coalesce_zfs.identity): an object is its object number and
generation, never its path.

The first part needs no pool: the pieces of coalesce_zfs.identity on local
directories.  The second (marked zfs) runs cases on a real zfs-fuse dataset
(docs/real-backends.md, "ZFS: identity"): it builds source qtrees, runs one
cycle, changes the qtrees so that paths and objects part ways (a directory
replaced under the same path, children moved between same-named
directories, swaps across qtrees, hard links written through one name, an
object number reused with a new generation, times set back), runs one more
cycle and compares every exported replica with its source qtree
(tests/trees.py: names, kinds, modes, owners, sizes, contents, xattrs, times
and hard-link groups).  I3: an export equals its source PCPI.  All cases
share one group per configuration: a zfs or a btrfs destination, the data
of changed files from ``zfs send -i`` or read from the images, and the walk
pruned as on OpenZFS by an emulated ``zfs diff`` (zfs-fuse has none).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

import attrs
import pytest
from groups import group_toml
from trees import assert_same

import coalesce_zfs
from coalesce_core.agent import Agent
from coalesce_core.config import parse_config
from coalesce_core.stream.records import ROOT, MkFile, SetAttr, Truncate, Unlink, Write
from coalesce_posix import walk
from coalesce_zfs import identity


# ---------------------------------------------------------------------------------------------------
# without a pool
# ---------------------------------------------------------------------------------------------------
def test_stamped_gives_a_setattr_to_every_entry_the_records_touch(tmp_path):
    """A written file, the directories entries were made in or removed from (the qtree root too) get
    a SetAttr from the target image, deepest first; an entry that already has one gets no second."""
    t = tmp_path / "t"
    (t / "d" / "e").mkdir(parents=True)
    for rel in ("f", "d/new", "d/e/g"):
        (t / rel).write_bytes(b"x")
    for i, rel in enumerate(("f", "d", "d/e", "d/new", "")):
        os.utime(t / rel, ns=(0, 1_600_000_000_000_000_000 + i))
    records = [
        Unlink(path="gone"),
        MkFile(path="d/new"),
        Write(path="d/new", offset=0, data=b"x"),
        Write(path="f", offset=0, data=b"x"),
        Truncate(path="d/e/g", size=1),
        SetAttr(path="d/new", mtime_ns=5),
        SetAttr(path="d/e/g", mtime_ns=6),
    ]
    out = list(walk.stamped(iter(records), str(t)))
    assert out[: len(records)] == records
    added = out[len(records) :]
    assert [r.path for r in added] == ["d", "f", ROOT]
    assert [r.mtime_ns for r in added] == [
        1_600_000_000_000_000_001,
        1_600_000_000_000_000_000,
        1_600_000_000_000_000_004,
    ]
    assert list(walk.stamped(iter([SetAttr(path="f", mtime_ns=1)]), str(t))) == [SetAttr(path="f", mtime_ns=1)]


def test_prune_for(tmp_path):
    """The directories at or above a named path, and any directory that is another object at its
    path in the two images; nothing pruned when a named file has several links or a named path is
    in neither image."""
    b, t = tmp_path / "b", tmp_path / "t"
    for side in (b, t):
        (side / "Q" / "d" / "e").mkdir(parents=True)
        (side / "Q" / "f").write_bytes(b"x")
    prune = identity.prune_for({"Q/f"}, "Q", str(b), str(t))
    assert set(prune) == {"", "f"}
    assert "d" in prune and "d/e" in prune  # other directory objects at those paths
    same = identity.prune_for({"Q/f"}, "Q", str(b), str(b))
    assert "d" not in same and "d/e" not in same  # the same objects: pruned
    assert identity.prune_for({"Q/nowhere"}, "Q", str(b), str(t)) is None
    os.link(t / "Q" / "f", t / "Q" / "d" / "f2")
    assert identity.prune_for({"Q/f"}, "Q", str(b), str(t)) is None
    assert identity.prune_for({"Q/d"}, "Q", str(b), str(t)) is not None


def test_prune_for_a_removed_name_whose_parent_is_a_symlink_in_the_target(tmp_path):
    """``zfs diff`` names Q/a/s/f, removed; in the target Q/a is a symlink to itself: the name is in the
    base only (it failed with ELOOP), and a symlink to a directory holding a linked file is no way to
    that file either (a name of one image never resolves through a symlink of the other)."""
    b, t = tmp_path / "b", tmp_path / "t"
    (b / "Q" / "a" / "s").mkdir(parents=True)
    (b / "Q" / "a" / "s" / "f").write_bytes(b"x")
    (t / "Q").mkdir(parents=True)
    os.symlink("a", t / "Q" / "a")
    assert identity.prune_for({"Q/a/s/f"}, "Q", str(b), str(t)) is not None
    (t / "Q" / "b" / "s").mkdir(parents=True)
    (t / "Q" / "b" / "s" / "f").write_bytes(b"x")
    os.link(t / "Q" / "b" / "s" / "f", t / "Q" / "g")
    os.remove(t / "Q" / "a")
    os.symlink("b", t / "Q" / "a")
    assert identity.prune_for({"Q/a/s/f"}, "Q", str(b), str(t)) is not None


# ---------------------------------------------------------------------------------------------------
# on a real zfs-fuse pool
# ---------------------------------------------------------------------------------------------------
def sh(script: str, cwd: str, env: dict[str, str]) -> None:
    subprocess.run(["bash", "-ec", script], cwd=cwd, check=True, env={**os.environ, **env})


def remount(dataset: str) -> None:
    """Unmount and mount a dataset: ZFS then allocates object numbers from the lowest free one again,
    so a new file takes the number of the newest removed one (with a new generation)."""
    subprocess.run(["zfs", "umount", dataset], check=True)
    subprocess.run(["zfs", "mount", dataset], check=True)


def object_id(path: str) -> tuple[int, int]:
    """(object number, generation) of an entry on zfs-fuse, from its NFS file handle
    (name_to_handle_at): FUSE encodes the node id as two 32-bit words, then the generation (ZFS's
    zp_gen, the txg that created the object)."""

    class Handle(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("data", ctypes.c_ubyte * 128)]

    libc = ctypes.CDLL(None, use_errno=True)
    h, mount_id = Handle(128, 0), ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(h), ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
    hi, lo, gen = (int.from_bytes(bytes(h.data[i : i + 4]), "little") for i in (0, 4, 8))
    return (hi << 32) | lo, gen


#: name: (qtrees, set-up script, change script); the scripts run in the source volume's root, with a
#: shell variable per qtree holding its name in the shared group ($Q, $a, $b)
CASES = {
    "M1-dir-replaced-child-moved-back": (
        ["Q"],
        "mkdir -p $Q/d1/p/c; echo f > $Q/d1/p/c/f",
        "mv $Q/d1/p $Q/d1/q; mkdir $Q/d1/p; mv $Q/d1/q/c $Q/d1/p/c",
    ),
    "M2-dir-replaced-file-moved-back": (
        ["Q"],
        "mkdir -p $Q/p; echo f > $Q/p/f",
        "mv $Q/p $Q/q; mkdir $Q/p; mv $Q/q/f $Q/p/f",
    ),
    "M5-dir-replaced-by-sibling": (
        ["Q"],
        "mkdir -p $Q/d/p $Q/d/s; echo pf > $Q/d/p/f; echo s > $Q/d/s/g",
        "mv $Q/d/p $Q/d/q; mv $Q/d/s $Q/d/p; mv $Q/d/q/f $Q/d/p/f",
    ),
    "M3-dirs-swapped-children-swapped-back": (
        ["Q"],
        "mkdir -p $Q/n/p1/p2 $Q/p1/p2; echo AAAA > $Q/n/p1/p2/f; echo BBBB > $Q/p1/p2/f",
        "mv $Q/n/p1 $Q/tmp; mv $Q/p1 $Q/n/p1; mv $Q/tmp $Q/p1; "
        "mv $Q/p1/p2 $Q/tmp2; mv $Q/n/p1/p2 $Q/p1/p2; mv $Q/tmp2 $Q/n/p1/p2",
    ),
    "M3b-dirs-swapped-grandchildren-same-paths": (
        ["Q"],
        "mkdir -p $Q/a/s/t $Q/b/s/t; echo AAAA > $Q/a/s/t/f; echo BBBB > $Q/b/s/t/f",
        "mv $Q/a $Q/tmp; mv $Q/b $Q/a; mv $Q/tmp $Q/b",
    ),
    "M4-moved-to-another-qtree-child-moved-back": (
        ["a", "b"],
        "mkdir -p $a/p/c; echo x > $a/p/c/f",
        "mv $a/p $b/p; mkdir $a/p; mv $b/p/c $a/p/c",
    ),
    "M6-swapped-across-qtrees-children-swapped-back": (
        ["a", "b"],
        "mkdir -p $a/p/c $b/p/c; echo aa > $a/p/c/f; echo bb > $b/p/c/f",
        "mv $a/p $a/t; mv $b/p $a/p; mv $a/t $b/p; mv $a/p/c $a/c2; mv $b/p/c $a/p/c; mv $a/c2 $b/p/c",
    ),
    "hard-link-appended-other-link-in-another-qtree": (
        ["a", "b"],
        "mkdir $a/d $b/e; echo 1 > $a/d/x; ln $a/d/x $b/e/y; echo 2 > $a/z",
        "echo more >> $a/d/x",
    ),
    "hard-link-appended-other-link-in-a-moved-dir": (
        ["a"],
        "mkdir $a/d $a/e; echo 1 > $a/d/x; ln $a/d/x $a/e/y",
        "echo more >> $a/e/y; mv $a/d $a/d2",
    ),
    "hard-link-new-name-before-the-kept-one": (
        ["a"],
        "mkdir $a/k; echo 1 > $a/k/y",
        "ln $a/k/y $a/b; echo more >> $a/b",
    ),
    "file-rewritten-mtime-set-back": (
        ["Q"],
        "echo aaaa > $Q/f; touch -d @1600000000 $Q/f",
        "echo bbbb > $Q/f; touch -d @1600000000 $Q/f",
    ),
    "entry-added-dir-mtime-set-back": (
        ["Q"],
        "mkdir -p $Q/d; touch -d @1600000000 $Q/d",
        "echo x > $Q/d/new; touch -d @1600000000 $Q/d",
    ),
    "entry-added-root-mtime-set-back": (
        ["Q"],
        "echo x > $Q/old; touch -d @1600000000 $Q",
        "rm $Q/old; echo x > $Q/new; touch -d @1600000000 $Q",
    ),
    "dir-replaced-same-name-same-mtime": (
        ["Q"],
        "mkdir -p $Q/d/s; echo one > $Q/d/f; echo kk > $Q/d/s/g; touch -d @1600000000 $Q/d/s $Q/d",
        "mv $Q/d $Q/old; mkdir -p $Q/d/s; echo two > $Q/d/f; echo KK > $Q/d/s/g; "
        "touch -d @1600000000 $Q/d/s $Q/d; rm -r $Q/old",
    ),
    # the newest file removed and another made at its name after a remount (REUSED below): it takes
    # the old object number with a new generation, the same size and mtime, and holes where the old
    # one had data; nothing of the old file's bytes may survive
    "object-number-reused": (
        ["Q"],
        "echo keep > $Q/k; head -c 300000 /dev/urandom > $Q/x; touch -d @1600000000 $Q/x",
        "truncate -s 300000 $Q/x; printf tail | dd of=$Q/x bs=1 seek=200000 conv=notrunc status=none; "
        "touch -d @1600000000 $Q/x",
    ),
}
REUSED = "object-number-reused"
#: the cases that change a file with several links: `zfs diff` names it by one name, so nothing of its
#: dataset is pruned; the pruned runs keep them in a dataset of their own
LINKED = (
    "hard-link-appended-other-link-in-another-qtree",
    "hard-link-appended-other-link-in-a-moved-dir",
    "hard-link-new-name-before-the-kept-one",
)


@attrs.frozen
class Config:
    dest: str  # the destination backend
    mode: str  # where the data of changed files come from: `zfs send -i` or the images
    pruned: bool  # the walk is pruned by an emulated `zfs diff`, as on OpenZFS
    cases: tuple[str, ...]


CONFIGS = {
    "zfs-send": Config("zfs", "send", False, tuple(CASES)),
    "btrfs-send": Config("btrfs", "send", False, tuple(CASES)),
    "zfs-walk": Config("zfs", "walk", False, tuple(CASES)),
    "zfs-pruned": Config("zfs", "send", True, tuple(n for n in CASES if n not in LINKED)),
    "zfs-pruned-links": Config("zfs", "send", True, LINKED),
}


def _objects(root: str) -> dict[int, tuple[int, int, list[str]]]:
    """object number -> (generation, ctime, sorted names) of every entry below an image's root."""
    out: dict[int, tuple[int, int, list[str]]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            number, gen = object_id(full)
            assert number == st.st_ino
            out.setdefault(st.st_ino, (gen, st.st_ctime_ns, []))[2].append(os.path.relpath(full, root))
    for entry in out.values():
        entry[2].sort()
    return out


def emulated_zfs_diff(self, base: str, target: str) -> set[str]:
    """What OpenZFS's `zfs diff` names between two PCPIs (zfs-fuse has none): every object in one image
    only, or with another generation, or whose ctime is not older than the base PCPI (a superset of
    the objects whose ctime moved: zfs-fuse's ctimes have whole seconds), each by ONE name on each side
    (zfs diff finds a name through the object's parent pointer; here the first in sorted order)."""
    created = (
        int(
            subprocess.run(
                ["zfs", "get", "-Hp", "-o", "value", "creation", f"{self.dataset}@{base}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        * 1_000_000_000
    )
    with self.image(base) as b, self.image(target) as t:
        before, after = _objects(b), _objects(t)
    out: set[str] = set()
    for number in before.keys() | after.keys():
        old, new = before.get(number), after.get(number)
        if old is not None and new is not None and old[0] == new[0] and new[1] < created:
            continue
        out.update(side[2][0] for side in (old, new) if side is not None)
    return out


@attrs.define
class Run:
    """One group with every case of a configuration in its own qtrees (``cNN-<qtree>``): a group costs
    seconds on zfs-fuse."""

    agent: Agent
    root: str  # the source volume's root
    reports: list[dict]  # the two cycles' history rows
    tags: dict[str, str]  # case -> its qtrees' prefix
    prunes: dict[str, object]  # qtree -> the prune set of its incremental diff
    reused: tuple[tuple[int, int], tuple[int, int]] | None  # object id of REUSED's x before and after

    def qtrees(self, name: str) -> dict[str, str]:
        return {q: self.tags[name] + q for q in CASES[name][0]}


def _run(config: Config, zfs_urls, btrfs_urls, meta) -> Run:
    tags = {name: f"c{i:02d}-" for i, name in enumerate(config.cases)}
    replicas = [tag + q for name, tag in tags.items() for q in CASES[name][0]]
    destination = zfs_urls("dst") if config.dest == "zfs" else btrfs_urls("dst")
    text = group_toml(zfs_urls("src"), destination, f"{meta}/meta", replicas)
    prunes: dict[str, object] = {}
    real = identity.prune_for

    def prune_for(changed, qtree, base, target):
        prunes[qtree] = real(changed, qtree, base, target)
        return prunes[qtree]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(identity, "prune_for", prune_for)
        if config.mode == "walk":
            mp.setenv("COALESCE_ZFS_DIFF", "walk")
        if config.pruned:
            mp.setattr(coalesce_zfs.ZfsVolume, "_zfs_diff", emulated_zfs_diff)
        agent = Agent.init(parse_config(text, str(meta / "group.toml")))
        root = agent.source.handle.root
        for r in replicas:
            os.makedirs(os.path.join(root, r))
        env = {name: {q: tags[name] + q for q in CASES[name][0]} for name in config.cases}
        for name in config.cases:
            sh(CASES[name][1], root, env[name])
        time.sleep(1.1)  # whole-second ctimes: the emulated `zfs diff` then names only what changed
        reports = [agent.run_once()]
        reused = None
        if REUSED in config.cases:
            x = os.path.join(root, tags[REUSED] + "Q", "x")
            before = object_id(x)
            os.unlink(x)  # nothing else was freed: its number is the lowest free one after the remount
            remount(agent.source.handle.dataset)
            sh(CASES[REUSED][2], root, env[REUSED])  # x is the first object made after the remount
            reused = (before, object_id(x))
        for name in config.cases:
            if name != REUSED:
                sh(CASES[name][2], root, env[name])
        reports.append(agent.run_once())
    return Run(agent, root, reports, tags, prunes, reused)


@pytest.fixture(scope="module")
def runs(zfs_urls_module, btrfs_urls_module, tmp_path_factory):
    """config name -> its Run, made when a test first asks for it (the tests go config by config)."""
    made: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in made:
            made[name] = _run(CONFIGS[name], zfs_urls_module, btrfs_urls_module, tmp_path_factory.mktemp(name))
        return made[name]

    yield get
    for r in made.values():
        r.agent.close()


@pytest.mark.zfs
@pytest.mark.parametrize("config,name", [(c, n) for c in CONFIGS for n in CONFIGS[c].cases])
def test_identity_case(runs, config, name):
    """I3: after the change and one cycle, every replica of the case is stable and its export equals
    its source qtree."""
    run = runs(config)
    for report in run.reports:
        assert report.get("failures") == 0, report
    for q in run.qtrees(name).values():
        r = run.agent.state.replicas[q]
        assert r.state == "stable", (q, r)
        assert_same(os.path.join(run.root, q), run.agent.export_path(q), what=f"{name}: replica {q}")


@pytest.mark.zfs
@pytest.mark.parametrize("config", [c for c in CONFIGS if REUSED in CONFIGS[c].cases])
def test_the_reused_object_number_case_reuses_one(runs, config):
    """The premise of REUSED: x has its old object number and a new generation."""
    (number, gen), (again, new_gen) = runs(config).reused
    assert again == number and new_gen > gen


@pytest.mark.zfs
@pytest.mark.parametrize("config", [c for c in CONFIGS if not CONFIGS[c].pruned])
def test_zfs_fuse_never_prunes(runs, config):
    """zfs-fuse has no `zfs diff`: the walk is never pruned there."""
    assert runs(config).prunes == {}


@pytest.mark.zfs
def test_pruning_walks_below_swapped_directories(runs):
    """`zfs diff` names the two swapped directories of M3b but not a/s below them, another directory
    object at the same path, which is walked all the same (and a/s/t below it)."""
    run = runs("zfs-pruned")
    prune = run.prunes[run.qtrees("M3b-dirs-swapped-grandchildren-same-paths")["Q"]]
    assert prune is not None and not set.__contains__(prune, "a/s") and "a/s" in prune and "a/s/t" in prune


@pytest.mark.zfs
def test_a_changed_file_with_several_links_turns_pruning_off(runs):
    """`zfs diff` names a changed file with several links by one name only: the directories of its
    other names would never be walked, so nothing of the dataset is pruned."""
    run = runs("zfs-pruned-links")
    assert run.prunes and all(p is None for p in run.prunes.values())
