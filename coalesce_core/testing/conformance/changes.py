"""Generated source changes (valid by construction; applied to the model as drawn)."""

from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st

from coalesce_core.stream import records as R
from coalesce_core.testing.conformance.base import DIR_MODES, FILE_MODES, NAMES, SYMLINK_TARGETS, XATTR
from coalesce_core.testing.conformance.model import Model


def _content(draw: Callable, big_files: bool) -> bytes:
    kind = draw(st.integers(0, 19))
    if big_files and kind == 0:
        size = draw(st.sampled_from([R.MAX_DATA + 3, 2 * R.MAX_DATA + 1]))
        fill = draw(st.integers(0, 255))
        return bytes([fill]) * size  # fill 0: one big hole
    return draw(st.binary(max_size=40))


def _free(draw: Callable, model: Model, names: tuple[str, ...]) -> str | None:
    parent = draw(st.sampled_from(model.dirs()))
    name = draw(st.sampled_from(names))
    path = f"{parent}/{name}" if parent else name
    return None if path in model.nodes else path


def _file_records(path: str, data: bytes, mode: int) -> list[object]:
    recs: list[object] = [R.MkFile(path=path, mode=0o600)]
    recs += [R.Write(path=path, offset=o, data=data[o : o + R.MAX_DATA]) for o in range(0, len(data), R.MAX_DATA)]
    recs.append(R.SetAttr(path=path, mode=mode))
    return recs


def draw_changes(
    draw: Callable,
    model: Model,
    count: int,
    *,
    names: tuple[str, ...] = NAMES,
    xattrs: bool = True,
    big_files: bool = True,
) -> list[object]:
    """``count`` random valid operations on ``model`` as change records (applied to it)."""
    out: list[object] = []
    ops = [
        "mkdir",
        "mkfile",
        "mkfile",
        "write",
        "truncate",
        "unlink",
        "rmtree",
        "rename",
        "symlink",
        "hardlink",
        "chmod",
        "mtime",
    ] + (["xattr"] if xattrs else [])
    for _ in range(count):
        op = draw(st.sampled_from(ops))
        recs: list[object] = []
        files, nondirs, dirs = model.of_kind("f"), model.of_kind("f", "l"), model.of_kind("d")
        if op == "mkdir":
            path = _free(draw, model, names)
            if path:
                mode = draw(st.sampled_from(DIR_MODES))
                recs = [R.MkDir(path=path, mode=0o700), R.SetAttr(path=path, mode=mode)]
        elif op == "mkfile":
            path = _free(draw, model, names)
            if path:
                recs = _file_records(path, _content(draw, big_files), draw(st.sampled_from(FILE_MODES)))
        elif op == "write" and files:
            path = draw(st.sampled_from(files))
            size = len(model.data(path))
            recs = [
                R.Write(
                    path=path, offset=draw(st.integers(0, size + 16)), data=draw(st.binary(min_size=1, max_size=24))
                )
            ]
        elif op == "truncate" and files:
            path = draw(st.sampled_from(files))
            recs = [R.Truncate(path=path, size=draw(st.integers(0, len(model.data(path)) + 40)))]
        elif op == "unlink" and nondirs:
            recs = [R.Unlink(path=draw(st.sampled_from(nondirs)))]
        elif op == "rmtree" and dirs:
            top = draw(st.sampled_from(dirs))
            below = sorted((p for p in model.nodes if p == top or p.startswith(top + "/")), reverse=True)
            recs = [R.RmDir(path=p) if model.nodes[p]["k"] == "d" else R.Unlink(path=p) for p in below]
        elif op == "rename" and model.nodes:
            old = draw(st.sampled_from(sorted(model.nodes)))
            new = _free(draw, model, names)
            if new and not (new + "/").startswith(old + "/"):
                recs = [R.Rename(old=old, new=new)]
        elif op == "symlink":
            path = _free(draw, model, names)
            if path:
                recs = [R.Symlink(path=path, target=draw(st.sampled_from(SYMLINK_TARGETS)))]
        elif op == "hardlink" and files:
            path = _free(draw, model, names)
            if path:
                recs = [R.HardLink(path=path, existing=draw(st.sampled_from(files)))]
        elif op == "chmod" and (files or dirs):
            path = draw(st.sampled_from(files + dirs))
            modes = DIR_MODES if model.nodes[path]["k"] == "d" else FILE_MODES
            recs = [R.SetAttr(path=path, mode=draw(st.sampled_from(modes)))]
        elif op == "mtime" and model.nodes:
            recs = [R.SetAttr(path=draw(st.sampled_from(sorted(model.nodes))), mtime_ns=draw(st.integers(0, 2**62)))]
        elif op == "xattr" and (files or dirs):
            value = draw(st.one_of(st.none(), st.binary(max_size=8)))
            recs = [R.SetXattr(path=draw(st.sampled_from(files + dirs)), name=XATTR, value=value)]
        model.apply_all(recs)
        out += recs
    return out
