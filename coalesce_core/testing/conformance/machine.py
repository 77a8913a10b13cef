"""The state machine, and the whole suite in one call."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from hypothesis import note
from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.volume import Volume
from coalesce_core.stream.records import MkDir, framed
from coalesce_core.testing.conformance.base import EMPTY, NAMES, SNAP_NAMES, _check
from coalesce_core.testing.conformance.changes import _file_records, draw_changes
from coalesce_core.testing.conformance.checks import run_basic_checks
from coalesce_core.testing.conformance.helpers import EMPTY_FP, _apply, _expect, _fps, _pm, check_diff
from coalesce_core.testing.conformance.hostile import HOSTILE_SETUP, hostile_records
from coalesce_core.testing.conformance.model import Model
from coalesce_core.testing.conformance.rollback import check_rollback
from coalesce_core.testing.conformance.settings import conformance_settings


def conformance_machine(
    make_volume_url: Callable[[], str],
    *,
    plugins: Iterable[object] = (),
    names: tuple[str, ...] = NAMES,
    xattrs: bool = True,
    big_files: bool = True,
    cleanup: Callable[[str], None] | None = None,
    settings: Settings | None = None,
) -> type[RuleBasedStateMachine]:
    """A RuleBasedStateMachine class over the primitives of the backend that
    serves ``make_volume_url()`` (a fresh volume per example).  Its
    ``.TestCase`` is a unittest class pytest collects."""
    plugs = tuple(plugins)
    gen: dict[str, Any] = dict(names=names, xattrs=xattrs, big_files=big_files)

    class BackendConformance(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.url = make_volume_url()
            self.vol = Volume.open(_pm(plugs), self.url, create=True)
            self.model = Model()  # the "src" qtree
            self.snaps: dict[str, dict[str, Any]] = {}  # name -> {"fps", "model"}
            self.exports: dict[str, str | None] = {}
            self.markers = 0
            self.last: str | None = None  # the newest PCPI of replication_cycle
            _apply(self.vol, "cf-other", [MkDir(path="d")] + _file_records("f", b"other", 0o644))
            self.other_fp = self.vol.fingerprint("cf-other")

        # --- source writes
        @rule(data=st.data(), count=st.integers(1, 6))
        def write_source(self, data: st.DataObject, count: int) -> None:
            recs = draw_changes(data.draw, self.model, count, **gen)
            note(f"source changes: {recs!r}")
            _apply(self.vol, "src", recs)

        # --- PCPIs
        @rule(name=st.sampled_from(SNAP_NAMES))
        def snapshot_create(self, name: str) -> None:
            if name in self.snaps:
                before = self.vol.fingerprint("src", name)
                self.markers += 1
                recs = _file_records(f"cf-marker-{self.markers}", b"written between two creates", 0o644)
                self.model.apply_all(recs)
                _apply(self.vol, "src", recs)
                _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
                _check(
                    self.vol.fingerprint("src", name) == before == self.snaps[name]["fps"].get("src"),
                    f"snapshot_create({name!r}) of an existing PCPI retook it",
                )
            else:
                self.vol.snapshot_delete(name)
                _apply(self.vol, "src", [])  # make sure "src" exists
                _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
                self.snaps[name] = {"fps": _fps(self.vol, name), "model": self.model.copy()}
                _check(self.snaps[name]["fps"] == _fps(self.vol), "a new PCPI differs from the active FS")
            _check(name in self.vol.snapshot_list(), "snapshot_list misses a PCPI")

        @precondition(lambda self: self.snaps)
        @rule(data=st.data())
        def snapshot_delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            if name in self.exports.values():
                return
            _check(self.vol.snapshot_delete(name) is True, "deleting an existing PCPI returns True")
            _check(self.vol.snapshot_delete(name) is False, "deleting it again returns False")
            del self.snaps[name]
            _check(name not in self.vol.snapshot_list(), "snapshot_list still shows a deleted PCPI")

        @rule()
        def verify_snapshots(self) -> None:
            _check(sorted(self.vol.snapshot_list()) == sorted(self.snaps), "snapshot_list disagrees")
            for name, info in self.snaps.items():
                _check(_fps(self.vol, name) == info["fps"], f"PCPI {name} changed after it was taken")

        # --- diff + apply
        @rule(data=st.data(), count=st.integers(1, 8), use_purgatory=st.booleans())
        def replication_cycle(self, data: st.DataObject, count: int, use_purgatory: bool) -> None:
            """What the agent does on a source: change, take a new PCPI, diff from the last one."""
            last = self.last if self.last in self.snaps else None
            recs = draw_changes(data.draw, self.model, count, **gen)
            note(f"source changes: {recs!r}")
            _apply(self.vol, "src", recs)
            free = [n for n in SNAP_NAMES if n not in self.snaps]
            if not free:
                victims = [n for n in sorted(self.snaps) if n != last and n not in self.exports.values()]
                if not victims:
                    return
                self.vol.snapshot_delete(victims[0])
                del self.snaps[victims[0]]
                free = [victims[0]]
            name = free[0]
            _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
            self.snaps[name] = {"fps": _fps(self.vol, name), "model": self.model.copy()}
            self.last = name
            self._check_diff(last, name, use_purgatory)

        @precondition(lambda self: self.snaps)
        @rule(data=st.data(), use_purgatory=st.booleans())
        def diff_apply(self, data: st.DataObject, use_purgatory: bool) -> None:
            names_ = sorted(self.snaps)
            base = data.draw(st.one_of(st.sampled_from(names_), st.none()))
            target = data.draw(st.sampled_from(names_))
            self._check_diff(base, target, use_purgatory)

        def _check_diff(self, base: str | None, target: str, use_purgatory: bool) -> None:
            """check_diff of "src" from PCPI ``base`` (None: a baseline) to ``target``, against the model
            and fingerprints kept when they were taken."""
            check_diff(
                self.vol,
                "src",
                base,
                target,
                base_model=self.snaps[base]["model"] if base else None,
                target_fp=self.snaps[target]["fps"].get("src", EMPTY_FP),
                use_purgatory=use_purgatory,
            )

        @precondition(lambda self: self.snaps)
        @rule(data=st.data(), to_none=st.booleans())
        def partial_apply_and_rollback(self, data: st.DataObject, to_none: bool) -> None:
            names_ = sorted(self.snaps)
            base = data.draw(st.sampled_from(names_))
            target = data.draw(st.sampled_from(names_))
            n = len(list(self.vol.diff("src", base, target))) - 2
            k = data.draw(st.integers(0, n))
            check_rollback(self.vol, "src", base, target, k, to_none=to_none)

        # --- exports
        @rule(data=st.data())
        def export(self, data: st.DataObject) -> None:
            values = [None, ACTIVE] + sorted(self.snaps)
            mapping = {
                r: data.draw(st.sampled_from(values))
                for r in data.draw(st.lists(st.sampled_from(["r1", "r2", "r3"]), unique=True))
            }
            for _ in range(2):
                _check(bool(self.vol.export(mapping)), "export returned a false value")
                got = self.vol.exported()
                _check(
                    all(got.get(r) == mapping.get(r) for r in set(got) | set(mapping)),
                    f"exported() is {got}, expected {mapping}",
                )
            self.exports = mapping

        # --- purgatory, removal
        @rule()
        def purge(self) -> None:
            before = _fps(self.vol)
            _check(bool(self.vol.purge_purgatory(list(before))), "purge_purgatory returned a false value")
            _check(bool(self.vol.purge_purgatory(list(before))), "purge_purgatory twice")
            _check(_fps(self.vol) == before, "purging the purgatory changed a qtree")

        @rule()
        def remove_scratch(self) -> None:
            self.vol.remove_qtree("cf-copy")
            self.vol.remove_qtree("cf-copy")
            _check("cf-copy" not in self.vol.qtree_list(), "remove_qtree left the qtree")
            _check(self.vol.fingerprint("cf-copy") == EMPTY, "a removed qtree digests as the empty tree")

        # --- hostile streams
        @rule(data=st.data(), use_purgatory=st.booleans())
        def hostile(self, data: st.DataObject, use_purgatory: bool) -> None:
            label, rec, accepted = data.draw(st.sampled_from(hostile_records()))
            self.vol.remove_qtree("h")
            _apply(self.vol, "h", HOSTILE_SETUP)
            before = _fps(self.vol)
            _expect(
                accepted,
                lambda: self.vol.apply("h", framed("h", None, "x", [rec]), use_purgatory=use_purgatory),
                f"hostile record {label}",
            )
            _check(_fps(self.vol) == before, f"hostile record {label} changed something")

        # --- after every step
        @invariant()
        def source_matches_model(self) -> None:
            _check(self.vol.fingerprint("src") == self.model.digest(), "the src qtree differs from the reference model")
            _check(self.vol.fingerprint("cf-other") == self.other_fp, "an apply elsewhere changed cf-other (I10)")

        def teardown(self) -> None:
            self.vol.close()
            if cleanup is not None:
                cleanup(self.url)

    BackendConformance.TestCase.settings = settings or conformance_settings()
    return BackendConformance


def run_conformance(
    make_volume_url: Callable[[], str],
    *,
    max_examples: int | None = None,
    stateful_steps: int | None = None,
    plugins: Iterable[object] = (),
    basic: bool = True,
    fresh_urls: bool = True,
    names: tuple[str, ...] = NAMES,
    xattrs: bool = True,
    big_files: bool = True,
    cleanup: Callable[[str], None] | None = None,
) -> None:
    """Run the whole suite against the backend serving ``make_volume_url()``.

    ``make_volume_url`` returns the URL of a *new* volume on every call (set
    ``fresh_urls=False`` if it cannot, to skip the missing-volume check).
    ``plugins`` are extra plugin objects to register (e.g. a backend under
    development that has no entry point yet).  Raises ConformanceError (an
    AssertionError) or the backend's exception, with hypothesis's minimal
    failing program printed for the stateful part.
    """
    plugins = tuple(plugins)
    if basic:
        run_basic_checks(make_volume_url, plugins=plugins, fresh_urls=fresh_urls)
    machine = conformance_machine(
        make_volume_url, plugins=plugins, names=names, xattrs=xattrs, big_files=big_files, cleanup=cleanup
    )
    run_state_machine_as_test(machine, settings=conformance_settings(max_examples, stateful_steps))
