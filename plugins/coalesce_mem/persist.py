"""The on-disk form of a ``mem:///ABS/PATH`` volume.

The file is two lines of JSON::

    {"format": "coalesce-mem", "version": 2, "sha256": "<hex of line 2>", "bytes": N}
    {"scheme": ..., "states": [...], "active": {...}, "snapshots": [...], "exports": {...}, ...}

``states`` lists every distinct :class:`~coalesce_mem.tree.QtreeState` once;
the active FS and every PCPI refer to them by index, so structural sharing
survives a restart and the file grows with the data, not with the number of
PCPIs.  Inside a state, ``nodes`` is an inode table (a hard link is one index
under two names); a file is its size and its data blocks (``[index, base64]``
of 64 KiB, the last one cut at the end of file, holes left out; version 1 kept its whole bytes, still read); names are JSON strings (lone surrogates
of non-UTF-8 names are escaped by ``json`` and come back intact).

It is written to a temporary file in the same directory, fsync'ed, renamed
over the old one with ``os.replace`` and the directory fsync'ed: a crash
leaves either the old or the new volume.  A file that fails any check (the
checksum, the structure) raises :class:`BackendError` with a hint; it is
never silently replaced by an empty volume.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from typing import Any

from coalesce_core.errors import BackendError
from coalesce_core.stream.records import MAX_FILE_SIZE

from .tree import Blocks, Dir, File, Node, QtreeState
from .tree import Symlink as SymNode

FORMAT = "coalesce-mem"
VERSION = 2
#: versions this code reads (1 kept a file's bytes whole, 2 keeps its size and data blocks)
READS = (1, 2)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _meta(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"m": node.mode, "u": node.uid, "g": node.gid, "t": node.mtime_ns}
    if node.xattrs:
        out["x"] = {k: _b64(v) for k, v in sorted(node.xattrs.items())}
    return out


def encode_state(state: QtreeState) -> str:
    """The JSON text of one state (cached on frozen states: they never change)."""
    if state.frozen and isinstance(state.cache, str):
        return state.cache
    index: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []

    def idx(node: Node) -> int:
        got = index.get(id(node))
        if got is not None:
            return got
        index[id(node)] = len(nodes)
        rec = _meta(node)
        nodes.append(rec)
        if isinstance(node, Dir):
            rec["k"] = "d"
            stack.append((node, rec))
        elif isinstance(node, File):
            rec["k"] = "f"
            rec["z"] = node.data.size
            # a block is cut at the end of file (a small file's block is mostly zeros past its size)
            size, B = node.data.size, Blocks.BLOCK
            rec["b"] = [[i, _b64(node.data.blocks[i][: size - i * B])] for i in sorted(node.data.blocks)]
        else:
            rec["k"] = "l"
            rec["l"] = node.target  # type: ignore[attr-defined]
        return index[id(node)]

    stack: list[tuple[Dir, dict]] = []
    root_i = idx(state.root)
    purg_i = idx(state.purgatory)
    while stack:
        d, rec = stack.pop()
        rec["c"] = {name: idx(child) for name, child in d.children.items()}
    text = json.dumps(
        {"root": root_i, "purgatory": purg_i, "seq": state.purgatory_seq, "nodes": nodes}, separators=(",", ":")
    )
    if state.frozen:
        state.cache = text
    return text


def encode_volume(vol: Any) -> bytes:
    """Both lines of the file for ``vol`` (a MemVolume; called under its lock)."""
    order: dict[int, int] = {}
    parts: list[str] = []

    def ref(state: QtreeState) -> int:
        got = order.get(id(state))
        if got is None:
            got = order[id(state)] = len(parts)
            parts.append(encode_state(state))
        return got

    active = {q: ref(s) for q, s in vol.active.items()}
    snaps = [[name, {q: ref(s) for q, s in qs.items()}] for name, qs in vol.snapshots.items()]
    head = json.dumps(
        {
            "scheme": vol.scheme,
            "max_pcpis": vol.max_pcpis,
            "max_file_size": vol.max_file_size,
            "active": active,
            "snapshots": snaps,
            "exports": vol.exports,
        },
        separators=(",", ":"),
    )
    body = (head[:-1] + ',"states":[' + ",".join(parts) + "]}").encode("utf-8")
    header = json.dumps(
        {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    ).encode("utf-8")
    return header + b"\n" + body + b"\n"


def write_file(path: str, data: bytes) -> os.stat_result:
    """Atomically replace ``path`` by ``data`` (temp file, fsync, os.replace, fsync dir)."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise BackendError(
            f"cannot write the mem volume file {path}: {exc}", hint="check free space and permissions of its directory"
        ) from exc
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return os.stat(path)


class Damaged(Exception):
    pass


def _decode_state(obj: Any) -> QtreeState:
    if not isinstance(obj, dict):
        raise Damaged("a qtree state is not an object")
    raw = obj["nodes"]
    if not isinstance(raw, list):
        raise Damaged("nodes is not a list")
    nodes: list[Node] = []
    for r in raw:
        kind = r["k"]
        meta = dict(
            uid=int(r["u"]),
            gid=int(r["g"]),
            mtime_ns=int(r["t"]),
            xattrs={str(k): base64.b64decode(v, validate=True) for k, v in r.get("x", {}).items()},
        )
        if kind == "d":
            nodes.append(Dir(int(r["m"]), **meta))
        elif kind == "f":
            nodes.append(File(int(r["m"]), _file_data(r), **meta))
        elif kind == "l":
            if not isinstance(r["l"], str):
                raise Damaged("a symlink target is not a string")
            nodes.append(SymNode(r["l"], int(r["m"]), **meta))
        else:
            raise Damaged(f"unknown node kind {kind!r}")
    root_i, purg_i = int(obj["root"]), int(obj["purgatory"])
    parent_of_dir: dict[int, int] = {}
    for i, r in enumerate(raw):
        if r["k"] != "d":
            continue
        for name, ci in r["c"].items():
            if not isinstance(name, str) or not isinstance(ci, int) or not 0 <= ci < len(nodes):
                raise Damaged("a directory entry points nowhere")
            child = nodes[ci]
            if isinstance(child, Dir):
                if ci in parent_of_dir or ci in (root_i, purg_i):
                    raise Damaged("a directory is linked twice (the tree has a cycle)")
                parent_of_dir[ci] = i
            nodes[i].children[name] = child  # type: ignore[attr-defined]
    root, purg = nodes[root_i], nodes[purg_i]
    if not isinstance(root, Dir) or not isinstance(purg, Dir) or root is purg:
        raise Damaged("a qtree root or purgatory is not a directory")
    return QtreeState(root, purg, int(obj["seq"]))


def _file_data(r: dict[str, Any]) -> bytes | Blocks:
    """A file's bytes: ``"d"`` (version 1: all of them) or ``"z"`` and ``"b"`` (version 2: the size
    and the data blocks, [index, base64] in index order)."""
    if "d" in r:
        return base64.b64decode(r["d"], validate=True)
    data = Blocks()
    data.size = int(r["z"])
    for i, b64 in r["b"]:
        blk = base64.b64decode(b64, validate=True)
        if (
            not isinstance(i, int)
            or i < 0
            or not 0 < len(blk) <= Blocks.BLOCK
            or i * Blocks.BLOCK + len(blk) > data.size
        ):
            raise Damaged("a file's data block is out of place")
        data.blocks[i] = blk + bytes(Blocks.BLOCK - len(blk))
    return data


def decode_volume(path: str, data: bytes) -> dict[str, Any]:
    """Parse and check a volume file; raises BackendError with a hint if damaged."""
    hint = (
        f"{path} is not a complete mem volume file (truncated, edited or from another program). "
        f"Restore it from a copy, or move it away and create a new, empty volume "
        f"(open with create=True / `coalesce init`); coalesce never empties it on its own"
    )
    try:
        header_line, sep, rest = data.partition(b"\n")
        header = json.loads(header_line)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise Damaged("it does not start with a coalesce-mem header")
        if header.get("version") not in READS:
            raise Damaged(f"it has format version {header.get('version')!r}, this coalesce reads {READS}")
        body = rest[:-1] if rest.endswith(b"\n") else rest
        if len(body) != header.get("bytes") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
            raise Damaged("its checksum does not match (truncated or corrupted)")
        obj = json.loads(body)
        states = [_decode_state(s) for s in obj["states"]]

        def st(i: Any) -> QtreeState:
            if not isinstance(i, int) or not 0 <= i < len(states):
                raise Damaged("a qtree refers to a missing state")
            return states[i]

        active = {str(q): st(i) for q, i in obj["active"].items()}
        snapshots: dict[str, dict[str, QtreeState]] = {}
        for name, qs in obj["snapshots"]:
            snapshots[str(name)] = {str(q): st(i) for q, i in qs.items()}
        for qs in snapshots.values():
            for s in qs.values():
                s.frozen = True
        exports = obj["exports"]
        if not isinstance(exports, dict) or not all(v is None or isinstance(v, str) for v in exports.values()):
            raise Damaged("the export table is malformed")
        return {
            "scheme": str(obj["scheme"]),
            "max_pcpis": int(obj["max_pcpis"]),
            "max_file_size": int(obj.get("max_file_size", MAX_FILE_SIZE)),  # files written before it: the default
            "active": active,
            "snapshots": snapshots,
            "exports": dict(exports),
        }
    except BackendError:
        raise
    except (Damaged, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise BackendError(f"the mem volume file {path} is damaged: {exc}", hint=hint) from exc
