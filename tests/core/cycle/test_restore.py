"""The pure part of restoring a ledger behind its volumes (coalesce_core/cycle/restore.py): hand-built
states and evidence, no backend.  Every way out of the cycle is a path of the spec (I8), the decision has
no effects, and what it leaves keeps I1, I2 and I4."""

from __future__ import annotations

import itertools

import pytest

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.cycle import restore
from coalesce_core.cycle.invariants import (
    i1_fixed_consumption,
    i2_bounded_extras,
    i4_one_coalesced_point,
    i8_legal_edges,
    i11_kept_writes,
)
from coalesce_core.cycle.machines import default_model
from coalesce_core.cycle.restore import Facts, Proof, choose_base, examine, number, reconcile, replica_action
from coalesce_core.cycle.spec import load_spec
from coalesce_core.cycle.state import GroupState, Pcpi, Replica, SourcePcpi

SPEC = load_spec()
OLD_BASE, OLD_SRC = "co-g-000003-new_base", "co-g-src-000001"
NEW_BASE, NEW_SRC = "co-g-000009-new_base", "co-g-src-000007"
OTHER = "co-g-000008-individual"


def test_number_reads_the_sequence_number_of_a_pcpi_name():
    assert number("co-g-000012-base") == 12 and number("co-g-src-000007") == 7
    assert number("co-a-000001-x-000002-base") == 1 and number("snap") == -1


def test_every_way_out_of_the_cycle_is_a_path_of_the_spec_to_reseed_pending():
    model = default_model()
    for state in SPEC.replica.state_names:
        can_reseed = any(
            replica_action(state, *flags) == "reseed" for flags in itertools.product((False, True), repeat=4)
        )
        if not can_reseed:
            continue
        here = state
        for trigger in restore._TO_RESEED[state]:
            here = model.replica_next("r", here, trigger)
        assert here == "reseed_pending", state


@pytest.mark.parametrize("state", sorted(load_spec().replica.state_names))
def test_the_action_table_keeps_only_what_is_proven(state):
    for proven, active, on_base, broken in itertools.product((False, True), repeat=4):
        action = replica_action(state, proven, active, on_base, broken)
        assert action in ("keep", "reseed", "baseline_again", "untouched")
        if action == "keep" and state not in ("reseed_pending", "broken"):
            assert proven, (state, action)
        if state == "stable" and action == "keep":
            assert proven and active and on_base
        if state in ("update", "rollback", "done", "done_uncoalesced", "reseeding"):
            assert action == "reseed"


def test_the_base_is_the_image_most_replicas_export_and_the_newest_of_equals():
    def pr(name, image, point="s"):
        return Proof(name, image=image, point=point)

    assert choose_base({"a": pr("a", "co-g-000004-base"), "b": pr("b", "co-g-000009-base")}) == "co-g-000009-base"
    three = {"a": pr("a", "x-000001-base"), "b": pr("b", "x-000001-base"), "c": pr("c", "x-000005-base")}
    assert choose_base(three) == "x-000001-base"
    assert choose_base({"a": Proof("a", image="x-000001-base")}) is None  # not proven: never the base


def _old_ledger() -> GroupState:
    """A ledger at cycle 1 with a replica in each state that held an image."""
    reps = {}
    for i, st in enumerate(
        ["stable", "stable", "done", "update", "rollback", "unstable_uncoalesced", "stable_uncoalesced"]
        + ["reseed_pending", "reseeding", "reseeded", "broken", "uninitialized", "baseline"]
    ):
        name = f"r{i}-{st}"
        if st in ("uninitialized", "baseline"):
            reps[name] = Replica(name=name, source_qtree=name, state=st)
            continue
        exported = ACTIVE if st == "broken" else OLD_BASE
        reps[name] = Replica(
            name=name,
            source_qtree=name,
            state=st,
            exported=exported,
            source_point=OLD_SRC,
            active_point=OLD_SRC,
            last_good=OLD_BASE if st not in ("stable", "done", "update", "rollback") else None,
        )
    return GroupState(
        name="g",
        phase="updating",
        cycle=2,
        seq=4,
        replicas=reps,
        pcpis={OLD_BASE: Pcpi(name=OLD_BASE, role="base", cycle=1, taken=True)},
        source_pcpis={OLD_SRC: SourcePcpi(name=OLD_SRC, cycle=1, taken=True, taken_at=5.0)},
        cycle_targets={"default": "co-g-src-000004"},
        transfers_started=True,
    )


def test_an_older_ledger_is_made_to_match_the_volumes_without_effects():
    state = _old_ledger()
    proofs = []
    for name, r in state.replicas.items():
        if r.state in ("uninitialized", "baseline"):
            continue
        if name.startswith("r1-"):  # its active FS differs from its image
            proofs.append(Proof(name, image=NEW_BASE, point=NEW_SRC, active=None))
        elif r.state == "broken":
            proofs.append(Proof(name))
        else:
            proofs.append(Proof(name, image=NEW_BASE, point=NEW_SRC, active=NEW_SRC))
    exported = tuple((n, ACTIVE if n.endswith("broken") else NEW_BASE) for n in state.replicas)
    facts = Facts(
        destination_pcpis=frozenset({NEW_BASE, OTHER}),
        source_pcpis=frozenset({NEW_SRC}),
        exported=exported,
        proofs=tuple(proofs),
    )
    decision, notes = reconcile(state, facts)
    new = decision.state
    assert decision.effects == ()  # Recover re-applies the export table and releases, in that order
    assert new.seq == 9 and new.phase == "releasing"
    states = {n: r.state for n, r in new.replicas.items()}
    assert states == {
        "r0-stable": "stable",
        "r1-stable": "reseed_pending",
        "r2-done": "reseed_pending",
        "r3-update": "reseed_pending",
        "r4-rollback": "reseed_pending",
        "r5-unstable_uncoalesced": "unstable_uncoalesced",
        "r6-stable_uncoalesced": "stable_uncoalesced",
        "r7-reseed_pending": "reseed_pending",
        "r8-reseeding": "reseed_pending",
        "r9-reseeded": "reseeded",
        "r10-broken": "broken",
        "r11-uninitialized": "uninitialized",
        "r12-baseline": "uninitialized",
    }
    for name, r in new.replicas.items():
        if r.state in ("uninitialized", "broken"):
            continue
        assert (r.exported, r.source_point) == (NEW_BASE, NEW_SRC), name  # only the proven image
    assert new.replicas["r10-broken"].last_good is None  # its last good image is gone
    assert set(new.pcpis) == {NEW_BASE} and new.pcpis[NEW_BASE].role == "base"
    assert set(new.source_pcpis) == {NEW_SRC}
    edges = [(t.replica, t.trigger, t.source, t.dest) for t in decision.log]
    assert i8_legal_edges(new, edges).ok
    for check in (i1_fixed_consumption, i2_bounded_extras, i4_one_coalesced_point):
        assert check(new).ok, check(new)
    assert notes[0].startswith("the ledger is older than its volumes") and len(notes) == 2 + 13


def test_a_removed_pcpi_re_seeds_only_the_replicas_that_pinned_it():
    ind = "co-g-000002-individual"
    state = GroupState(
        name="g",
        seq=3,
        replicas={
            "a": Replica(name="a", source_qtree="a", state="stable", exported=OLD_BASE, source_point=OLD_SRC),
            "b": Replica(
                name="b",
                source_qtree="b",
                state="stable_uncoalesced",
                exported=ind,
                last_good=ind,
                source_point=OLD_SRC,
            ),
        },
        pcpis={
            OLD_BASE: Pcpi(name=OLD_BASE, role="base", taken=True),
            ind: Pcpi(name=ind, role="individual", taken=True, owners=frozenset({"b"})),
        },
        source_pcpis={OLD_SRC: SourcePcpi(name=OLD_SRC, taken=True)},
    )
    ex = examine(state, frozenset({ind}), frozenset({OLD_SRC}))
    assert not ex.stale and ex.lost == {OLD_BASE}
    decision, notes = reconcile(state, Facts(destination_pcpis=frozenset({ind}), source_pcpis=frozenset({OLD_SRC})))
    new = decision.state
    assert (new.replicas["a"].state, new.replicas["a"].exported) == ("reseed_pending", None)
    assert new.replicas["b"] == state.replicas["b"]
    assert set(new.pcpis) == {ind} and decision.effects == ()
    assert "removed outside coalesce" in notes[0]


def test_a_ledger_that_matches_its_volumes_is_not_touched():
    state = _old_ledger()
    facts = Facts(destination_pcpis=frozenset({OLD_BASE}), source_pcpis=frozenset({OLD_SRC}))
    assert not examine(state, facts.destination_pcpis, facts.source_pcpis).needed
    decision, notes = reconcile(state, facts)
    assert decision.state == state and notes == [] and decision.effects == ()


def test_an_older_ledger_keeps_the_kept_writes_the_volume_holds_I11():
    """Kept PCPIs survive a restore: one the older ledger knew keeps its record, one taken after the copy
    is recognised by its name (co-<group>-<n>-kept-<replica>), so recovery never releases the writes."""
    state = _old_ledger()
    known = "co-g-000002-kept-r10-broken"
    state = state.with_pcpi(Pcpi(name=known, role="kept", cycle=1, taken=True, owners=frozenset({"x"}), taken_at=3.0))
    later = "co-g-000008-kept-r6-stable_uncoalesced"
    facts = Facts(
        destination_pcpis=frozenset({NEW_BASE, known, later}),
        source_pcpis=frozenset({NEW_SRC}),
        exported=tuple((n, NEW_BASE) for n in state.replicas),
        proofs=tuple(Proof(n, image=NEW_BASE, point=NEW_SRC, active=NEW_SRC) for n in state.replicas),
    )
    new = reconcile(state, facts)[0].state
    assert new.pcpis[known] == Pcpi(name=known, role="kept", cycle=2, taken=True, owners=frozenset({"x"}), taken_at=3.0)
    assert new.kept_pcpi("r6-stable_uncoalesced") == Pcpi(
        name=later, role="kept", cycle=2, taken=True, owners=frozenset({"r6-stable_uncoalesced"})
    )
    assert i11_kept_writes(new, facts.destination_pcpis).ok and i2_bounded_extras(new).ok


def test_an_older_ledger_of_two_sources_records_each_source_pcpi_with_the_source_that_holds_it():
    lab_new, office_new = "co-g-src-000007", "co-g-src-000008"
    state = GroupState(
        name="g",
        cycle=1,
        seq=4,
        replicas={
            n: Replica(
                name=n, source_qtree=n, origin=o, state="stable", exported=OLD_BASE, source_point=p, active_point=p
            )
            for n, o, p in (("a", "lab", "co-g-src-000001"), ("b", "office", "co-g-src-000002"))
        },
        pcpis={OLD_BASE: Pcpi(name=OLD_BASE, role="base", cycle=1, taken=True)},
    )
    facts = Facts(
        destination_pcpis=frozenset({NEW_BASE}),
        source_pcpis={"lab": frozenset({lab_new}), "office": frozenset({office_new, "co-g-src-000003"})},
        exported=(("a", NEW_BASE), ("b", NEW_BASE)),
        proofs=(
            Proof("a", image=NEW_BASE, point=lab_new, active=lab_new),
            Proof("b", image=NEW_BASE, point=office_new, active=office_new),
        ),
    )
    assert examine(state, facts.destination_pcpis, facts.source_pcpis).newest == 9
    new = reconcile(state, facts)[0].state
    assert {n: (r.state, r.source_point) for n, r in new.replicas.items()} == {
        "a": ("stable", lab_new),
        "b": ("stable", office_new),
    }
    assert {n: sp.source for n, sp in new.source_pcpis.items()} == {lab_new: "lab", office_new: "office"}
