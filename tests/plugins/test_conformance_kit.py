"""Tests of the conformance kit itself: it catches broken backends, its
reference model enforces the order contract, its settings follow
HYPOTHESIS_PROFILE, and every primitive hook is documented for backend writers."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import Phase
from hypothesis import settings as Settings
from hypothesis.stateful import run_state_machine_as_test

from coalesce_core.backend import hookspecs
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.errors import CoalesceError, HostilePath
from coalesce_core.stream.records import Begin, End, MkDir, MkFile, RmDir, SetAttr, Unlink, Write
from coalesce_core.testing import conformance
from coalesce_mem.tree import entries_of
from coalesce_mem.volume import MemVolume

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-backend.md"


# --------------------------------------------------------------- a deliberately broken backend
class BuggyVolume(MemVolume):
    def __init__(self, location: str, bug: str) -> None:
        super().__init__("brk", location)
        self.bug = bug

    def snapshot_create(self, name):
        if self.bug == "retake":
            self.snapshots.pop(name, None)
        return super().snapshot_create(name)

    def snapshot_delete(self, name):
        existed = super().snapshot_delete(name)
        return True if self.bug == "delete_always_true" else existed

    def apply(self, qtree, records, use_purgatory):
        if self.bug != "follows_symlinks":
            return super().apply(qtree, records, use_purgatory)
        n = b = 0
        for rec in records:  # a naive applier: silently skips what it cannot resolve safely
            if isinstance(rec, (Begin, End)):
                continue
            try:
                res = super().apply(qtree, [rec], use_purgatory)
            except HostilePath:
                if any(
                    ".." in p or p.startswith("/") or "\x00" in p
                    for p in (
                        getattr(rec, "path", ""),
                        getattr(rec, "existing", ""),
                        getattr(rec, "old", ""),
                        getattr(rec, "new", ""),
                    )
                    if isinstance(p, str)
                ):
                    raise
                continue
            n += res["records"]
            b += res["bytes"]
        return {"records": n, "bytes": b}

    def diff(self, qtree, base, target):
        recs = list(super().diff(qtree, base, target))
        if self.bug == "deletes_last":
            deletes = [r for r in recs if isinstance(r, (Unlink, RmDir))]
            recs = [r for r in recs[:-1] if not isinstance(r, (Unlink, RmDir))] + deletes + recs[-1:]
        if self.bug == "drops_setattr":
            recs = [r for r in recs[1:-1] if not isinstance(r, SetAttr)]
            recs = [Begin(qtree=qtree, base=base, target=target)] + recs + [End(records=len(recs))]
        return iter(recs)

    def fingerprint(self, qtree, snapshot):
        if self.bug == "purgatory_visible":
            with self.lock:
                st = self._state(qtree, snapshot)
                if st is not None and st.purgatory.children:
                    from coalesce_core.stream.fingerprint import digest

                    return digest(entries_of(st.root) + entries_of(st.purgatory))
        return super().fingerprint(qtree, snapshot)

    def export(self, mapping):
        if self.bug != "export_not_atomic":
            return super().export(mapping)
        for replica, value in mapping.items():  # one entry at a time: a bad one leaves a mix
            super().export({**self.exports, replica: value})
        return True


class BuggyBackend:
    """A plugin object (no entry point) serving brk:// volumes, with one bug."""

    def __init__(self, bug: str) -> None:
        self.bug = bug
        self.vols: dict[str, BuggyVolume] = {}

    def _mine(self, v):
        return isinstance(v, BuggyVolume)

    @hookimpl
    def coalesce_backend_info(self):
        return {"scheme": "brk", "description": f"broken on purpose: {self.bug}"}

    @hookimpl
    def coalesce_open_volume(self, url, create):
        if url.scheme != "brk":
            return None
        if url.location not in self.vols:
            if not create:
                from coalesce_core.errors import BackendError

                raise BackendError(f"no volume {url}", hint="create it")
            self.vols[url.location] = BuggyVolume(url.location, self.bug)
        return self.vols[url.location]

    @hookimpl
    def coalesce_close_volume(self, volume):
        return True if self._mine(volume) else None

    @hookimpl
    def coalesce_metadata_dir(self, volume):
        return None

    @hookimpl
    def coalesce_snapshot_create(self, volume, name):
        return volume.snapshot_create(name) if self._mine(volume) else None

    @hookimpl
    def coalesce_snapshot_delete(self, volume, name):
        return volume.snapshot_delete(name) if self._mine(volume) else None

    @hookimpl
    def coalesce_snapshot_list(self, volume):
        return volume.snapshot_list() if self._mine(volume) else None

    @hookimpl
    def coalesce_qtree_list(self, volume, snapshot):
        return volume.qtree_list(snapshot) if self._mine(volume) else None

    @hookimpl
    def coalesce_diff(self, volume, qtree, base, target):
        return volume.diff(qtree, base, target) if self._mine(volume) else None

    @hookimpl
    def coalesce_apply(self, volume, qtree, records, use_purgatory):
        return volume.apply(qtree, records, use_purgatory) if self._mine(volume) else None

    @hookimpl
    def coalesce_purge_purgatory(self, volume, qtrees):
        return volume.purge_purgatory(list(qtrees)) if self._mine(volume) else None

    @hookimpl
    def coalesce_remove_qtree(self, volume, qtree):
        return volume.remove_qtree(qtree) if self._mine(volume) else None

    @hookimpl
    def coalesce_export(self, volume, mapping):
        return volume.export(dict(mapping)) if self._mine(volume) else None

    @hookimpl
    def coalesce_exported(self, volume):
        return volume.exported() if self._mine(volume) else None

    @hookimpl
    def coalesce_pcpi_path(self, volume, pcpi, qtree):
        if self._mine(volume) and self.bug == "pcpi_path_nowhere":
            return f"/nonexistent/{pcpi}/{qtree}"  # a path for every name, readable or not
        return None

    @hookimpl
    def coalesce_fingerprint(self, volume, qtree, snapshot):
        return volume.fingerprint(qtree, snapshot) if self._mine(volume) else None


_ids = itertools.count()


def _make() -> str:
    return f"brk://v{next(_ids)}"


def test_a_correct_backend_passes():
    conformance.run_basic_checks(_make, plugins=[BuggyBackend("none")])


@pytest.mark.parametrize(
    "bug, check",
    [
        ("retake", "snapshots"),
        ("delete_always_true", "snapshots"),
        ("follows_symlinks", "hostile_records"),
        ("deletes_last", "rich_roundtrip"),
        ("drops_setattr", "rich_roundtrip"),
        ("purgatory_visible", "purgatory"),
        ("export_not_atomic", "export"),
        ("pcpi_path_nowhere", "pcpi_path"),
    ],
)
def test_the_plain_checks_catch_a_broken_backend(bug, check):
    with pytest.raises(AssertionError):
        conformance.run_basic_check(check, _make, plugins=[BuggyBackend(bug)])


@pytest.mark.parametrize("bug", ["retake", "deletes_last", "follows_symlinks"])
def test_the_state_machine_catches_a_broken_backend(bug):
    machine = conformance.conformance_machine(_make, plugins=[BuggyBackend(bug)])
    fast = Settings(conformance.conformance_settings(200, 30), phases=[Phase.generate], database=None)
    # the suite fails the broken backend, by a failed check or by the error the bug provokes first
    with pytest.raises((AssertionError, CoalesceError)):
        run_state_machine_as_test(machine, settings=fast)


# --------------------------------------------------------------- the reference model
def test_model_enforces_the_order_contract():
    m = conformance.Model()
    m.apply_all([MkDir(path="d"), MkFile(path="d/f")])
    for bad in (
        [MkFile(path="d/f")],  # replace without delete
        [MkFile(path="nope/f")],  # parent missing
        [RmDir(path="d")],  # not empty
        [Write(path="d", offset=0, data=b"x")],  # not a file
        [SetAttr(path="d", mode=0o755), MkFile(path="d/g")],
    ):  # SetAttr before contents
        with pytest.raises(conformance.ConformanceError):
            m.copy().apply_all(bad)
    m.apply_all([Unlink(path="d/f"), RmDir(path="d"), MkFile(path="d")])
    assert set(m.nodes) == {"d"}


def test_settings_follow_hypothesis_profile(monkeypatch):
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    s = conformance.conformance_settings()
    assert (s.max_examples, s.stateful_step_count) == (
        conformance.DEFAULT_MAX_EXAMPLES,
        conformance.DEFAULT_STATEFUL_STEPS,
    )
    Settings.register_profile("cf-test-profile", max_examples=7, stateful_step_count=9)
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "cf-test-profile")
    s = conformance.conformance_settings()
    assert (s.max_examples, s.stateful_step_count, s.deadline) == (7, 9, None)
    assert conformance.conformance_settings(max_examples=3).max_examples == 3
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "no-such-profile-anywhere")
    assert conformance.conformance_settings().max_examples == conformance.DEFAULT_MAX_EXAMPLES


# --------------------------------------------------------------- docs (datasette's idea)
def test_every_primitive_hook_is_documented_for_backend_writers():
    text = DOC.read_text()
    missing = [h for h in hookspecs.PRIMITIVE_HOOKS + ("coalesce_backend_info",) if f"`{h}(" not in text]
    assert not missing, f"docs/writing-a-backend.md does not document {missing}"
    checks = [c for c in conformance.BASIC_CHECKS if f"`{c}`" not in text]
    assert not checks, f"docs/writing-a-backend.md does not describe the conformance checks {checks}"
    assert re.search(r"coalesce\.backends", text)
