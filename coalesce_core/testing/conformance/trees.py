"""Plain checks of a rich tree: diff + apply for every pair of PCPIs, and the purgatory."""

from __future__ import annotations

from coalesce_core.stream.records import (
    MAX_DATA,
    HardLink,
    MkDir,
    Rename,
    RmDir,
    SetAttr,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Write,
)
from coalesce_core.testing.conformance.base import XATTR, _check
from coalesce_core.testing.conformance.changes import _file_records
from coalesce_core.testing.conformance.helpers import _apply, _Ctx, check_diff
from coalesce_core.testing.conformance.model import Model


def _rich_tree() -> list[object]:
    big = bytes(range(256)) * ((2 * MAX_DATA + 1000) // 256)
    holey = b"head" + bytes(MAX_DATA + 10) + b"tail" + bytes(MAX_DATA)
    recs: list[object] = [MkDir(path="d1", mode=0o700), MkDir(path="d1/d2", mode=0o700), MkDir(path="e")]
    recs += _file_records("d1/d2/small", b"small file\n", 0o640)
    recs += _file_records("empty", b"", 0o600)
    recs += _file_records("big", big, 0o644)
    recs += _file_records("holey", holey, 0o755)
    recs += _file_records("tobedir", b"x", 0o644)
    recs += [MkDir(path="tobefile"), MkDir(path="tobefile/sub")] + _file_records("tobefile/sub/f", b"f", 0o644)
    recs += [
        Symlink(path="lnk", target="d1/d2/small"),
        Symlink(path="dangling", target="../../nowhere"),
        Symlink(path="abs", target="/etc/passwd"),
        Symlink(path="tobefile2", target="x"),
    ]
    recs += _file_records("h1", b"linked", 0o644)
    recs += [HardLink(path="d1/h2", existing="h1"), HardLink(path="e/h3", existing="h1")]
    recs += [
        SetXattr(path="h1", name=XATTR, value=b"v"),
        SetXattr(path="d1", name=XATTR, value=b"dir"),
        SetAttr(path="d1/d2", mode=0o755, mtime_ns=10**18),
        SetAttr(path="d1", mode=0o750),
    ]
    return recs


def _rich_changes() -> list[object]:
    recs: list[object] = [Unlink(path="tobedir"), MkDir(path="tobedir", mode=0o755)]
    recs += _file_records("tobedir/in", b"now a dir", 0o644)
    recs += [Unlink(path="tobefile/sub/f"), RmDir(path="tobefile/sub"), RmDir(path="tobefile")]
    recs += _file_records("tobefile", b"now a file", 0o600)
    recs += [Unlink(path="tobefile2")] + _file_records("tobefile2", b"was a symlink", 0o644)
    recs += [Unlink(path="empty"), Symlink(path="empty", target="big")]
    recs += [Write(path="big", offset=MAX_DATA + 5, data=b"changed in the middle"), Truncate(path="holey", size=7)]
    recs += [Unlink(path="e/h3"), HardLink(path="d1/d2/h4", existing="h1"), Write(path="h1", offset=0, data=b"L")]
    recs += [Rename(old="d1/d2", new="e/moved"), SetAttr(path="e", mode=0o700), SetAttr(path="lnk", mtime_ns=5)]
    recs += [SetXattr(path="h1", name=XATTR, value=None)]
    return recs


def check_rich_roundtrip(ctx: _Ctx) -> None:
    vol = ctx.volume()
    m1 = Model()
    m1.apply_all(_rich_tree())
    _apply(vol, "q", _rich_tree())
    _check(vol.fingerprint("q") == m1.digest(), "the active FS after apply differs from the reference model")
    vol.snapshot_create("s1")
    m2 = m1.copy()
    m2.apply_all(_rich_changes())
    _apply(vol, "q", _rich_changes(), use_purgatory=True)
    _check(vol.fingerprint("q") == m2.digest(), "the active FS after the changes differs from the model")
    vol.snapshot_create("s2")
    models = {"s1": m1, "s2": m2}
    for base, target in [(None, "s1"), (None, "s2"), ("s1", "s2"), ("s2", "s1"), ("s1", "s1"), ("s2", "s2")]:
        check_diff(vol, "q", base, target, base_model=models.get(base or ""), target_fp=models[target].digest())
    # hard links survive diff + apply: a write through one name shows under every name
    fp2 = m2.digest()
    check_diff(vol, "q", None, "s2", base_model=None, target_fp=fp2, scratch="cp")
    m2.apply_all([Write(path="d1/h2", offset=1, data=b"INK")])
    _apply(vol, "cp", [Write(path="d1/h2", offset=1, data=b"INK")])
    _check(vol.fingerprint("cp") == m2.digest(), "hard links were not reproduced by diff + apply")
    _apply(vol, "q", [Write(path="d1/h2", offset=1, data=b"INK")])
    _check(vol.fingerprint("q", "s2") == fp2, "a write to the active FS changed a PCPI")


def check_purgatory(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _rich_tree())
    m = Model()
    m.apply_all(_rich_tree())
    m.apply_all(_rich_changes())
    _apply(vol, "q", _rich_changes(), use_purgatory=True)
    fp = vol.fingerprint("q")
    _check(fp == m.digest(), "entries moved to the purgatory are visible to fingerprint")
    _check(vol.qtree_list() == ["q"], "the purgatory must not show up as a qtree")
    vol.snapshot_create("s")
    _check(vol.qtree_list("s") == ["q"], "the purgatory must not show up as a qtree of a PCPI")
    check_diff(vol, "q", None, "s", base_model=None, target_fp=fp)
    _check(vol.purge_purgatory(["q", "cf-copy", "missing"]), "purge_purgatory returned a false value")
    _check(vol.purge_purgatory(["q"]), "purge_purgatory twice must succeed")
    _check(vol.fingerprint("q") == fp and vol.fingerprint("q", "s") == fp, "purge changed the qtree or a PCPI")
    vol.snapshot_create("s2")
    check_diff(vol, "q", "s", "s2", base_model=m, target_fp=fp)
    _recs = list(vol.diff("q", "s", "s2"))
    _check(len(_recs) == 2, f"purging the purgatory must not show up in a diff: {_recs[1:-1][:3]}")
