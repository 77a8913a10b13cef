"""coalesce_core.cycle.generations: the old coalesced base kept as a generation at the jump-ahead, its
manifest, and the pruning by the retention policy (docs/config.md, "Retention"), on mem and sim volumes."""

from __future__ import annotations

import attrs
import pytest
from backends import backend_fixtures, on_backend

from coalesce_core import retention
from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.cycle import generations as gen
from coalesce_core.cycle.state import GENERATION, GroupState, Pcpi, Replica
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill

backend, group_config = backend_fixtures("mem", "sim")

HOUR = 3600.0


@pytest.mark.parametrize(
    ("state", "participant", "had_image", "moved", "records", "status"),
    [
        ("done", True, True, True, 5, gen.UPDATED),
        ("done", True, True, True, 0, gen.UNCHANGED),
        ("done", True, True, False, 0, gen.STALE),  # its update failed and was rolled back (Fig. 9)
        ("done", True, False, True, 0, gen.UPDATED),  # a baseline: its first image
        ("reseeded", True, True, True, 0, gen.UPDATED),
        ("done_uncoalesced", True, True, True, 3, gen.UPDATED),
        ("stable_uncoalesced", True, True, False, 0, gen.STALE),
        ("unstable_uncoalesced", False, True, False, 0, gen.OUTSIDE),
        ("broken", False, True, False, 0, gen.OUTSIDE),
        ("uninitialized", False, False, False, 0, gen.OUTSIDE),
    ],
)
def test_status_at_jump(state, participant, had_image, moved, records, status):
    assert gen.status_at_jump(state, participant, had_image, moved, records) == status


def test_a_manifest_survives_its_json():
    m = gen.Manifest("co-g-000003-new_base", 2, 12.5, (gen.Entry("A", gen.STALE, "co-g-src-000001", 3.0),))
    assert gen.Manifest.from_json(m.to_json()) == m
    assert m.counts() == {"updated": 0, "unchanged": 0, "stale": 1, "outside": 0} and m.fresh == 0


def test_an_entry_without_a_source_is_of_the_default_source():
    """An entry as a ledger written before manifests named sources holds it (no ``origin``) is of the
    source a group's only source is named when the config names none."""
    from coalesce_core.cycle.state import DEFAULT_SOURCE

    raw = {"pcpi": "co-g-000003-new_base", "cycle": 2, "time": 12.5}
    raw["entries"] = [{"replica": "A", "status": gen.UPDATED, "source_point": "co-g-src-000001", "source_time": 3.0}]
    (entry,) = gen.Manifest.from_json(raw).entries
    assert entry.origin == gen.DEFAULT_ORIGIN == DEFAULT_SOURCE


def test_a_pinned_generation_is_protected_and_its_time_is_its_manifests():
    g1, g2 = "co-g-000003-new_base", "co-g-000006-new_base"
    s = GroupState(
        name="g",
        replicas={"A": Replica("A", "A", state="unstable_uncoalesced", exported=g1, last_good=g1)},
        pcpis={g1: Pcpi(g1, GENERATION, taken=True), g2: Pcpi(g2, GENERATION, taken=True, taken_at=9.0)},
        manifests={g1: gen.Manifest(g1, 1, 5.0, (gen.Entry("A", gen.UPDATED, "s", 4.0),))},
        retention=retention.Policy(keep="1h"),
    )
    assert gen.as_retained(s) == [
        retention.Generation(g1, 5.0, fresh=1, exported=True, seq=0),
        retention.Generation(g2, 9.0, fresh=0, exported=False, seq=1),
    ]
    plan = gen.prune(s, 10 * HOUR)
    assert plan.decision(g1).keep and plan.decision(g2).keep  # pinned; the newest
    assert "exported by an uncoalesced replica" in plan.decision(g1).reasons


def test_the_generations_are_ordered_as_the_ledger_made_them_whatever_their_stamps():
    """A clock stepped back between two jump-aheads: generation 6 is stamped before 3. The policy sees
    6 as the newer (its sequence), so the prune keeps 6, the last image made, and ``max`` takes 3
    (docs/config.md, "Retention")."""
    g1, g2 = "co-g-000003-new_base", "co-g-000006-new_base"
    s = GroupState(
        name="g",
        replicas={"A": Replica("A", "A")},
        pcpis={
            g1: Pcpi(g1, GENERATION, taken=True, taken_at=50.0),
            g2: Pcpi(g2, GENERATION, taken=True, taken_at=20.0),
        },
        retention=retention.Policy(keep="24h", max=1),
    )
    assert [(g.id, g.seq) for g in gen.as_retained(s)] == [(g1, 0), (g2, 1)]
    plan = gen.prune(s, 30.0)
    assert [g.id for g in plan.kept] == [g2] and [g.id for g in plan.pruned] == [g1]


def _hourly(h: Harness, cycles: int) -> dict[str, float]:
    """``cycles`` cycles an hour apart, A changing each time; the time of each coalesced image made."""
    assert isinstance(h.clock, FakeClock)
    times = {}
    for i in range(cycles):
        h.clock.advance(HOUR)
        h.writer.write("A", f"hourly-{i}", b"h" * 100)
        h.cycle()
        h.assert_invariants()
        base = h.agent.state.base()
        assert base is not None
        times[base.name] = h.agent.state.manifests[base.name].time
    return times


def test_generations_accumulate_and_are_pruned_as_the_policy_says(group_config):
    """Every old base was a generation; what is kept after each cycle is exactly retention.plan's
    keep over every generation ever made (a plan without max is monotonic), and the volume holds
    exactly the base and those."""
    policy = 'keep = "3h"'
    h = Harness(group_config(retention=policy))
    fill(h.writer, "ABC")
    h.cycle()
    first = h.agent.state.base()
    assert first is not None
    made = {first.name: h.agent.state.manifests[first.name].time}
    for _ in range(6):
        made.update(_hourly(h, 1))
        s = h.agent.state
        base = s.base()
        assert base is not None
        olds = [retention.Generation(n, t) for n, t in made.items() if n != base.name]
        want = {g.id for g in retention.plan(olds, made[base.name], retention.Policy(keep="3h")).kept}
        assert {p.name for p in s.generations()} == want
        assert sorted(n for n in h.agent.dest.snapshot_list() if n.startswith("co-g-")) == sorted(want | {base.name})
        assert set(s.manifests) == want | {base.name}  # a manifest lives as long as its PCPI
    # the hour of the newest image is the first of the 3: the generations of the 2 hours before it stay
    assert len(h.agent.state.generations()) == 2


def test_no_retention_keeps_no_generation(group_config):
    h = Harness(group_config())
    fill(h.writer, "ABC")
    h.cycle()
    _hourly(h, 3)
    assert h.agent.state.generations() == []
    assert len(h.agent.dest.snapshot_list()) == 1


def test_the_manifest_of_updated_unchanged_and_failed_replicas(group_config):
    """A changed, B did not, C's update failed (rolled back): the base of that cycle says so, and
    keeps saying so once the next jump-ahead made it a generation."""
    h = Harness(group_config(retention='keep_min = "30d"\nmax = 10'))
    fill(h.writer, "ABC")
    h.cycle()
    before = {r.name: r.source_point for r in h.agent.state.replicas.values()}
    h.writer.write("A", "new", b"a" * 500)
    h.writer.write("C", "new", b"c" * 500)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=1, times=1, volume="src"))
    h.cycle()
    base = h.agent.state.base()
    assert base is not None
    target = h.agent.state.replicas["A"].source_point
    h.cycle()
    assert base.name in {p.name for p in h.agent.state.generations()}
    m = h.agent.state.manifests[base.name]
    entries = {e.replica: (e.status, e.source_point) for e in m.entries}
    assert entries == {"A": ("updated", target), "B": ("unchanged", target), "C": ("stale", before["C"])}
    assert {e.origin for e in m.entries} == {"default"}  # [group] source: the source named default
    assert all(e.source_time > 0 for e in m.entries)
    assert m.fresh == 2 and m.cycle == 2


def _c_outside_exporting_the_first_base(group_config, retention: str = 'keep = "1h"') -> tuple[Harness, Pcpi]:
    """A group under ``retention`` whose replica C failed its update and its rollback in cycle 2 (its
    retries fail too: it stays outside, exporting the base of cycle 1), then 4 hourly cycles; that
    base and the group."""
    h = Harness(group_config(retention=retention))
    fill(h.writer, "ABC")
    h.cycle()
    held = h.agent.state.base()
    assert held is not None
    h.writer.write("C", "x", b"x" * 100)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=2, times=1, volume="src"))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C"))
    h.cycle()
    assert h.states()["C"] == "unstable_uncoalesced"
    _hourly(h, 4)
    return h, held


def test_a_generation_an_uncoalesced_replica_exports_is_never_pruned(group_config):
    """C's rollback failed: it exports its last good image, the base of cycle 1, outside the cycle;
    that base becomes a generation which the policy would prune long ago, but it is kept."""
    h, held = _c_outside_exporting_the_first_base(group_config)
    s = h.agent.state
    assert s.replicas["C"].exported == held.name
    assert held.name in {p.name for p in s.generations()}
    assert len(s.generations()) == 2  # the pinned one past the policy, and the newest
    reasons = gen.prune(s, h.clock()).decision(held.name).reasons
    assert "exported by an uncoalesced replica" in reasons
    assert h.agent.state.manifests[held.name].counts()["updated"] == 3


def test_remove_prunes_a_generation_only_it_pinned_I1(group_config):
    """C, outside the cycle, exports the base of cycle 1, long a generation past the policy; once C is
    removed nothing pins it, and `remove` prunes it at once: at rest the group holds no more unpinned
    generations than the policy keeps (I1; found by SPIN under RETAIN, spec/invariants.md)."""
    h, held = _c_outside_exporting_the_first_base(group_config)
    assert held.name in {p.name for p in h.agent.state.generations()}
    h.agent.remove_replica("C")
    s = h.agent.state
    assert held.name not in {p.name for p in s.generations()}
    assert held.name not in h.agent.dest.snapshot_list()
    assert len(s.generations()) == 1  # the newest, as the policy keeps
    h.assert_invariants()


def test_a_generation_a_person_pins_survives_the_prunes_until_unpinned(group_config):
    """`coalesce pin`: with keep = "1h" the base of cycle 1 would be pruned at the second hourly
    jump-ahead; pinned, it stays (the pin persisted in the ledger), and once unpinned it is pruned
    (the unpin prunes at once, at rest)."""
    from coalesce_core.cycle.invariants import seq_of
    from coalesce_core.errors import NotFound

    h = Harness(group_config(retention='keep = "1h"'))
    fill(h.writer, "ABC")
    h.cycle()
    _hourly(h, 1)
    (first,) = h.agent.state.generations()
    h.agent.pin(str(seq_of(first.name)))
    assert h.agent.ledger.load().pcpis[first.name].pinned
    _hourly(h, 3)
    s = h.agent.state
    assert first.name in {p.name for p in s.generations()} and first.name in h.agent.dest.snapshot_list()
    assert gen.prune(s, h.clock()).decision(first.name).reasons[0] == "pinned"
    assert len(s.generations()) == 2  # the pinned one past the policy, and the newest
    h.agent.pin(str(seq_of(first.name)), pinned=False)
    _hourly(h, 1)
    assert first.name not in {p.name for p in h.agent.state.generations()}
    assert first.name not in h.agent.dest.snapshot_list()
    with pytest.raises(NotFound, match="no generation"):
        h.agent.pin(str(seq_of(first.name)))


def test_unpin_at_rest_prunes_what_the_policy_no_longer_keeps_I1(group_config):
    """With max = 1 a pinned generation and the newest stand; unpinned at rest, the first would leave
    the group holding 2 unpinned generations where the policy keeps 1 until the next jump-ahead (I1 at
    rest, spec/invariants.md): the unpin prunes at once, as `remove` does."""
    from coalesce_core.cycle.invariants import seq_of

    h = Harness(group_config(retention='keep = "1h"\nmax = 1'))
    fill(h.writer, "ABC")
    h.cycle()
    _hourly(h, 1)
    (first,) = h.agent.state.generations()
    h.agent.pin(str(seq_of(first.name)))
    _hourly(h, 2)
    assert [p.name for p in h.agent.state.generations()][0] == first.name
    assert len(h.agent.state.generations()) == 2  # the pinned one past max, and the newest
    h.agent.pin(str(seq_of(first.name)), pinned=False)
    h.assert_invariants()
    assert first.name not in {p.name for p in h.agent.state.generations()}
    assert first.name not in h.agent.dest.snapshot_list()
    assert len(h.agent.state.generations()) == 1


def _tightened(group_config) -> tuple[Harness, Pcpi, Pcpi]:
    """A group under keep_min = "30d" (max 10) whose replica C left the cycle in cycle 2 exporting the
    base of cycle 1 (its retries fail), then 4 hourly cycles and a person's pin of the second
    generation; then [retention] tightened to keep = "1h", max = 1 in the config (not yet applied).
    The group, C's generation and the pinned one."""
    from coalesce_core.cycle.invariants import seq_of

    h, held = _c_outside_exporting_the_first_base(group_config, 'keep_min = "30d"\nmax = 10')
    gens = h.agent.state.generations()
    assert len(gens) == 5 and gens[0].name == held.name
    pinned = gens[1]
    h.agent.pin(str(seq_of(pinned.name)))
    h.config = attrs.evolve(h.config, retention=retention.Policy(keep="1h", max=1))
    return h, held, pinned


def _kept_as_planned(h: Harness) -> set[str]:
    """The generations the ledger records, after checking that the volume holds exactly the base and
    those, each with its manifest, and that they are what the plan at the base's time keeps."""
    s = h.agent.state
    base = s.base()
    assert base is not None
    gens = {p.name for p in s.generations()}
    assert set(h.agent.dest.snapshot_list()) == gens | {base.name}
    assert set(s.manifests) == gens | {base.name}
    assert {g.id for g in gen.prune(s, s.manifests[base.name].time).kept} == gens
    return gens


def test_a_tightened_policy_prunes_at_agent_start_I1(group_config):
    """The agent starts with a [retention] that keeps fewer generations than the ledger holds: the
    surplus goes at once (not at the next jump-ahead), so I1 holds at rest; the generation C exports
    from outside the cycle and the pinned one stay, whatever `max` says."""
    h, held, pinned = _tightened(group_config)
    newest = h.agent.state.generations()[-1]
    h.restart()
    assert h.agent.state.retention == retention.Policy(keep="1h", max=1)
    assert h.agent.state.phase == "idle"
    assert _kept_as_planned(h) == {held.name, pinned.name, newest.name}
    h.assert_invariants()
    assert h.agent.ledger.load() == h.agent.state  # the prune is in the ledger, written ahead


def test_a_crash_in_the_prune_at_agent_start_is_recovered(group_config):
    """A crash after the first release of that prune: the next start releases what the ledger marked
    releasing (write-ahead) and prunes nothing else; nothing leaked, nothing pinned lost."""
    h, held, pinned = _tightened(group_config)
    newest = h.agent.state.generations()[-1]
    assert h.crash("mid_release", h.restart)
    assert _kept_as_planned(h) == {held.name, pinned.name, newest.name}
    h.assert_invariants()


class _UnpinWhenTheCycleStarts:
    """Observer plugin: unpins generation ``generation`` (an id) once, as the next cycle starts (a
    request decided while the agent is in the cycle), and remembers the phase it was decided in."""

    def __init__(self) -> None:
        self.harness: Harness | None = None
        self.generation: str | None = None
        self.phase = ""

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        if trigger != "start_cycle" or self.generation is None or self.harness is None:
            return
        generation, self.generation = self.generation, None
        self.harness.agent.pin(generation, pinned=False)
        self.phase = self.harness.agent.state.phase


@pytest.mark.parametrize("backend", [on_backend("mem")], indirect=True)
@pytest.mark.parametrize("outage", ["source", "jump_ahead"])
def test_an_unpin_during_a_cycle_without_a_jump_ahead_prunes_at_its_end_I1(group_config, outage):
    """With max = 1 a pinned generation and the newest stand; the first is unpinned while a cycle runs
    that ends without a jump-ahead (the source cannot be reached, or the destination refuses the
    jump-ahead PCPI): that cycle's release step prunes it, so at rest I1 holds, not only after the
    next jump-ahead."""
    from coalesce_core.cycle.invariants import seq_of

    unpin = _UnpinWhenTheCycleStarts()
    h = Harness(group_config(retention='keep = "1h"\nmax = 1'), plugins=[unpin])
    unpin.harness = h
    fill(h.writer, "ABC")
    h.cycle()
    _hourly(h, 1)
    (first,) = h.agent.state.generations()
    h.agent.pin(str(seq_of(first.name)))
    _hourly(h, 2)
    assert [p.name for p in h.agent.state.generations()][0] == first.name
    base = h.agent.state.base()
    assert isinstance(h.clock, FakeClock)
    h.clock.advance(HOUR)
    h.writer.write("A", "late", b"l" * 100)
    volume = h.config.source if outage == "source" else h.config.destination
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=volume, times=1, message="refused"))
    unpin.generation = str(seq_of(first.name))
    h.cycle()
    assert unpin.phase == "updating"  # decided in the cycle, which could not prune at once
    s = h.agent.state
    assert s.phase == "idle" and s.base() == base  # no jump-ahead
    assert first.name not in {p.name for p in s.generations()}
    assert first.name not in h.agent.dest.snapshot_list()
    assert len(s.generations()) == 1
    h.assert_invariants()
