"""coalesce_core.cycle.generations: the old coalesced base kept as a generation at the jump-ahead, its
manifest, and the pruning by the retention policy (docs/config.md, "Retention"), on mem and sim volumes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from backends import backend_fixtures, on_backend

from coalesce_core import retention
from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.cycle import generations as gen
from coalesce_core.cycle import invariants
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
    assert gen.as_retained(s) == [  # fresh counted without prefer_complete too (docs/config.md)
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


def test_a_decision_passes_the_manifests_on_unless_one_is_made_or_goes(group_config):
    """A cycle with G generations held makes one manifest (the jump-ahead) and drops one (the prune's
    PCPI released); every other decision hands the ledger the very mapping it started from, so the
    ledger does not compare G manifests at each commit (docs/benchmarks.md, "The cost of a cycle with
    G retained generations")."""
    h = Harness(group_config(retention='keep_min = "1w"\nmax = 3'))
    fill(h.writer, "ABC")
    h.cycle()
    _hourly(h, 4)
    assert len(h.agent.state.generations()) == 3
    commits: list[tuple[Any, Any]] = []
    real = h.agent.ledger.commit

    def commit(old, new, *args, **kwargs):
        commits.append((old.manifests, new.manifests))
        return real(old, new, *args, **kwargs)

    h.agent.ledger.commit = commit
    _hourly(h, 1)
    changed = [new.keys() - old.keys() or old.keys() - new.keys() for old, new in commits if new is not old]
    assert len(changed) == 2 and all(len(names) == 1 for names in changed)  # one made, then one gone
    assert len(commits) > 4  # the others passed it on
    assert len(h.agent.state.generations()) == 3


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


# --- a year of hourly cycles through the agent --------------------------------------------------

#: the policy of the year: one a period plus the newest keeps at most 24 + 7 + 4 + 12 + 1 unpinned
YEAR_KEEP = "24h 7d 4w 12m"
YEAR_LIMIT = 48
#: the hour whose image a person pins once it is a generation (a Wednesday morning, no bucket's first
#: by the end of the year: the policy alone would prune it within a day)
YEAR_PIN = 30
#: the replicas that change, and every how many hours (C never does after its baseline)
YEAR_CHANGES = {"A": 5, "B": 7}


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _kept_by_the_calendar(times: list[float], now: float, pinned: set[int]) -> set[int]:
    """What ``keep = YEAR_KEEP`` keeps of generations made at ``times`` (oldest first) at ``now``, worked
    out from the calendar by ``datetime`` (not by the code under test): the first generation of each of
    the last 24 UTC hours, 7 days, 4 ISO weeks (from Monday) and 12 months counted back from now's, the
    newest, and the ``pinned``."""
    when = [datetime.fromtimestamp(t, UTC) for t in times]
    today = datetime.fromtimestamp(now, UTC)
    this_hour = today.replace(minute=0, second=0, microsecond=0)
    monday = today.date() - timedelta(days=today.weekday())
    months = {
        ((today.year * 12 + today.month - 1 - k) // 12, (today.year * 12 + today.month - 1 - k) % 12 + 1)
        for k in range(12)
    }
    buckets: list[tuple[set[Any], Callable[[datetime], Any]]] = [
        ({this_hour - timedelta(hours=k) for k in range(24)}, lambda w: w.replace(minute=0, second=0, microsecond=0)),
        ({today.date() - timedelta(days=k) for k in range(7)}, lambda w: w.date()),
        ({monday - timedelta(weeks=k) for k in range(4)}, lambda w: w.date() - timedelta(days=w.weekday())),
        (months, lambda w: (w.year, w.month)),
    ]
    keep = {len(times) - 1} | pinned
    for wanted, period in buckets:
        first: dict[Any, int] = {}
        for i, w in enumerate(when):
            first.setdefault(period(w), i)
        keep |= {i for p, i in first.items() if p in wanted}
    return keep


class _CyclePcpiWatch:
    """Observer plugin: at every destination PCPI take, the most PCPIs in cycle roles the volume held (I1)."""

    def __init__(self) -> None:
        self.harness: Harness | None = None
        self.most = 0

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if self.harness is not None and role != "source":
            self.most = max(self.most, self.harness.cycle_pcpis_on_volume())


def _i1_at_rest(h: Harness) -> None:
    """I1 at rest with retention: the volume holds exactly the base and the generations the ledger
    retains, the unpinned ones at most the policy's limit."""
    s = h.agent.state
    base = s.base()
    assert s.phase == "idle" and base is not None
    assert invariants.i1_fixed_consumption(s).ok
    gens = {p.name for p in s.generations()}
    assert set(h.agent.dest.snapshot_list()) == gens | {base.name}
    assert sum(1 for g in gen.as_retained(s) if not g.protected) <= YEAR_LIMIT


@pytest.fixture
def ledger_without_fsync(monkeypatch):
    """The ledger's commits without fsync (``PRAGMA synchronous=OFF``): a cycle commits about a dozen
    times, and on a shared disk the fsyncs, not the agent, would set the length of a year of cycles.
    Durability is tested by the crash tests (tests/core/test_crash_recovery.py), not by timing; the
    sim volumes' own fsyncs are off in the tests for the same reason (tests/conftest.py)."""
    from coalesce_core.ledger import Ledger

    connect = Ledger._connect

    def without_fsync(cls, path):
        conn = connect(path)
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    monkeypatch.setattr(Ledger, "_connect", classmethod(without_fsync))


@pytest.mark.parametrize(
    ("backend", "hours"), [on_backend("mem", 365 * 24), on_backend("sim", 30 * 24)], indirect=["backend"]
)
def test_hourly_cycles_through_the_agent_keep_what_the_calendar_says_I1(group_config, hours, ledger_without_fsync):
    """The real agent, its clock moved one hour per cycle from 2027-06-15 00:07 UTC: on mem a whole
    year (8,760 cycles: a new year and the leap day), on sim a month (720 cycles). A cycle of three
    small updates costs the agent about 10 ms of CPU on mem and 25 ms on sim (a dozen ledger commits,
    the spec machines, the transfer pipeline and its check), whatever the number of generations: the
    year on mem is about 90 s of CPU, a year on sim would be some 4 minutes, so sim runs a month. A changes every 5th hour, B every 7th, C never after its baseline. After every
    cycle I1 holds at rest (the volume holds the base and exactly the retained generations, at most 48
    unpinned) and during it (at most 4 PCPIs in cycle roles); a person pins the image of hour 30. At
    the end the generations are exactly what the calendar implies, each manifest saying who changed."""
    from coalesce_core.cycle.invariants import seq_of

    watch = _CyclePcpiWatch()
    h = Harness(
        group_config(retention=f'keep = "{YEAR_KEEP}"'), plugins=[watch], clock=FakeClock(_at("2027-06-15T00:07"))
    )
    watch.harness = h
    fill(h.writer, "ABC")
    h.cycle()
    base = h.agent.state.base()
    assert base is not None
    images, points = [base.name], [h.agent.state.replicas["A"].source_point]
    assert isinstance(h.clock, FakeClock)
    for hour in range(1, hours + 1):
        h.clock.advance(HOUR)
        for q, every in YEAR_CHANGES.items():
            if hour % every == 0:
                h.writer.write(q, "hourly", f"{q} at hour {hour}".encode())
        h.cycle()
        base = h.agent.state.base()
        assert base is not None and base.name != images[-1], f"hour {hour}: no new coalesced image"
        images.append(base.name)
        points.append(h.agent.state.replicas["A"].source_point)
        if hour == YEAR_PIN + 1:
            h.agent.pin(str(seq_of(images[YEAR_PIN])))
        _i1_at_rest(h)
    assert watch.most <= 4
    s = h.agent.state
    times = [_at("2027-06-15T00:07") + k * HOUR for k in range(hours + 1)]
    assert [s.manifests[n].time for n in images[-3:]] == times[-3:]  # the agent's clock stamps the images
    want = _kept_by_the_calendar(times[:-1], times[-1], {YEAR_PIN})
    assert [p.name for p in s.generations()] == [images[k] for k in sorted(want)]
    assert s.pcpis[images[YEAR_PIN]].pinned
    for k in want:
        entries = {e.replica: (e.status, e.source_point) for e in s.manifests[images[k]].entries}
        every = {**YEAR_CHANGES, "C": None}  # hour 0 is the baselines: every replica updated
        status = {q: "updated" if k == 0 or (n and k % n == 0) else "unchanged" for q, n in every.items()}
        assert entries == {q: (st, points[k]) for q, st in status.items()}, k
