"""The reference model of one qtree."""

from __future__ import annotations

import copy
from typing import Any, Iterable, NoReturn

from coalesce_core.stream import fingerprint
from coalesce_core.stream import records as R
from coalesce_core.testing.conformance.base import ConformanceError


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class Model:
    """A plain-Python model of one qtree that applies change records *strictly*
    (the order contract of coalesce_core.stream.records is checked) and digests
    itself the canonical way.  Nodes: path -> {"k": "d", "mode"} |
    {"k": "f", "ino"} | {"k": "l", "target"}; inodes: ino -> {"mode", "data"}."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.inodes: dict[int, dict[str, Any]] = {}
        self.next_ino = 1
        self.sealed: set[str] = set()

    def copy(self) -> "Model":
        m = copy.deepcopy(self)
        m.sealed = set()
        return m

    # --- queries
    def is_dir(self, path: str) -> bool:
        return path == "" or self.nodes.get(path, {}).get("k") == "d"

    def children(self, path: str) -> list[str]:
        return sorted(p for p in self.nodes if _parent(p) == path)

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, n in self.nodes.items() if n["k"] in kinds)

    def dirs(self) -> list[str]:
        return [""] + self.of_kind("d")

    def data(self, path: str) -> bytearray:
        return self.inodes[self.nodes[path]["ino"]]["data"]

    def entries(self) -> list[fingerprint.Entry]:
        out = []
        for p, n in self.nodes.items():
            if n["k"] == "d":
                out.append(fingerprint.Entry(path=p, kind="d", mode=n["mode"]))
            elif n["k"] == "f":
                ino = self.inodes[n["ino"]]
                out.append(fingerprint.file_entry(p, ino["mode"], bytes(ino["data"])))
            else:
                out.append(fingerprint.Entry(path=p, kind="l", target=n["target"]))
        return out

    def digest(self) -> str:
        return fingerprint.digest(self.entries())

    # --- strict application
    def _fail(self, rec: object, why: str) -> NoReturn:
        raise ConformanceError(f"record {rec!r} breaks the order contract: {why}")

    def _new(self, rec: object, path: str) -> None:
        if path in self.nodes:
            self._fail(rec, f"{path!r} exists (replaced entries must be removed first)")
        if not self.is_dir(_parent(path)):
            self._fail(rec, f"the parent of {path!r} is not a directory created earlier")

    def apply(self, rec: object) -> None:
        # SetAttr of a directory comes after its contents: no entry of it is
        # created, removed or renamed afterwards (that would change its mtime).
        changed = (
            (rec.path,)
            if isinstance(rec, (R.MkDir, R.MkFile, R.Symlink, R.HardLink, R.Unlink, R.RmDir))
            else (rec.old, rec.new)
            if isinstance(rec, R.Rename)
            else ()
        )
        for p in changed:
            if _parent(p) in self.sealed:
                self._fail(rec, f"it changes an entry of {_parent(p)!r} after the SetAttr of that directory")
        if isinstance(rec, R.MkDir):
            self._new(rec, rec.path)
            self.nodes[rec.path] = {"k": "d", "mode": rec.mode & 0o7777}
        elif isinstance(rec, R.MkFile):
            self._new(rec, rec.path)
            self.inodes[self.next_ino] = {"mode": rec.mode & 0o7777, "data": bytearray()}
            self.nodes[rec.path] = {"k": "f", "ino": self.next_ino}
            self.next_ino += 1
        elif isinstance(rec, R.Symlink):
            self._new(rec, rec.path)
            self.nodes[rec.path] = {"k": "l", "target": rec.target}
        elif isinstance(rec, R.HardLink):
            self._new(rec, rec.path)
            src = self.nodes.get(rec.existing)
            if not src or src["k"] != "f":
                self._fail(rec, f"{rec.existing!r} is not an existing regular file")
            self.nodes[rec.path] = {"k": "f", "ino": src["ino"]}
        elif isinstance(rec, R.Rename):
            if rec.old not in self.nodes:
                self._fail(rec, f"{rec.old!r} does not exist")
            self._new(rec, rec.new)
            if (rec.new + "/").startswith(rec.old + "/"):
                self._fail(rec, "a directory cannot move into itself")
            moved = {p: n for p, n in self.nodes.items() if p == rec.old or p.startswith(rec.old + "/")}
            for p in moved:
                del self.nodes[p]
            for p, node in moved.items():
                self.nodes[rec.new + p[len(rec.old) :]] = node
        elif isinstance(rec, R.Unlink):
            n = self.nodes.get(rec.path)
            if n is None or n["k"] == "d":
                self._fail(rec, f"{rec.path!r} is not an existing non-directory")
            del self.nodes[rec.path]
        elif isinstance(rec, R.RmDir):
            if not self.nodes.get(rec.path, {}).get("k") == "d" or self.children(rec.path):
                self._fail(rec, f"{rec.path!r} is not an existing empty directory")
            del self.nodes[rec.path]
        elif isinstance(rec, (R.Write, R.Truncate)):
            if self.nodes.get(rec.path, {}).get("k") != "f":
                self._fail(rec, f"{rec.path!r} is not a regular file created earlier or present at the base")
            data = self.data(rec.path)
            if isinstance(rec, R.Write):
                if rec.offset > len(data):
                    data.extend(bytes(rec.offset - len(data)))
                data[rec.offset : rec.offset + len(rec.data)] = rec.data
            elif rec.size < len(data):
                del data[rec.size :]
            else:
                data.extend(bytes(rec.size - len(data)))
        elif isinstance(rec, (R.SetAttr, R.SetXattr)) and rec.path == R.ROOT:
            if isinstance(rec, R.SetAttr):
                self.sealed.add(R.ROOT)  # the qtree root's entries are final by now
        elif isinstance(rec, (R.SetAttr, R.SetXattr)):
            n = self.nodes.get(rec.path)
            if n is None:
                self._fail(rec, f"{rec.path!r} does not exist")
            if isinstance(rec, R.SetAttr):
                if rec.mode is not None and n["k"] == "d":
                    n["mode"] = rec.mode & 0o7777
                elif rec.mode is not None and n["k"] == "f":
                    self.inodes[n["ino"]]["mode"] = rec.mode & 0o7777
                if n["k"] == "d":
                    self.sealed.add(rec.path)
        elif isinstance(rec, (R.Begin, R.End)):
            pass
        else:
            raise ConformanceError(f"unknown record {rec!r}")

    def apply_all(self, records: Iterable[object]) -> None:
        for rec in records:
            self.apply(rec)
        self.sealed = set()
