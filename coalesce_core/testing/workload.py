"""Writing source data through any backend, and remembering what was written.

The demo, the scenario tests and the benchmarks change source qtrees through
the one write primitive every backend has (``coalesce_apply`` with
``use_purgatory=False``), so they run unchanged on mem, sim, btrfs and zfs.
:class:`SourceWriter` also keeps its own model of every qtree (path -> kind,
bytes), so tests can compute the expected image of a source PCPI without
asking the agent (the independence the stateful test needs: docs/verification.md).
"""

from __future__ import annotations

import random
from typing import Any, Iterable

from coalesce_core.stream import fingerprint as fp
from coalesce_core.stream.privileges import SETID, STRIP
from coalesce_core.stream.records import MkDir, MkFile, Rename, RmDir, Symlink, Unlink, Write, framed

Tree = dict[str, tuple[str, Any]]  # path -> ("d", None) | ("f", bytes) | ("l", target)


class SourceWriter:
    """Applies small change streams to source qtrees and mirrors them in a model; the model's
    fingerprints are those of a replica under the ``privileges`` policy (coalesce_core.stream.privileges)."""

    def __init__(self, volume: Any, privileges: str = "keep") -> None:
        self.volume = volume
        self.privileges = privileges
        self.trees: dict[str, Tree] = {}
        self.snapshots: dict[str, dict[str, str]] = {}  # source PCPI -> qtree -> fingerprint

    def _apply(self, qtree: str, changes: list[Any]) -> None:
        self.volume.apply(qtree, framed(qtree, None, "workload", changes), use_purgatory=False)

    def _parents(self, qtree: str, path: str) -> list[Any]:
        tree = self.trees.setdefault(qtree, {})
        out = []
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in tree:
                out.append(MkDir(path=d, mode=0o755))
                tree[d] = ("d", None)
        return out

    def ensure_qtree(self, qtree: str) -> None:
        if qtree not in self.trees:
            self.trees[qtree] = {}
            self._apply(qtree, [])

    def write(self, qtree: str, path: str, data: bytes, mode: int = 0o644) -> None:
        tree = self.trees.setdefault(qtree, {})
        changes = self._parents(qtree, path)
        if path in tree:
            changes.append(Unlink(path=path))
        changes.append(MkFile(path=path, mode=mode))
        for off in range(0, len(data), 1 << 20):
            changes.append(Write(path=path, offset=off, data=data[off : off + (1 << 20)]))
        tree[path] = ("f", (data, mode))
        self._apply(qtree, changes)

    def symlink(self, qtree: str, path: str, target: str) -> None:
        tree = self.trees.setdefault(qtree, {})
        changes = self._parents(qtree, path)
        if path in tree:
            changes.append(Unlink(path=path))
        changes.append(Symlink(path=path, target=target))
        tree[path] = ("l", target)
        self._apply(qtree, changes)

    def delete(self, qtree: str, path: str) -> None:
        tree = self.trees.setdefault(qtree, {})
        victims = sorted((p for p in tree if p == path or p.startswith(path + "/")), key=len, reverse=True)
        changes = [RmDir(path=p) if tree[p][0] == "d" else Unlink(path=p) for p in victims]
        for p in victims:
            del tree[p]
        if changes:
            self._apply(qtree, changes)

    def rename(self, qtree: str, old: str, new: str) -> None:
        tree = self.trees.setdefault(qtree, {})
        if old not in tree or new in tree or new.startswith(old + "/"):
            return
        changes = self._parents(qtree, new)
        changes.append(Rename(old=old, new=new))
        moved = {p: v for p, v in tree.items() if p == old or p.startswith(old + "/")}
        for p in moved:
            del tree[p]
        for p, v in moved.items():
            tree[new + p[len(old) :]] = v
        self._apply(qtree, changes)

    # -- the independent record of what a source PCPI holds --------------------
    def expected_fingerprint(self, qtree: str) -> str:
        entries = []
        for path, (kind, val) in self.trees.get(qtree, {}).items():
            if kind == "d":
                entries.append(fp.Entry(path=path, kind="d", mode=0o755))
            elif kind == "f":
                data, mode = val
                if self.privileges == STRIP:
                    mode &= ~SETID
                entries.append(fp.file_entry(path, mode, data))
            else:
                entries.append(fp.Entry(path=path, kind="l", target=val))
        return fp.digest(entries)

    def remember(self, snapshot: str) -> None:
        """Record the model's fingerprint of every qtree as of source PCPI ``snapshot``."""
        self.snapshots[snapshot] = {q: self.expected_fingerprint(q) for q in self.trees}

    def random_changes(self, rng: random.Random, qtree: str, n: int = 3) -> None:
        """A few random writes, renames and deletes in ``qtree``."""
        for _ in range(n):
            tree = self.trees.setdefault(qtree, {})
            files = sorted(p for p, v in tree.items() if v[0] == "f")
            op = rng.random()
            if op < 0.6 or not files:
                d = rng.choice(["", "a", "a/b", "c"])
                path = (d + "/" if d else "") + f"f{rng.randrange(20)}"
                if (
                    any(path.startswith(p + "/") and tree[p][0] != "d" for p in tree)
                    or tree.get(path, ("f",))[0] == "d"
                ):
                    continue
                self.write(qtree, path, rng.randbytes(rng.choice([0, 10, 3000, 70000])))
            elif op < 0.8:
                self.delete(qtree, rng.choice(files))
            else:
                src = rng.choice(files)
                self.rename(qtree, src, src + "r")


def fill(writer: SourceWriter, qtrees: Iterable[str], files: int = 3, size: int = 1000, seed: int = 0) -> None:
    """Give each qtree a few files of deterministic content."""
    rng = random.Random(seed)
    for q in qtrees:
        writer.ensure_qtree(q)
        for i in range(files):
            writer.write(q, f"dir{i % 2}/file{i}", rng.randbytes(size))
