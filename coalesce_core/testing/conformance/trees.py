"""Plain checks of a rich tree: diff + apply for every pair of PCPIs, and the purgatory."""

from __future__ import annotations

from coalesce_core.stream import records as R
from coalesce_core.testing.conformance.base import XATTR, _check
from coalesce_core.testing.conformance.changes import _file_records
from coalesce_core.testing.conformance.helpers import _apply, _Ctx, check_diff
from coalesce_core.testing.conformance.model import Model


def _rich_tree() -> list[object]:
    big = bytes(range(256)) * ((2 * R.MAX_DATA + 1000) // 256)
    holey = b"head" + bytes(R.MAX_DATA + 10) + b"tail" + bytes(R.MAX_DATA)
    recs: list[object] = [R.MkDir(path="d1", mode=0o700), R.MkDir(path="d1/d2", mode=0o700), R.MkDir(path="e")]
    recs += _file_records("d1/d2/small", b"small file\n", 0o640)
    recs += _file_records("empty", b"", 0o600)
    recs += _file_records("big", big, 0o644)
    recs += _file_records("holey", holey, 0o755)
    recs += _file_records("tobedir", b"x", 0o644)
    recs += [R.MkDir(path="tobefile"), R.MkDir(path="tobefile/sub")] + _file_records("tobefile/sub/f", b"f", 0o644)
    recs += [
        R.Symlink(path="lnk", target="d1/d2/small"),
        R.Symlink(path="dangling", target="../../nowhere"),
        R.Symlink(path="abs", target="/etc/passwd"),
        R.Symlink(path="tobefile2", target="x"),
    ]
    recs += _file_records("h1", b"linked", 0o644)
    recs += [R.HardLink(path="d1/h2", existing="h1"), R.HardLink(path="e/h3", existing="h1")]
    recs += [
        R.SetXattr(path="h1", name=XATTR, value=b"v"),
        R.SetXattr(path="d1", name=XATTR, value=b"dir"),
        R.SetAttr(path="d1/d2", mode=0o755, mtime_ns=10**18),
        R.SetAttr(path="d1", mode=0o750),
    ]
    return recs


def _rich_changes() -> list[object]:
    recs: list[object] = [R.Unlink(path="tobedir"), R.MkDir(path="tobedir", mode=0o755)]
    recs += _file_records("tobedir/in", b"now a dir", 0o644)
    recs += [R.Unlink(path="tobefile/sub/f"), R.RmDir(path="tobefile/sub"), R.RmDir(path="tobefile")]
    recs += _file_records("tobefile", b"now a file", 0o600)
    recs += [R.Unlink(path="tobefile2")] + _file_records("tobefile2", b"was a symlink", 0o644)
    recs += [R.Unlink(path="empty"), R.Symlink(path="empty", target="big")]
    recs += [
        R.Write(path="big", offset=R.MAX_DATA + 5, data=b"changed in the middle"),
        R.Truncate(path="holey", size=7),
    ]
    recs += [R.Unlink(path="e/h3"), R.HardLink(path="d1/d2/h4", existing="h1"), R.Write(path="h1", offset=0, data=b"L")]
    recs += [R.Rename(old="d1/d2", new="e/moved"), R.SetAttr(path="e", mode=0o700), R.SetAttr(path="lnk", mtime_ns=5)]
    recs += [R.SetXattr(path="h1", name=XATTR, value=None)]
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
    m2.apply_all([R.Write(path="d1/h2", offset=1, data=b"INK")])
    _apply(vol, "cp", [R.Write(path="d1/h2", offset=1, data=b"INK")])
    _check(vol.fingerprint("cp") == m2.digest(), "hard links were not reproduced by diff + apply")
    _apply(vol, "q", [R.Write(path="d1/h2", offset=1, data=b"INK")])
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
