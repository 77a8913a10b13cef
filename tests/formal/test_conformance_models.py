"""The spec, the `transitions` machines and the SPIN model agree.

spec/coalescing.toml is the truth; coalesce_core.cycle.machines builds the transitions
machines from it and tools/gen_promela.py generates spec/coalescing.pml from
it.  These tests fail when any of the three drifts, including when the
committed .pml is not a fresh generation.
"""

from __future__ import annotations

import pytest

from coalesce_core.cycle.machines import Model, machine_edges
from coalesce_core.cycle.spec import load_spec

from ._tools import ROOT, tool

gen = tool("gen_promela")


@pytest.fixture(scope="module")
def pml() -> str:
    return (ROOT / "spec" / "coalescing.pml").read_text(encoding="utf-8")


def test_committed_model_is_a_fresh_generation(pml):
    assert pml == gen.generate(), "spec/coalescing.pml is stale: run `python tools/gen_promela.py`"


@pytest.mark.parametrize("machine", ["replica", "agent"])
def test_same_states(machine, pml):
    spec = getattr(load_spec(), machine)
    built = getattr(Model(), f"{machine}_machine")
    assert list(built.states) == list(spec.state_names)
    assert gen.model_states(pml)[machine] == list(spec.state_names)


@pytest.mark.parametrize("machine", ["replica", "agent"])
def test_same_transitions(machine, pml):
    spec = getattr(load_spec(), machine)
    built = getattr(Model(), f"{machine}_machine")
    assert machine_edges(built) == set(spec.edges())
    assert gen.model_edges(pml)[machine] == set(spec.edges())


def test_guards_of_the_spec_are_in_the_model(pml):
    for t in load_spec().agent.transitions:
        for c in t.conditions:
            assert f"#define G_{c} " in pml
            assert f"assert(G_{c})" in pml


def test_model_fires_every_trigger(pml):
    body = pml.split("#define LEGAL_EDGE", 1)[1]
    for t in load_spec().replica.triggers:
        assert f"T_{t}(" in body, t
    for t in load_spec().agent.triggers:
        assert f"PH_{t}(" in body, t


def test_every_state_is_reachable_in_the_spec():
    """transitions does not check reachability: every state is reachable from the initial one."""
    for ms in (load_spec().replica, load_spec().agent):
        seen, todo = {ms.initial}, [ms.initial]
        while todo:
            s = todo.pop()
            for _t, a, b in ms.edges():
                if a == s and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert seen == set(ms.state_names), set(ms.state_names) - seen


def test_generator_refuses_an_unknown_guard(tmp_path):
    text = (ROOT / "spec" / "coalescing.toml").read_text()
    bad = text.replace('conditions = ["purgatory_purged"]', 'conditions = ["no_such_guard"]')
    assert bad != text
    p = tmp_path / "bad.toml"
    p.write_text(bad)
    with pytest.raises(SystemExit, match="no_such_guard"):
        gen.generate(p)
