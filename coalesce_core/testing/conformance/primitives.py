"""Plain checks of the basic primitives: open, an empty volume, PCPIs, exports, qtree removal."""

from __future__ import annotations

import os

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import MkDir, MkFile, Unlink, Write
from coalesce_core.testing.conformance.base import EMPTY, _check
from coalesce_core.testing.conformance.changes import _file_records
from coalesce_core.testing.conformance.helpers import _apply, _Ctx, _expect
from coalesce_core.testing.conformance.trees import _rich_tree


def check_open(ctx: _Ctx) -> None:
    url = ctx.make()
    if ctx.fresh_urls:
        exc = _expect(
            (BackendError,),
            lambda: Volume.open(ctx.pm, url, create=False),
            "opening a volume that does not exist with create=False",
        )
        _check(bool(getattr(exc, "hint", "")), "the BackendError for a missing volume must carry a hint")
    v1 = Volume.open(ctx.pm, url, create=True)
    _apply(v1, "q", [MkFile(path="f")])
    v2 = Volume.open(ctx.pm, url, create=True)
    _check(v2.qtree_list() == ["q"], "open(create=True) of an existing volume must not empty it")
    v3 = Volume.open(ctx.pm, url, create=False)
    _check(v3.fingerprint("q") == v1.fingerprint("q"), "two handles of one volume disagree")
    md = v3.metadata_dir()
    _check(md is None or os.path.isdir(md), f"metadata_dir {md!r} is not None or an existing directory")
    for v in (v1, v2, v3):
        v.close()
        v.close()  # idempotent


def check_empty_volume(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _check(vol.snapshot_list() == [], "a new volume holds no PCPI")
    _check(vol.qtree_list() == [], "a new volume holds no qtree")
    _check(vol.fingerprint("missing") == EMPTY, "a missing qtree must digest as fingerprint.digest([])")
    _check(all(v is None for v in vol.exported().values()), "a new volume exports nothing")
    _apply(vol, "q", [])
    _check(vol.qtree_list() == ["q"], "apply must create the qtree")
    _check(vol.fingerprint("q") == EMPTY, "an empty qtree digests like a missing one")


def check_snapshots(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _file_records("f", b"one", 0o644))
    _check(vol.snapshot_create("s1") == "s1", "snapshot_create must return the name")
    fp1 = vol.fingerprint("q", "s1")
    _check(fp1 == vol.fingerprint("q"), "a fresh PCPI equals the active FS")
    _apply(vol, "q", [Write(path="f", offset=0, data=b"two"), MkDir(path="new")])
    _check(vol.snapshot_create("s1") == "s1", "snapshot_create of an existing name must return the name")
    _check(vol.fingerprint("q", "s1") == fp1, "snapshot_create of an existing name retook the PCPI")
    _check(vol.fingerprint("q") != fp1, "the active FS did not change")
    _check(vol.snapshot_list() == ["s1"], f"snapshot_list is {vol.snapshot_list()}")
    vol.snapshot_create("s2")
    _check(sorted(vol.snapshot_list()) == ["s1", "s2"], "snapshot_list must list every PCPI")
    _check(vol.qtree_list("s1") == ["q"], "qtree_list of a PCPI")
    _apply(vol, "q2", [])
    _check(vol.qtree_list("s1") == ["q"] and vol.qtree_list() == ["q", "q2"], "qtree_list after a new qtree")
    _check(vol.snapshot_delete("s1") is True, "deleting an existing PCPI returns True")
    _check(vol.snapshot_delete("s1") is False, "deleting a missing PCPI returns False (a no-op)")
    _check(vol.snapshot_list() == ["s2"], "snapshot_list after delete")
    _check(vol.fingerprint("q", "s2") == vol.fingerprint("q"), "deleting one PCPI disturbed another")
    for what, fn in [
        ("fingerprint of a missing PCPI", lambda: vol.fingerprint("q", "nope")),
        ("diff to a missing PCPI", lambda: list(vol.diff("q", None, "nope"))),
        ("diff from a missing PCPI", lambda: list(vol.diff("q", "nope", "s2"))),
        ("qtree_list of a missing PCPI", lambda: vol.qtree_list("nope")),
        ("diff of a qtree missing in the PCPI", lambda: list(vol.diff("nope", None, "s2"))),
    ]:
        _expect((BackendError,), fn, what)


def check_export(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "r1", [MkFile(path="f")])
    vol.snapshot_create("s1")
    vol.snapshot_create("s2")
    mapping = {"r1": "s1", "r2": "s2", "r3": ACTIVE, "r4": None}
    for _ in range(2):
        _check(bool(vol.export(mapping)), "export returned a false value")
        got = vol.exported()
        for r, v in mapping.items():
            _check(got.get(r) == v, f"exported()[{r!r}] is {got.get(r)!r}, expected {v!r}")
    _expect((BackendError,), lambda: vol.export({"r1": "s2", "r2": "no-such-pcpi"}), "exporting a missing PCPI")
    got = vol.exported()
    _check(all(got.get(r) == v for r, v in mapping.items()), "a refused export changed the export table")
    vol.export({"r1": "s2"})
    got = vol.exported()
    _check(
        got.get("r1") == "s2" and all(got.get(r) is None for r in ("r2", "r3", "r4")),
        "replicas absent from the mapping must export nothing",
    )
    path = vol.export_path("r1")
    _check(path is None or isinstance(path, str), "export_path must be None or a str")
    vol.export({})
    _check(all(v is None for v in vol.exported().values()), "export({}) must clear the table")


def check_pcpi_path(ctx: _Ctx) -> None:
    """``pcpi_path`` is None, or a directory showing the qtree as the PCPI holds it (not the active
    FS); None for a PCPI the volume does not hold."""
    vol = ctx.volume()
    _apply(vol, "q", _file_records("f", b"kept", 0o644))
    vol.snapshot_create("s1")
    _apply(vol, "q", [Write(path="f", offset=0, data=b"gone"), MkFile(path="late")])
    path = vol.pcpi_path("s1", "q")
    _check(path is None or isinstance(path, str), f"pcpi_path must be None or a str, not {path!r}")
    if path is not None:
        _check(os.path.isdir(path), f"pcpi_path {path!r} is not a directory")
        names = os.listdir(path)
        _check("f" in names and "late" not in names, f"pcpi_path {path!r} lists {sorted(names)}, not the PCPI's qtree")
        with open(os.path.join(path, "f"), "rb") as fh:
            _check(fh.read() == b"kept", f"pcpi_path {path!r} shows the active FS's bytes, not the PCPI's")
    _check(vol.pcpi_path("nope", "q") is None, "pcpi_path of a PCPI the volume does not hold must be None")


def check_remove_qtree(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _rich_tree())
    _apply(vol, "keep", _file_records("f", b"keep", 0o644))
    vol.snapshot_create("s")
    fp_q, fp_keep = vol.fingerprint("q"), vol.fingerprint("keep")
    _apply(vol, "q", [Unlink(path="h1")], use_purgatory=True)
    vol.remove_qtree("q")
    vol.remove_qtree("q")
    _check(vol.qtree_list() == ["keep"], "remove_qtree left the qtree listed")
    _check(vol.fingerprint("q") == EMPTY, "a removed qtree must digest as the empty tree")
    _check(vol.fingerprint("q", "s") == fp_q, "remove_qtree changed a PCPI")
    _check(vol.fingerprint("keep") == fp_keep, "remove_qtree changed another qtree")
    _apply(vol, "q", [])
    _check(vol.fingerprint("q") == EMPTY, "a re-created qtree must start empty (purgatory included)")


def check_claims(ctx: _Ctx) -> None:
    """Owner records (``coalesce_claim``): written once, first writer wins, read back by another
    handle, outside every qtree and PCPI; or None throughout for a volume that keeps none."""
    url = ctx.make()
    vol = Volume.open(ctx.pm, url, create=True)
    key, other = f"conformance.{os.getpid()}-{id(vol):x}", f"conformance.other-{id(vol):x}"
    first = vol.claim(key)
    if first is None:
        _check(vol.claim(key, "one") is None, "claim answered None once: it must always (no owner records)")
        return
    _check(first == "", f"a key that holds nothing must read as '', not {first!r}")
    _check(vol.claim(key, "one") == "one", "the first claim must store its value and return it")
    _check(vol.claim(key, "two") == "one", "a later claim must return the stored value unchanged")
    _check(vol.claim(key) == "one", "reading a claimed key")
    _check(vol.claim(other) == "", "a claim changed another key")
    again = Volume.open(ctx.pm, url, create=False)
    _check(again.claim(key, "three") == "one", "another handle of the volume must read the stored record")
    if ctx.fresh_urls:
        _check(vol.qtree_list() == [] and vol.snapshot_list() == [], "an owner record shows as a qtree or PCPI")
    for v in (vol, again):
        v.close()
