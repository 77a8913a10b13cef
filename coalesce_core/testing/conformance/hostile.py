"""Hostile records: each raises HostilePath (or a stream/backend error) and changes nothing."""

from __future__ import annotations

from typing import Any

from coalesce_core.errors import BackendError, HostilePath, StreamError
from coalesce_core.stream import records as R
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
    R.MkFile(path="f"),
    R.Write(path="f", offset=0, data=b"in h"),
    R.MkDir(path="d"),
    R.Symlink(path="esc", target="../cf-other"),
    R.Symlink(path="escf", target="../cf-other/f"),
]


def hostile_records() -> list[tuple[str, object, tuple[type, ...]]]:
    """(label, record, accepted exceptions); the qtree holds HOSTILE_SETUP and the
    sibling qtree "cf-other" holds a file "f" and a directory "d"."""
    H: tuple[type, ...] = (HostilePath,)
    return [
        ("dotdot", _raw(R.MkFile, path="../evil", mode=0o644), H),
        ("dotdot-inner", _raw(R.MkDir, path="d/../../evil", mode=0o755), H),
        ("absolute", _raw(R.MkFile, path="/tmp/cf-evil", mode=0o644), H),
        ("nul", _raw(R.MkFile, path="a\x00b", mode=0o644), H),
        ("empty", _raw(R.Unlink, path=""), H),
        ("dot", _raw(R.MkDir, path="./x", mode=0o755), H),
        ("double-slash", _raw(R.MkFile, path="d//x", mode=0o644), H),
        ("write-through-symlink", R.Write(path="esc/f", offset=0, data=b"evil"), H),
        ("truncate-through-symlink", R.Truncate(path="esc/f", size=0), H),
        ("create-through-symlink", R.MkFile(path="esc/evil"), H),
        ("mkdir-through-symlink", R.MkDir(path="esc/evil"), H),
        ("symlink-through-symlink", R.Symlink(path="esc/evil", target="x"), H),
        ("unlink-through-symlink", R.Unlink(path="esc/f"), H),
        ("rmdir-through-symlink", R.RmDir(path="esc/d"), H),
        ("chmod-through-symlink", R.SetAttr(path="esc/f", mode=0o777), H),
        ("xattr-through-symlink", R.SetXattr(path="esc/f", name=XATTR, value=b"x"), H),
        ("rename-out", _raw(R.Rename, old="f", new="../evil"), H),
        ("rename-through-symlink", R.Rename(old="f", new="esc/moved"), H),
        ("rename-from-symlink-dir", R.Rename(old="esc/f", new="stolen"), H),
        ("hardlink-out", _raw(R.HardLink, path="hl", existing="../cf-other/f"), H),
        ("hardlink-absolute", _raw(R.HardLink, path="hl", existing="/etc/passwd"), H),
        ("hardlink-through-symlink", R.HardLink(path="hl", existing="esc/f"), H),
        ("write-to-symlink", R.Write(path="escf", offset=0, data=b"evil"), (StreamError, BackendError)),
        ("truncate-symlink", R.Truncate(path="escf", size=0), (StreamError, BackendError)),
    ]


def check_hostile(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "cf-other", [R.MkDir(path="d")] + _file_records("f", b"other", 0o644))
    for label, rec, accepted in hostile_records():
        vol.remove_qtree("h")
        _apply(vol, "h", HOSTILE_SETUP)
        before = _fps(vol)
        for use_purgatory in (False, True):
            _expect(
                accepted,
                lambda: vol.apply("h", R.framed("h", None, "x", [rec]), use_purgatory=use_purgatory),
                f"hostile record {label} ({rec!r})",
            )
            _check(_fps(vol) == before, f"hostile record {label} changed something")
