"""Hostile records: each raises HostilePath (or a stream/backend error) and changes nothing."""

from __future__ import annotations

from typing import Any

from coalesce_core.errors import BackendError, HostilePath, StreamError
from coalesce_core.stream.records import (
    HardLink,
    MkDir,
    MkFile,
    Rename,
    RmDir,
    SetAttr,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Write,
    framed,
)
from coalesce_core.testing.conformance.base import XATTR, _check
from coalesce_core.testing.conformance.changes import _file_records
from coalesce_core.testing.conformance.helpers import _apply, _Ctx, _expect, _fps


def _raw(cls: type, **fields: Any) -> Any:
    """A record that bypasses its validators, as a hostile producer would send it."""
    obj: Any = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


HOSTILE_SETUP = [
    MkFile(path="f"),
    Write(path="f", offset=0, data=b"in h"),
    MkDir(path="d"),
    Symlink(path="esc", target="../cf-other"),
    Symlink(path="escf", target="../cf-other/f"),
]


def hostile_records() -> list[tuple[str, object, tuple[type, ...]]]:
    """(label, record, accepted exceptions); the qtree holds HOSTILE_SETUP and the
    sibling qtree "cf-other" holds a file "f" and a directory "d"."""
    H: tuple[type, ...] = (HostilePath,)
    return [
        ("dotdot", _raw(MkFile, path="../evil", mode=0o644), H),
        ("dotdot-inner", _raw(MkDir, path="d/../../evil", mode=0o755), H),
        ("absolute", _raw(MkFile, path="/tmp/cf-evil", mode=0o644), H),
        ("nul", _raw(MkFile, path="a\x00b", mode=0o644), H),
        ("empty", _raw(Unlink, path=""), H),
        ("dot", _raw(MkDir, path="./x", mode=0o755), H),
        ("double-slash", _raw(MkFile, path="d//x", mode=0o644), H),
        ("write-through-symlink", Write(path="esc/f", offset=0, data=b"evil"), H),
        ("truncate-through-symlink", Truncate(path="esc/f", size=0), H),
        ("create-through-symlink", MkFile(path="esc/evil"), H),
        ("mkdir-through-symlink", MkDir(path="esc/evil"), H),
        ("symlink-through-symlink", Symlink(path="esc/evil", target="x"), H),
        ("unlink-through-symlink", Unlink(path="esc/f"), H),
        ("rmdir-through-symlink", RmDir(path="esc/d"), H),
        ("chmod-through-symlink", SetAttr(path="esc/f", mode=0o777), H),
        ("xattr-through-symlink", SetXattr(path="esc/f", name=XATTR, value=b"x"), H),
        ("rename-out", _raw(Rename, old="f", new="../evil"), H),
        ("rename-through-symlink", Rename(old="f", new="esc/moved"), H),
        ("rename-from-symlink-dir", Rename(old="esc/f", new="stolen"), H),
        ("hardlink-out", _raw(HardLink, path="hl", existing="../cf-other/f"), H),
        ("hardlink-absolute", _raw(HardLink, path="hl", existing="/etc/passwd"), H),
        ("hardlink-through-symlink", HardLink(path="hl", existing="esc/f"), H),
        ("write-to-symlink", Write(path="escf", offset=0, data=b"evil"), (StreamError, BackendError)),
        ("truncate-symlink", Truncate(path="escf", size=0), (StreamError, BackendError)),
    ]


def check_hostile(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "cf-other", [MkDir(path="d")] + _file_records("f", b"other", 0o644))
    for label, rec, accepted in hostile_records():
        vol.remove_qtree("h")
        _apply(vol, "h", HOSTILE_SETUP)
        before = _fps(vol)
        for use_purgatory in (False, True):
            _expect(
                accepted,
                lambda: vol.apply("h", framed("h", None, "x", [rec]), use_purgatory=use_purgatory),
                f"hostile record {label} ({rec!r})",
            )
            _check(_fps(vol) == before, f"hostile record {label} changed something")
