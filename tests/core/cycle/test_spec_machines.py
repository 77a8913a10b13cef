"""spec/coalescing.toml, and the transitions machines built from it (I8).

The machines must carry exactly the spec's states and (trigger, source, dest)
edges, read back from the transitions Machine objects; every state must be
reachable and able to get back to ``stable`` (transitions itself does not
check reachability); the spec must agree with DESIGN §2's tables; broken
specs must be rejected with a ConfigError that names the problem.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import attrs
import pytest

import coalesce_core
from coalesce_core.cycle import guards
from coalesce_core.cycle.machines import Model, default_model, machine_edges
from coalesce_core.cycle.spec import Spec, load_spec, parse_spec, spec_path
from coalesce_core.cycle.state import GENERATION, KEPT, ROLES, GroupState, Replica
from coalesce_core.errors import ConfigError, IllegalTransition

REPO = Path(__file__).resolve().parents[3]
SPEC_TEXT = (REPO / "spec" / "coalescing.toml").read_text(encoding="utf-8")

# DESIGN §2, transcribed by hand (the independent oracle for the spec file)
DESIGN_FIELDS = {
    "uninitialized": ("outside", "1040"),
    "baseline": ("outside", None),
    "stable": ("cycle", "1010"),
    "update": ("cycle", "1011"),
    "done": ("cycle", "1014"),
    "rollback": ("cycle", "1018"),
    "unstable_uncoalesced": ("outside", "1024"),
    "stable_uncoalesced": ("outside", "1030"),
    "broken": ("outside", None),
    # additions to DESIGN §2 (docs/decisions.md, "Re-seeding a replica that cannot apply its
    # stream"): a re-seed happens in the fault-tolerant field 1006, like a baseline
    "reseed_pending": ("outside", "1006*"),
    "reseeding": ("outside", "1006*"),
    "reseeded": ("outside", "1006*"),
    # an addition (docs/decisions.md, "Refused PCPIs and source outages"): a replica whose
    # jump-ahead PCPI was refused waits outside the cycle, its update complete
    "done_uncoalesced": ("outside", "1014*"),
    # an addition (docs/decisions.md, "Stragglers leave the cycle"): an update still in flight
    # [group] straggler_after after the cycle started goes on outside the cycle
    "update_uncoalesced": ("outside", "1011*"),
    # an addition (docs/decisions.md, "Removing a replica"): `coalesce remove` ends a replica's life
    "removed": ("outside", None),
}
DESIGN_EDGES = {
    ("start_baseline", "uninitialized", "baseline"),
    ("baseline_succeeded", "baseline", "done"),
    ("baseline_failed", "baseline", "uninitialized"),
    ("start_update", "stable", "update"),
    ("update_succeeded", "update", "done"),
    ("update_failed", "update", "rollback"),
    ("rollback_succeeded", "rollback", "done"),
    ("rollback_failed", "rollback", "unstable_uncoalesced"),
    ("retry_failed", "unstable_uncoalesced", "unstable_uncoalesced"),
    ("retry_succeeded", "unstable_uncoalesced", "stable_uncoalesced"),
    ("jump_ahead", "stable", "stable"),
    ("jump_ahead", "done", "stable"),
    ("jump_ahead", "stable_uncoalesced", "stable"),
    ("break_mirror", "stable", "broken"),
    ("break_mirror", "stable_uncoalesced", "broken"),
    ("resync", "broken", "unstable_uncoalesced"),
    # an addition to DESIGN §2 (docs/decisions.md, "An update a restart interrupted resumes
    # from its spool"): a rolled-back, spooled update restarts in the same cycle
    ("resume_update", "done", "update"),
    # additions: re-seed (docs/decisions.md)
    ("request_reseed", "stable", "reseed_pending"),
    ("request_reseed", "done", "reseed_pending"),
    ("request_reseed", "stable_uncoalesced", "reseed_pending"),
    ("request_reseed", "unstable_uncoalesced", "reseed_pending"),
    ("start_reseed", "reseed_pending", "reseeding"),
    ("reseed_succeeded", "reseeding", "reseeded"),
    ("reseed_failed", "reseeding", "reseed_pending"),
    ("jump_ahead", "reseeded", "stable"),
    # addition: a refused jump-ahead PCPI (docs/decisions.md)
    ("jump_ahead_refused", "done", "done_uncoalesced"),
    ("jump_ahead", "done_uncoalesced", "stable"),
    # additions: a straggler leaves the cycle and rejoins it (docs/decisions.md)
    ("straggle", "update", "update_uncoalesced"),
    ("straggler_succeeded", "update_uncoalesced", "done_uncoalesced"),
    ("straggler_failed", "update_uncoalesced", "unstable_uncoalesced"),
    # additions: remove, between cycles (docs/decisions.md)
    *(
        ("remove", s, "removed")
        for s in (
            "uninitialized",
            "stable",
            "stable_uncoalesced",
            "unstable_uncoalesced",
            "broken",
            "reseed_pending",
            "reseeded",
            "done_uncoalesced",
        )
    ),
}
DESIGN_REFS = {
    "baseline_succeeded": "1042",
    "update_succeeded": "1012",
    "update_failed": "1016",
    "rollback_succeeded": "1020",
    "rollback_failed": "1022",
    "retry_failed": "1026",
    "retry_succeeded": "1028",
    "jump_ahead": "1032",
}
AGENT_PHASES = {"idle", "updating", "rolling_back", "jump_ahead_1", "jump_ahead_2", "releasing"}


@pytest.fixture(scope="module")
def spec() -> Spec:
    return load_spec()


def test_spec_parses_with_both_machines(spec):
    assert spec.version == 1
    assert spec.replica.initial == "uninitialized" and spec.agent.initial == "idle"
    assert spec.cycle_roles == ("base", "rollback", "jump_ahead", "new_base")
    assert spec.individual_role == "individual"
    assert (spec.kept_role, KEPT) == ("kept", "kept")
    assert (spec.generation_role, GENERATION) == ("generation", "generation")
    assert ROLES == (*spec.cycle_roles, spec.individual_role, spec.kept_role, spec.generation_role)
    assert set(spec.agent.state_names) == AGENT_PHASES


def test_the_packaged_copy_is_the_repository_spec():
    """The installed fallback (coalesce_core/cycle/coalescing.toml) must not drift from spec/."""
    packaged = Path(coalesce_core.__file__).parent / "cycle" / "coalescing.toml"
    assert packaged.read_text(encoding="utf-8") == SPEC_TEXT
    assert spec_path().resolve() == (REPO / "spec" / "coalescing.toml").resolve()


@pytest.mark.parametrize("which", ["replica", "agent"])
def test_machines_have_exactly_the_specs_states_and_edges_I8(spec, which):
    ms = getattr(spec, which)
    machine = getattr(default_model(), f"{which}_machine")
    assert list(machine.states) == list(ms.state_names)
    assert machine.initial == ms.initial
    assert machine_edges(machine) == set(ms.edges())
    assert set(machine.events) == set(ms.triggers)  # auto_transitions=False: no to_<state> triggers


def test_agent_machine_carries_the_specs_guards(spec):
    machine = default_model().agent_machine
    for t in spec.agent.transitions:
        for source in t.source:
            (mt,) = machine.events[t.trigger].transitions[source]
            names = [c.func.args[0] for c in mt.conditions]
            assert names == list(t.conditions), (t.trigger, source)


def test_replica_spec_matches_design_section_2(spec):
    assert set(spec.replica.state_names) == set(DESIGN_FIELDS)
    for name, (field, ref) in DESIGN_FIELDS.items():
        st = spec.replica.state(name)
        assert st.field == field, name
        if ref is not None:
            assert st.ref == ref, name
        assert st.exports and st.active_fs and st.doc
    assert set(spec.states_in_field("cycle")) == {"stable", "update", "done", "rollback"}
    assert set(spec.replica.edges()) == DESIGN_EDGES
    for t in spec.replica.transitions:
        if t.trigger in DESIGN_REFS:
            assert t.ref == DESIGN_REFS[t.trigger], t.trigger


def test_per_state_flags_match_design(spec):
    """in_flight = update, rollback, baseline (the I8 jump-ahead guard; neither a re-seed nor a
    straggler's update holds it); stable = I9 applies; a replica whose re-seed arrived joins the
    jump-ahead."""
    assert spec.in_flight_states == {"update", "rollback", "baseline"}
    assert spec.stable_states == {"stable", "stable_uncoalesced"}
    assert spec.jump_ahead_sources == {"stable", "done", "stable_uncoalesced", "reseeded", "done_uncoalesced"}


def test_replica_machine_is_deterministic(spec):
    seen: dict[tuple[str, str], str] = {}
    for trig, src, dest in spec.replica.edges():
        assert seen.setdefault((trig, src), dest) == dest


def _reach(edges, start):
    adj: dict[str, set[str]] = {}
    for _t, s, d in edges:
        adj.setdefault(s, set()).add(d)
    seen, todo = {start}, deque([start])
    while todo:
        for n in adj.get(todo.popleft(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.mark.parametrize("which,home", [("replica", "stable"), ("agent", "idle")])
def test_every_state_is_reachable_and_can_get_home_I7(spec, which, home):
    """transitions does not check reachability: BFS over the spec.  I7 needs every state
    to be able to reach ``stable`` (replica) / ``idle`` (agent)."""
    ms = getattr(spec, which)
    edges = ms.edges()
    assert _reach(edges, ms.initial) == set(ms.state_names)
    for s in ms.state_names:
        if s == "removed":  # the end of a replica's life: it is no longer in the group, I7 is not about it
            assert not [e for e in edges if e[1] == s]
            continue
        assert home in _reach(edges, s), f"{s} cannot reach {home}"


def test_reachability_check_would_catch_a_dead_state():
    broken = SPEC_TEXT + '\n[replica.states.limbo]\nfield = "outside"\n'
    sp = parse_spec(broken)
    assert "limbo" not in _reach(sp.replica.edges(), sp.replica.initial)


def test_every_named_guard_exists(spec):
    named = {c for t in spec.agent.transitions for c in t.conditions}
    assert named and named <= set(guards.GUARDS)
    assert all(callable(guards.GUARDS[c]) for c in named)


def test_model_rejects_a_spec_naming_an_unknown_guard():
    text = SPEC_TEXT.replace('conditions = ["purgatory_purged"]', 'conditions = ["purgatory_purged", "moon_is_full"]')
    assert text != SPEC_TEXT
    with pytest.raises(ConfigError, match="moon_is_full") as ei:
        Model(parse_spec(text))
    assert "guards.py" in ei.value.hint


def test_model_from_a_spec_uses_that_spec_only():
    text = SPEC_TEXT.replace(
        'trigger = "resync"\nsource = ["broken"]', 'trigger = "resync"\nsource = ["broken", "stable"]'
    )
    assert text != SPEC_TEXT
    m = Model(parse_spec(text))
    assert m.replica_next("A", "stable", "resync") == "unstable_uncoalesced"
    with pytest.raises(IllegalTransition):
        default_model().replica_next("A", "stable", "resync")


@pytest.mark.parametrize("trigger,source,dest", sorted(DESIGN_EDGES))
def test_replica_next_follows_every_edge(trigger, source, dest):
    assert default_model().replica_next("R", source, trigger) == dest


def test_replica_next_rejects_every_non_edge(spec):
    m = default_model()
    legal = {(t, s) for t, s, _d in spec.replica.edges()}
    for s in spec.replica.state_names:
        for t in spec.replica.triggers:
            if (t, s) not in legal:
                with pytest.raises(IllegalTransition) as ei:
                    m.replica_next("R", s, t)
                assert (ei.value.state, ei.value.trigger) == (s, t)
    with pytest.raises(IllegalTransition):
        m.replica_next("R", "stable", "to_broken")  # no auto transitions
    with pytest.raises(IllegalTransition):
        m.replica_next("R", "stable", "no_such_trigger")


# ---------------------------------------------------------------------------
# broken specs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old,new,named",
    [
        pytest.param(
            'dest = "broken"', 'dest = "borken"', ["borken", "break_mirror"], id="unknown-state-in-a-transition"
        ),
        pytest.param(
            'source = ["rollback"]\ndest = "done"',
            'source = ["rolback"]\ndest = "done"',
            ["rolback"],
            id="unknown-source-state",
        ),
        pytest.param(
            '[replica]\ninitial = "uninitialized"\n', "[replica]\n", ["initial", "replica"], id="missing-initial"
        ),
        pytest.param('initial = "idle"', 'initial = "sleeping"', ["sleeping"], id="initial-that-is-not-a-state"),
        pytest.param(
            'ref = "1010"\nfield = "cycle"',
            'ref = "1010"\nfield = "middle"',
            ["middle", "stable"],
            id="a-bad-field-value",
        ),
        pytest.param(
            'ref = "1010"\nfield = "cycle"', 'ref = "1010"\nfeild = "cycle"', ["feild"], id="an-unknown-state-key"
        ),
        pytest.param(
            'trigger = "resync"\nsource = ["broken"]\ndest = "unstable_uncoalesced"\n',
            'trigger = "resync"\nsource = ["broken"]\n',
            ["dest"],
            id="a-transition-without-dest",
        ),
    ],
)
def test_parse_spec_rejects_a_broken_spec_with_config_error(old, new, named):
    """The spec with ``old`` replaced by ``new`` is refused with a ConfigError that names the file and
    what is wrong (``named``)."""
    text = SPEC_TEXT.replace(old, new)
    assert text != SPEC_TEXT, "the replacement must change the spec"
    with pytest.raises(ConfigError) as ei:
        parse_spec(text, "x.toml")
    assert [w for w in [*named, "x.toml"] if w not in str(ei.value)] == []


def test_parse_spec_rejects_missing_tables():
    with pytest.raises(ConfigError, match="agent"):
        parse_spec(SPEC_TEXT.split("# The management agent's phases")[0])


def test_parse_spec_rejects_invalid_toml():
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_spec(SPEC_TEXT + "\n[[[oops\n")


def test_a_model_answers_each_question_alone_whatever_it_was_asked_before(spec):
    """One Model answers every (phase, trigger) of the agent machine, guarded or not, legal or not,
    for two group states asked in turn, exactly as a Model built for that one question does; and its
    machines hold one model each, not one per question (adding a model is the dear part)."""
    busy = GroupState(name="g", replicas={"A": Replica("A", "A", state="update")})
    quiet = GroupState(name="g", replicas={"A": Replica("A", "A", state="done")}, purged=True)
    reused = Model(spec)

    def ask(m: Model, group: GroupState, phase: str, trigger: str) -> str | None:
        try:
            return m.agent_next(attrs.evolve(group, phase=phase), trigger)
        except IllegalTransition:
            return None

    answers = set()
    for phase in spec.agent.state_names:
        for trigger in spec.agent.triggers:
            for group in (busy, quiet):
                got = ask(reused, group, phase, trigger)
                assert got == ask(Model(spec), group, phase, trigger), (phase, trigger, group.purged)
                answers.add(got)
                reused.replica_next("A", "stable", "start_update")  # the other machine in between
    assert None in answers and len(answers) > 2  # some questions are refused, some answered
    assert len(reused.agent_machine.models) == len(reused.replica_machine.models) == 1
