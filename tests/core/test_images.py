"""Reading retained generations through the backends' hooks (coalesce_core/images.py): the entries of a
replica's image in a generation, the paths changed between two images, and a restore out of one, on
every backend's volumes (real btrfs and zfs-fuse included; the verbs on mem and sim: tests/cli)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from backends import backend_fixtures

from coalesce_core import images
from coalesce_core.testing.harness import Harness

backend, group_config = backend_fixtures("mem", "sim", "btrfs", "zfs")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a directory."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


def test_a_generation_is_listed_diffed_and_restored_as_the_source_was(group_config, tmp_path):
    h = Harness(group_config(replicas=("A",), retention='keep_min = "30d"\nmax = 2'))
    w = h.writer
    w.write("A", "d/kept.txt", b"old\n")
    w.write("A", "gone.txt", b"bye\n")
    assert h.cycle()["failures"] == 0
    w.write("A", "d/kept.txt", b"new\n")
    w.delete("A", "gone.txt")
    w.write("A", "d/added.txt", b"added\n")
    assert h.cycle()["failures"] == 0  # the first image becomes a generation at this jump-ahead
    (gen,) = h.agent.state.generations()
    base = h.agent.state.base()
    assert base is not None
    dest = h.agent.dest

    listed = {e.path for e in images.entries(dest, "A", gen.name)}
    assert {"d", "d/kept.txt", "gone.txt"} <= listed and "d/added.txt" not in listed
    assert {e.path for e in images.entries(dest, "A", gen.name, "d")} >= {"d", "d/kept.txt"}

    changed = {c.path: c.kind for c in images.changed(dest, "A", gen.name, base.name)}
    assert changed.get("gone.txt") == "deleted" and changed.get("d/added.txt") == "added"
    assert changed.get("d/kept.txt") in ("modified", "replaced")

    done = images.restore(dest, "A", gen.name, str(tmp_path / "old"))
    assert done.records > 0
    assert _tree(tmp_path / "old") == {"d": None, "d/kept.txt": b"old\n", "gone.txt": b"bye\n"}
    images.restore(dest, "A", base.name, str(tmp_path / "sub"), "d")
    assert _tree(tmp_path / "sub") == {"d": None, "d/kept.txt": b"new\n", "d/added.txt": b"added\n"}
    assert h.agent.state.generations() == [gen]  # reading changed no PCPI nor the ledger


@pytest.mark.parametrize("backend", ["mem"], indirect=True)
def test_a_restore_into_a_directory_that_holds_files_is_refused(group_config, tmp_path):
    h = Harness(group_config(replicas=("A",)))
    h.writer.write("A", "f", b"x")
    assert h.cycle()["failures"] == 0
    base = h.agent.state.base()
    assert base is not None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_bytes(b"keep")
    with pytest.raises(images.RestoreRefused):
        images.restore(h.agent.dest, "A", base.name, str(tmp_path / "out"))
    assert (tmp_path / "out" / "mine").read_bytes() == b"keep"


def test_each_generation_has_a_stable_read_only_path_per_replica_where_the_backend_has_one(backend, group_config):
    """btrfs: a replica's image in a generation is a directory of a read-only snapshot, at the same
    path for as long as the generation is retained, and gone once pruned; mem, sim and zfs-fuse have
    none (null in `status --json` and `generations --json`: read them with `coalesce ls`/`restore`)."""
    import errno

    h = Harness(group_config(replicas=("A", "B"), retention='keep_min = "30d"\nmax = 2'))
    h.writer.write("A", "f.txt", b"one\n")
    h.writer.write("B", "g.txt", b"b\n")
    assert h.cycle()["failures"] == 0
    h.writer.write("A", "f.txt", b"two\n")
    assert h.cycle()["failures"] == 0
    (first,) = h.agent.state.generations()
    paths = h.agent.generation_paths()
    assert set(paths) == {first.name} and set(paths[first.name]) == {"A", "B"}
    if backend != "btrfs":
        assert paths[first.name] == {"A": None, "B": None}
        return
    a = paths[first.name]["A"]
    assert a is not None and Path(a, "f.txt").read_bytes() == b"one\n"
    assert Path(paths[first.name]["B"], "g.txt").read_bytes() == b"b\n"
    with pytest.raises(OSError) as exc:
        Path(a, "new.txt").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    h.writer.write("A", "f.txt", b"three\n")
    assert h.cycle()["failures"] == 0
    first_kept, second = h.agent.state.generations()
    assert first_kept.name == first.name
    assert h.agent.generation_paths()[first.name]["A"] == a and Path(a, "f.txt").read_bytes() == b"one\n"
    assert Path(h.agent.generation_paths()[second.name]["A"], "f.txt").read_bytes() == b"two\n"
    h.writer.write("B", "g.txt", b"b2\n")
    assert h.cycle()["failures"] == 0  # max = 2: the first generation is pruned
    assert first.name not in {g.name for g in h.agent.state.generations()} and not os.path.exists(a)
