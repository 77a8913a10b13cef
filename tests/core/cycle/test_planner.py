"""Pure planner tests: hand-built GroupState values and events, no backend.

Every replica transition and every agent phase transition of
spec/coalescing.toml is driven through ``decide()`` and its resulting state
and effects are checked; a whole normal cycle is walked step by step with
I1 checked after every decision; every recovery rule of ``_recover`` is
exercised.  Invariants are named I1..I11 as in DESIGN §3.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from typing import Callable

import attrs
import pytest

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.cycle import effects as fx
from coalesce_core.cycle import events as ev
from coalesce_core.cycle import planner
from coalesce_core.cycle.invariants import (
    i1_fixed_consumption,
    i2_bounded_extras,
    i4_one_coalesced_point,
    i11_kept_writes,
)
from coalesce_core.cycle.machines import Model, default_model
from coalesce_core.cycle.planner import (
    KEPT_NAME_MAX,
    Decision,
    NotNow,
    Transition,
    decide,
    is_group_pcpi,
    kept_name,
    pcpi_prefix,
    source_prefix,
)
from coalesce_core.cycle.spec import load_spec
from coalesce_core.cycle.state import CYCLE_ROLES, GroupState, Pcpi, Replica, RetryPolicy, SourcePcpi
from coalesce_core.errors import IllegalTransition

G = "g"
S0 = "co-g-src-000000"
S1 = "co-g-src-000001"
S2 = "co-g-src-000003"
BASE = "co-g-000002-base"
IND = "co-g-000001-individual"
SCR = "co-g-000004-individual"
RB = "co-g-000004-rollback"
JA = "co-g-000005-jump_ahead"
NB = "co-g-000006-new_base"
RETRY = RetryPolicy(initial=10.0, factor=2.0, maximum=100.0)


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------
def rep(name: str, state: str = "stable", **kw) -> Replica:
    """A replica; in-cycle states default to exporting BASE at S1."""
    defaults: dict = {}
    if state in ("stable", "update", "done", "rollback"):
        defaults = dict(exported=BASE, source_point=S1, active_point=S1)
    if state == "update":
        defaults.update(target=S2)
    if state == "baseline":
        defaults = dict(target=S2)
    if state in ("stable_uncoalesced", "unstable_uncoalesced"):
        defaults = dict(exported=IND, last_good=IND, source_point=S0, active_point=S0)
    if state == "broken":
        defaults = dict(exported=ACTIVE, last_good=BASE, source_point=S1, active_point=S1)
    if state in ("reseed_pending", "reseeding", "reseeded"):
        defaults = dict(exported=IND, last_good=IND, source_point=S0, reseed_reason="test")
    if state == "reseeding":
        defaults.update(target=S2)
    if state == "reseeded":
        defaults.update(active_point=S2)
    if state == "done_uncoalesced":  # its update complete, its jump-ahead refused: it exports its last good image
        defaults = dict(exported=IND, last_good=IND, source_point=S0, active_point=S1)
    if state == "update_uncoalesced":  # a straggler: it left the cycle of S2, pinning the base it exported
        defaults = dict(exported=BASE, last_good=BASE, source_point=S1, active_point=S1, target=S2)
    defaults.update(kw)
    return Replica(name=name, source_qtree=name, state=state, **defaults)


def pcpi(name: str, role: str, taken: bool = True, **kw) -> Pcpi:
    return Pcpi(name=name, role=role, cycle=1, taken=taken, **kw)


def group(*replicas: Replica, pcpis=(), source_pcpis=(), **kw) -> GroupState:
    if not pcpis and any(r.exported == BASE or r.last_good == BASE for r in replicas):
        pcpis = (pcpi(BASE, "base"),)
    if any(r.exported == IND or r.last_good == IND for r in replicas) and not any(p.name == IND for p in pcpis):
        owners = frozenset(r.name for r in replicas if IND in (r.exported, r.last_good))
        pcpis = (*pcpis, pcpi(IND, "individual", owners=owners))
    if not source_pcpis:
        points = {p for r in replicas for p in (r.source_point, r.active_point, r.target) if p}
        source_pcpis = tuple(SourcePcpi(name=s, cycle=1, taken=True) for s in sorted(points))
    fields: dict = dict(name=G, cycle=1, seq=10, retry=RETRY)  # past every fixed name above
    fields.update(kw)
    return GroupState(
        replicas={r.name: r for r in replicas},
        pcpis={p.name: p for p in pcpis},
        source_pcpis={s.name: s for s in source_pcpis},
        **fields,
    )


def updating(*replicas: Replica, **kw) -> GroupState:
    """Phase updating of cycle 2 whose source PCPI S2 was taken."""
    kw.setdefault("phase", "updating")
    kw.setdefault("cycle", 2)
    kw.setdefault("cycle_targets", {"default": S2})
    st = group(*replicas, **kw)
    sps = dict(st.source_pcpis)
    sps[S2] = SourcePcpi(name=S2, cycle=2, taken=True)
    sps.setdefault(S1, SourcePcpi(name=S1, cycle=1, taken=True))
    return attrs.evolve(st, source_pcpis=sps)


def cycle_pcpis(state: GroupState) -> list[str]:
    return sorted(p.name for p in state.pcpis.values() if p.role in CYCLE_ROLES)


def check_i1(state: GroupState) -> None:
    """I1: <= 4 PCPIs in cycle roles at every instant; exactly 1 at rest."""
    n = len(cycle_pcpis(state))
    assert n <= 4, f"I1: {n} cycle PCPIs: {cycle_pcpis(state)}"
    if state.phase == "idle" and any(r.source_point for r in state.replicas.values()):
        assert n == 1, f"I1: at rest with {n} cycle PCPIs: {cycle_pcpis(state)}"
    assert i1_fixed_consumption(state).ok
    if state.phase == "idle":  # at rest nothing is in flight and nothing waits for a jump-ahead
        busy = [r.name for r in state.replicas.values() if r.state in ("update", "done", "rollback", "baseline")]
        assert not busy, f"idle with replicas mid-cycle: {busy}"
    if state.phase == "idle":  # I2 at rest: during a cycle the replaced individual PCPIs wait for release
        settled = attrs.evolve(state, pcpis={n: p for n, p in state.pcpis.items() if not p.releasing})
        assert i2_bounded_extras(settled).ok, i2_bounded_extras(settled).detail


def of(effects, kind) -> list:
    return [e for e in effects if isinstance(e, kind)]


def edges(d: Decision) -> set[tuple[str | None, str, str, str]]:
    return {(t.replica, t.trigger, t.source, t.dest) for t in d.log}


def decide_all(st: GroupState, events) -> tuple[GroupState, set[tuple[str | None, str, str, str]]]:
    """Decide ``events`` in turn from ``st``, checking I1 after each: the last state and every edge logged."""
    logged: set[tuple[str | None, str, str, str]] = set()
    for e in events:
        d = decide(st, e)
        logged |= edges(d)
        st = d.state
        check_i1(st)
    return st, logged


class Sim:
    """A pure simulated executor: answers every effect with its result event.

    ``fail_transfer``/``fail_rollback`` name replicas whose transfer/rollback
    fails, ``refuse`` the PCPI roles the volumes refuse ("source" for every source's,
    "source:NAME" for the source NAME's).
    After every decision I1 and I2 are checked; every decision and every effect is
    recorded in order.
    """

    def __init__(self, state: GroupState, fail_transfer=(), fail_rollback=(), now: float = 1000.0, refuse=()) -> None:
        self.state = state
        self.fail_transfer = set(fail_transfer)
        self.fail_rollback = set(fail_rollback)
        self.refuse = set(refuse)
        self.now = now
        self.decisions: list[Decision] = []
        self.effects: list = []
        self.max_cycle_pcpis = len(cycle_pcpis(state))
        self.phases = [state.phase]

    def feed(self, event) -> Decision:
        d = decide(self.state, event)
        self.state = d.state
        self.decisions.append(d)
        self.effects.extend(d.effects)
        check_i1(d.state)
        self.max_cycle_pcpis = max(self.max_cycle_pcpis, len(cycle_pcpis(d.state)))
        if d.state.phase != self.phases[-1]:
            self.phases.append(d.state.phase)
        return d

    def answer(self, e):
        if isinstance(e, fx.TakeSourcePcpi):
            if "source" in self.refuse or f"source:{e.source}" in self.refuse:
                return ev.SourcePcpiRefused(name=e.name, now=self.now, error="source down", source=e.source)
            return ev.SourcePcpiTaken(name=e.name, source=e.source)
        if isinstance(e, fx.ReleaseSourcePcpi):
            return ev.SourcePcpiReleased(name=e.name, source=e.source)
        if isinstance(e, fx.TakePcpi):
            if e.role in self.refuse:
                return ev.PcpiRefused(name=e.name, now=self.now, error="PCPI limit")
            return ev.PcpiTaken(name=e.name, now=self.now)
        if isinstance(e, fx.ReleasePcpi):
            return ev.PcpiReleased(name=e.name)
        if isinstance(e, fx.Transfer):
            ok = e.replica not in self.fail_transfer
            return ev.TransferDone(replica=e.replica, ok=ok, now=self.now, error="" if ok else "boom")
        if isinstance(e, fx.Rollback):
            ok = e.replica not in self.fail_rollback
            return ev.RollbackDone(replica=e.replica, ok=ok, now=self.now, error="" if ok else "rb boom")
        if isinstance(e, fx.RemoveQtree):
            return ev.QtreeRemoved(replica=e.replica)
        if isinstance(e, fx.PurgePurgatory):
            return ev.PurgatoryPurged()
        if isinstance(e, fx.Export):
            return ev.Exported(jump=e.jump)
        raise AssertionError(e)

    def run(self, event) -> "Sim":
        pending = deque(self.feed(event).effects)
        while pending:
            pending.extend(self.feed(self.answer(pending.popleft())).effects)
        return self


def rest(*names: str) -> GroupState:
    return group(*(rep(n) for n in names))


# ---------------------------------------------------------------------------
# a normal cycle, step by step (I1, I4, I8, I9-by-state)
# ---------------------------------------------------------------------------
def test_normal_cycle_step_by_step_never_exceeds_four_cycle_pcpis_I1():
    """I1: a whole no-failure cycle, each decision checked by hand; never more than
    4 PCPIs in cycle roles, exactly 1 at rest before and after."""
    st = rest("A", "B", "C")
    check_i1(st)

    d = decide(st, ev.StartCycle(now=100.0))
    check_i1(d.state)
    assert d.state.phase == "updating" and d.state.cycle == 2 and d.state.cycle_started == 100.0
    assert edges(d) == {(None, "start_cycle", "idle", "updating")}
    (take,) = d.effects
    assert isinstance(take, fx.TakeSourcePcpi) and take.name.startswith(source_prefix(G))
    src = take.name
    assert d.state.cycle_targets == {"default": src} and d.state.source_pcpis[src].taken is False
    assert set(d.state.replicas) == {"A", "B", "C"} and all(r.state == "stable" for r in d.state.replicas.values())

    d = decide(d.state, ev.SourcePcpiTaken(name=src))
    check_i1(d.state)
    assert d.state.source_pcpis[src].taken
    assert d.effects == tuple(fx.Transfer(replica=n, source_qtree=n, base=S1, target=src) for n in "ABC")
    assert edges(d) == {(n, "start_update", "stable", "update") for n in "ABC"}
    assert all(r.target == src and r.exported == BASE for r in d.state.replicas.values())

    for n in "AB":  # A and B finish first (Fig. 7): nothing else happens yet
        d = decide(d.state, ev.TransferDone(replica=n, ok=True, records=3, nbytes=7))
        check_i1(d.state)
        assert d.effects == () and d.state.phase == "updating"
        r = d.state.replicas[n]
        assert (r.state, r.active_point, r.source_point, r.exported, r.target) == ("done", src, S1, BASE, None)
        assert (r.records, r.nbytes) == (3, 7)

    d = decide(d.state, ev.TransferDone(replica="C", ok=True))  # the slowest completes
    check_i1(d.state)
    assert (None, "start_jump_ahead", "updating", "jump_ahead_1") in edges(d)
    (take,) = d.effects
    assert isinstance(take, fx.TakePcpi) and take.role == "jump_ahead" and take.name.startswith(pcpi_prefix(G))
    ja = take.name
    # I4: every cycle replica still exports the same old base; nothing new is visible yet
    assert {r.exported for r in d.state.replicas.values()} == {BASE}

    d = decide(d.state, ev.PcpiTaken(name=ja))
    check_i1(d.state)
    assert d.effects == (fx.PurgePurgatory(qtrees=("A", "B", "C")),)
    assert d.state.pcpis[ja].taken and d.state.phase == "jump_ahead_1"

    d = decide(d.state, ev.PurgatoryPurged())
    check_i1(d.state)
    assert d.state.phase == "jump_ahead_2" and d.state.purged
    assert edges(d) == {(None, "take_new_base", "jump_ahead_1", "jump_ahead_2")}
    (take,) = d.effects
    assert isinstance(take, fx.TakePcpi) and take.role == "new_base"
    nb = take.name
    assert len(cycle_pcpis(d.state)) == 3  # base, jump_ahead, new_base

    d = decide(d.state, ev.PcpiTaken(name=nb))
    check_i1(d.state)
    assert d.effects == (fx.Export(mapping={"A": nb, "B": nb, "C": nb}, jump=True),)  # ONE switch for all
    assert edges(d) == {(n, "jump_ahead", "done", "stable") for n in "ABC"}
    assert all(r.exported == nb and r.source_point == src for r in d.state.replicas.values())
    assert i4_one_coalesced_point(d.state).ok

    d = decide(d.state, ev.Exported(jump=True))
    check_i1(d.state)
    assert edges(d) == {(None, "start_release", "jump_ahead_2", "releasing")}
    assert set(d.effects) == {fx.ReleasePcpi(name=BASE), fx.ReleasePcpi(name=ja), fx.ReleaseSourcePcpi(name=S1)}
    assert d.state.pcpis[nb].role == "base" and d.state.base().name == nb
    assert d.state.pcpis[BASE].releasing and d.state.pcpis[ja].releasing

    for e in (ev.PcpiReleased(name=BASE), ev.PcpiReleased(name=ja)):
        d = decide(d.state, e)
        check_i1(d.state)
        assert d.state.phase == "releasing" and d.effects == ()
    d = decide(d.state, ev.SourcePcpiReleased(name=S1))
    check_i1(d.state)
    assert edges(d) == {(None, "finish_cycle", "releasing", "idle")}
    assert d.state.phase == "idle" and d.state.cycle_targets == {} and not d.state.purged
    assert cycle_pcpis(d.state) == [nb] and list(d.state.source_pcpis) == [src]


@pytest.mark.parametrize("n", [1, 7, 300])
def test_fixed_consumption_for_any_number_of_replicas_I1(n):
    """I1: with failed updates, failed rollbacks and baselines, never more than 4 cycle
    PCPIs, and exactly 1 at rest, whatever the number of replicas."""
    names = [f"r{i:03d}" for i in range(n)]
    reps = [rep(x) for x in names]
    reps.append(rep("new", "uninitialized"))
    sim = Sim(group(*reps), fail_transfer=names[::3], fail_rollback=names[::6]).run(ev.StartCycle(now=5.0))
    assert sim.state.phase == "idle"
    assert 1 <= sim.max_cycle_pcpis <= 4
    assert len(cycle_pcpis(sim.state)) == 1
    # one source PCPI, one rollback PCPI, one jump-ahead, one new base: for any n
    takes = of(sim.effects, fx.TakePcpi)
    assert sorted(t.role for t in takes) == ["jump_ahead", "new_base", "rollback"]
    assert len(of(sim.effects, fx.TakeSourcePcpi)) == 1
    assert len(of(sim.effects, fx.Export)) == 1
    failed_rb = set(names[::6])
    for r in sim.state.replicas.values():
        assert r.state == ("unstable_uncoalesced" if r.name in failed_rb else "stable")


def test_first_baseline_cycle_ends_with_exactly_one_base_I1():
    st = group(rep("A", "uninitialized"), rep("B", "uninitialized"))
    sim = Sim(st).run(ev.StartCycle(now=1.0))
    s = sim.state
    assert s.phase == "idle"
    (base,) = cycle_pcpis(s)
    assert s.pcpis[base].role == "base"
    assert all(r.state == "stable" and r.exported == base for r in s.replicas.values())
    (src,) = s.source_pcpis
    assert all(r.source_point == src == r.active_point for r in s.replicas.values())
    transfers = of(sim.effects, fx.Transfer)
    assert all(t.base is None for t in transfers) and len(transfers) == 2


# ---------------------------------------------------------------------------
# every replica transition of the spec, one scenario each
# ---------------------------------------------------------------------------
def _scn_start_baseline():
    st = updating(rep("U", "uninitialized"), rep("A"), source_pcpis=(SourcePcpi(S1, 1, True),))
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    return st, [ev.SourcePcpiTaken(name=S2)]


def _scn_start_update():
    return _scn_start_baseline()


def _scn_baseline_succeeded():
    return updating(rep("U", "baseline"), rep("A", "update")), [ev.TransferDone(replica="U", ok=True)]


def _scn_baseline_failed():
    st = updating(rep("U", "baseline"), rep("A", "update"))
    return st, [ev.TransferDone(replica="U", ok=False, error="net"), ev.QtreeRemoved(replica="U")]


def _scn_update_succeeded():
    return updating(rep("A", "update"), rep("B", "update")), [ev.TransferDone(replica="A", ok=True)]


def _scn_update_failed():
    return updating(rep("A", "update"), rep("B", "update")), [ev.TransferDone(replica="A", ok=False)]


def _rolling_back(*reps):
    st = updating(*reps, phase="rolling_back")
    return st.with_pcpi(pcpi(RB, "rollback"))


def _scn_rollback_succeeded():
    return _rolling_back(rep("A", "rollback"), rep("B", "rollback")), [ev.RollbackDone(replica="A", ok=True)]


def _scn_rollback_failed():
    return _rolling_back(rep("A", "rollback"), rep("B", "rollback")), [ev.RollbackDone(replica="A", ok=False)]


def _scn_resume_update():
    """A restart interrupted A's spooled update: rolled back, it restarts in the same cycle."""
    st = _rolling_back(rep("A", "done", resume=True), rep("B", "rollback"))
    return st, [ev.RollbackDone(replica="B", ok=True)]


def _retrying(retries: int = 0, **kw) -> GroupState:
    a = rep("A", "unstable_uncoalesced", scratch=SCR, retries=retries, **kw)
    st = group(a, rep("B"))
    return st.with_pcpi(pcpi(SCR, "individual", owners=frozenset({"A"})))


def _scn_retry_failed():
    return _retrying(), [ev.RollbackDone(replica="A", ok=False, now=50.0)]


def _scn_retry_succeeded():
    return _retrying(), [ev.RollbackDone(replica="A", ok=True, now=50.0)]


def _jump_2():
    st = updating(
        rep("S"),
        rep("D", "done", active_point=S2),
        rep("SU", "stable_uncoalesced"),
        rep("UU", "unstable_uncoalesced", exported="co-g-000000-individual", last_good="co-g-000000-individual"),
        rep("K", "broken"),
        phase="jump_ahead_2",
        purged=True,
    )
    st = st.with_pcpi(pcpi("co-g-000000-individual", "individual", owners=frozenset({"UU"})))
    st = st.with_pcpi(pcpi(JA, "jump_ahead")).with_pcpi(pcpi(NB, "new_base", taken=False))
    return st, [ev.PcpiTaken(name=NB)]


def _scn_break_stable():
    return rest("A", "B"), [ev.BreakMirror(replica="A")]


def _scn_break_su():
    return group(rep("A", "stable_uncoalesced"), rep("B")), [ev.BreakMirror(replica="A")]


def _scn_resync():
    return group(rep("K", "broken"), rep("B")), [ev.Resync(replica="K")]


def _scn_reseed_stable():
    return rest("A", "B"), [ev.Reseed(replica="A", reason="operator")]


def _scn_reseed_su():
    return group(rep("A", "stable_uncoalesced"), rep("B")), [ev.Reseed(replica="A", reason="verify")]


def _scn_reseed_after_rollback():
    """The reseed_after-th failed update in a row: after its rollback, A leaves to be re-seeded."""
    return _rolling_back(rep("A", "rollback", consecutive_failures=3), rep("B", "rollback")), [
        ev.RollbackDone(replica="A", ok=True)
    ]


def _scn_reseed_after_failed_rollback():
    return _rolling_back(rep("A", "rollback", consecutive_failures=3), rep("B", "rollback")), [
        ev.RollbackDone(replica="A", ok=False, error="io")
    ]


def _scn_start_reseed():
    st, events = _scn_start_baseline()
    return st.with_replica(rep("P", "reseed_pending")), events


def _scn_reseed_succeeded():
    return group(rep("P", "reseeding"), rep("A")), [ev.TransferDone(replica="P", ok=True, now=70.0)]


def _scn_reseed_failed():
    return group(rep("P", "reseeding"), rep("A")), [ev.TransferDone(replica="P", ok=False, now=70.0, error="x")]


def _jump_2_reseeded():
    st, events = _jump_2()
    return st.with_replica(rep("RS", "reseeded")), events


def _jump_2_done_uncoalesced():
    st, events = _jump_2()
    return st.with_replica(rep("DU", "done_uncoalesced", exported=BASE, last_good=BASE, active_point=S2)), events


def _scn_jump_ahead_refused():
    """The destination refuses the new base PCPI: the replica in done leaves the cycle."""
    st, _ = _jump_2()
    return st, [ev.PcpiRefused(name=NB, now=5.0, error="PCPI limit")]


def _straggling(**kw) -> GroupState:
    """Cycle 2 started at 100 with straggler_after 60: A and B still update to S2."""
    kw.setdefault("straggler_after", 60.0)
    return updating(rep("A", "update"), rep("B", "update"), cycle_started=100.0, **kw)


def _scn_straggle():
    return _straggling(), [ev.StragglerDue(replica="A", now=160.0)]


def _scn_straggler_succeeded():
    return group(rep("L", "update_uncoalesced"), rep("A")), [ev.TransferDone(replica="L", ok=True, now=300.0)]


def _scn_straggler_failed():
    return group(rep("L", "update_uncoalesced"), rep("A")), [
        ev.TransferDone(replica="L", ok=False, now=300.0, error="net")
    ]


def _scn_remove(state: str) -> Callable[[], tuple[GroupState, list]]:
    """`coalesce remove X` of a replica in ``state``, between cycles, beside a stable A."""

    def scenario():
        return group(rep("X", state), rep("A")), [ev.RemoveReplica(replica="X")]

    return scenario


#: the states `coalesce remove` takes a replica from (every state a replica can be in between cycles)
REMOVABLE = (
    "uninitialized",
    "stable",
    "stable_uncoalesced",
    "unstable_uncoalesced",
    "broken",
    "reseed_pending",
    "reseeded",
    "done_uncoalesced",
)

REPLICA_SCENARIOS: dict[tuple[str, str, str], tuple[str, Callable]] = {
    **{("remove", s, "removed"): ("X", _scn_remove(s)) for s in REMOVABLE},
    ("start_baseline", "uninitialized", "baseline"): ("U", _scn_start_baseline),
    ("start_update", "stable", "update"): ("A", _scn_start_update),
    ("baseline_succeeded", "baseline", "done"): ("U", _scn_baseline_succeeded),
    ("baseline_failed", "baseline", "uninitialized"): ("U", _scn_baseline_failed),
    ("update_succeeded", "update", "done"): ("A", _scn_update_succeeded),
    ("update_failed", "update", "rollback"): ("A", _scn_update_failed),
    ("rollback_succeeded", "rollback", "done"): ("A", _scn_rollback_succeeded),
    ("rollback_failed", "rollback", "unstable_uncoalesced"): ("A", _scn_rollback_failed),
    ("resume_update", "done", "update"): ("A", _scn_resume_update),
    ("retry_failed", "unstable_uncoalesced", "unstable_uncoalesced"): ("A", _scn_retry_failed),
    ("retry_succeeded", "unstable_uncoalesced", "stable_uncoalesced"): ("A", _scn_retry_succeeded),
    ("jump_ahead", "stable", "stable"): ("S", _jump_2),
    ("jump_ahead", "done", "stable"): ("D", _jump_2),
    ("jump_ahead", "stable_uncoalesced", "stable"): ("SU", _jump_2),
    ("break_mirror", "stable", "broken"): ("A", _scn_break_stable),
    ("break_mirror", "stable_uncoalesced", "broken"): ("A", _scn_break_su),
    ("resync", "broken", "unstable_uncoalesced"): ("K", _scn_resync),
    ("request_reseed", "stable", "reseed_pending"): ("A", _scn_reseed_stable),
    ("request_reseed", "stable_uncoalesced", "reseed_pending"): ("A", _scn_reseed_su),
    ("request_reseed", "done", "reseed_pending"): ("A", _scn_reseed_after_rollback),
    ("request_reseed", "unstable_uncoalesced", "reseed_pending"): ("A", _scn_reseed_after_failed_rollback),
    ("start_reseed", "reseed_pending", "reseeding"): ("P", _scn_start_reseed),
    ("reseed_succeeded", "reseeding", "reseeded"): ("P", _scn_reseed_succeeded),
    ("reseed_failed", "reseeding", "reseed_pending"): ("P", _scn_reseed_failed),
    ("jump_ahead", "reseeded", "stable"): ("RS", _jump_2_reseeded),
    ("jump_ahead", "done_uncoalesced", "stable"): ("DU", _jump_2_done_uncoalesced),
    ("jump_ahead_refused", "done", "done_uncoalesced"): ("D", _scn_jump_ahead_refused),
    ("straggle", "update", "update_uncoalesced"): ("A", _scn_straggle),
    ("straggler_succeeded", "update_uncoalesced", "done_uncoalesced"): ("L", _scn_straggler_succeeded),
    ("straggler_failed", "update_uncoalesced", "unstable_uncoalesced"): ("L", _scn_straggler_failed),
}


#: edges taken in the same decision as the edge that led to their source state (the
#: reseed_after-th failed update leaves for its re-seed right after its rollback ended)
CHAINED = {
    ("request_reseed", "done", "reseed_pending"): ("rollback_succeeded", "rollback"),
    ("request_reseed", "unstable_uncoalesced", "reseed_pending"): ("rollback_failed", "rollback"),
}


def test_every_replica_edge_of_the_spec_has_a_scenario_I8():
    assert set(REPLICA_SCENARIOS) == set(load_spec().replica.edges())


@pytest.mark.parametrize("edge", sorted(REPLICA_SCENARIOS), ids=lambda e: f"{e[0]}:{e[1]}")
def test_every_replica_edge_is_taken_through_decide_I8(edge):
    """I8: each (trigger, source, dest) of the spec happens through decide() and is logged."""
    trigger, source, dest = edge
    who, scenario = REPLICA_SCENARIOS[edge]
    st, events = scenario()
    before = CHAINED.get(edge)
    assert st.replicas[who].state == (before[1] if before else source)
    st, logged = decide_all(st, events)
    assert (who, trigger, source, dest) in logged
    if before:
        assert (who, before[0], before[1], source) in logged
    if dest == "removed":  # the replica's life ends: its record leaves the state (the log keeps it)
        assert who not in st.replicas
    else:
        assert st.replicas[who].state == dest
    legal = load_spec().replica.edges()
    assert all((t, s, de) in legal for (r, t, s, de) in logged if r is not None)


def test_start_update_and_start_baseline_effects():
    st, (e,) = _scn_start_baseline()
    st = st.with_replica(rep("X", "unstable_uncoalesced")).with_replica(rep("K", "broken"))
    d = decide(st, e)
    assert d.state.source_pcpis[S2].taken
    a, u = d.state.replicas["A"], d.state.replicas["U"]
    assert (a.state, a.target, a.exported) == ("update", S2, BASE)
    assert (u.state, u.target, u.exported) == ("baseline", S2, None)
    assert set(d.effects) == {
        fx.Transfer(replica="A", source_qtree="A", base=S1, target=S2),
        fx.Transfer(replica="U", source_qtree="U", base=None, target=S2),
    }
    # replicas outside the cycle do not take part in the cycle's transfers
    assert d.state.replicas["X"] == st.replicas["X"] and d.state.replicas["K"] == st.replicas["K"]


def test_transfer_uses_the_replicas_source_qtree():
    st = updating(
        Replica(name="dst", source_qtree="srcq", state="stable", exported=BASE, source_point=S1, active_point=S1)
    )
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    d = decide(st, ev.SourcePcpiTaken(name=S2))
    assert d.effects == (fx.Transfer(replica="dst", source_qtree="srcq", base=S1, target=S2),)


def test_source_pcpi_taken_for_another_name_starts_nothing():
    st, _ = _scn_start_baseline()
    d = decide(st, ev.SourcePcpiTaken(name="co-g-src-999999"))
    assert d.effects == () and d.log == ()


def test_baseline_succeeded_state():
    st, (e,) = _scn_baseline_succeeded()
    d = decide(st, attrs.evolve(e, records=9, nbytes=99))
    u = d.state.replicas["U"]
    assert (u.state, u.active_point, u.target, u.exported, u.source_point) == ("done", S2, None, None, None)
    assert (u.records, u.nbytes) == (9, 99)
    assert d.effects == ()  # A still updating


def test_baseline_failed_removes_partial_data_first():
    st, (fail, removed) = _scn_baseline_failed()
    d = decide(st, fail)
    u = d.state.replicas["U"]
    assert u.state == "baseline" and u.last_error == "baseline failed: net"  # in flight until the data is gone
    assert d.effects == (fx.RemoveQtree(replica="U"),)
    assert d.log == () and d.state.cycle_failures == 1
    d = decide(d.state, removed)
    u = d.state.replicas["U"]
    assert (u.state, u.target, u.active_point, u.source_point, u.exported) == ("uninitialized", None, None, None, None)
    assert edges(d) == {("U", "baseline_failed", "baseline", "uninitialized")}
    assert d.effects == ()  # A still updating


def test_qtree_removed_for_a_replica_not_in_baseline_is_ignored():
    st = updating(rep("A", "update"))
    d = decide(st, ev.QtreeRemoved(replica="A"))
    assert d.log == () and d.effects == () and d.state == st


def test_update_succeeded_keeps_exporting_the_old_base_I3():
    st, (e,) = _scn_update_succeeded()
    d = decide(st, e)
    a = d.state.replicas["A"]
    assert (a.state, a.active_point, a.source_point, a.exported, a.target) == ("done", S2, S1, BASE, None)
    assert d.effects == ()


def test_update_failed_goes_to_rollback_and_counts_a_failure():
    st, (e,) = _scn_update_failed()
    d = decide(st, attrs.evolve(e, error="disk full"))
    a = d.state.replicas["A"]
    assert (a.state, a.target, a.last_error, a.exported, a.active_point) == (
        "rollback",
        None,
        "update failed: disk full",
        BASE,
        S1,
    )
    assert a.consecutive_failures == 1
    assert d.state.cycle_failures == 1
    assert d.effects == ()  # B still updating: no rollback PCPI yet


def test_late_transfer_answer_is_ignored():
    st = updating(rep("A", "rollback"), rep("B", "update"))
    d = decide(st, ev.TransferDone(replica="A", ok=True))
    assert d.state == st and d.effects == () and d.log == ()


def test_rollback_succeeded_returns_to_the_exported_image_and_jumps_ahead():
    st, (e,) = _scn_rollback_succeeded()
    st = st.with_replica(attrs.evolve(st.replicas["A"], last_error="update failed: x", consecutive_failures=1))
    d = decide(st, e)
    a = d.state.replicas["A"]
    # the rollback does not clear the update's error: only a later successful transfer does
    assert (a.state, a.active_point, a.last_error, a.exported) == ("done", S1, "update failed: x", BASE)
    assert d.effects == () and d.state.phase == "rolling_back"  # B still rolling back (I8)
    d = decide(d.state, ev.RollbackDone(replica="B", ok=True))
    assert (None, "start_jump_ahead", "rolling_back", "jump_ahead_1") in edges(d)
    (take,) = d.effects
    assert take.role == "jump_ahead"


def test_rollback_failed_pins_last_good_as_individual_pcpi_I2():
    """The replica leaves the cycle; its last good image (the old base) is pinned as its
    individual PCPI at release instead of being released (I2: 1 <= 2 x 1)."""
    st, (e,) = _scn_rollback_failed()
    d = decide(st, attrs.evolve(e, now=1000.0, error="io"))
    a = d.state.replicas["A"]
    assert a.state == "unstable_uncoalesced"
    assert (a.last_good, a.exported, a.retries, a.last_error) == (BASE, BASE, 0, "rollback failed: io")
    assert a.next_retry == 1000.0 + RETRY.initial
    sim = Sim(d.state)
    sim.state = d.state
    sim.run(ev.RollbackDone(replica="B", ok=True))
    s = sim.state
    assert s.phase == "idle"
    (export,) = of(sim.effects, fx.Export)
    new_base = s.base().name
    assert export.mapping == {"A": BASE, "B": new_base}  # A keeps its last good image
    assert s.pcpis[BASE].role == "individual" and s.pcpis[BASE].owners == frozenset({"A"})
    assert not s.pcpis[BASE].releasing
    assert fx.ReleasePcpi(name=BASE) not in sim.effects
    assert fx.ReleasePcpi(name=RB) in sim.effects and RB not in s.pcpis
    assert cycle_pcpis(s) == [new_base]
    assert S1 in s.source_pcpis  # A's source point stays held


@pytest.mark.parametrize("retries", [0, 1, 2, 3, 10])
def test_retry_failed_backs_off_exponentially_up_to_the_maximum(retries):
    st = _retrying(retries=retries)
    d = decide(st, ev.RollbackDone(replica="A", ok=False, now=500.0, error="again"))
    a = d.state.replicas["A"]
    n = retries + 1
    assert a.state == "unstable_uncoalesced" and a.retries == n
    assert a.next_retry == 500.0 + min(RETRY.maximum, RETRY.initial * RETRY.factor**n)
    assert (a.scratch, a.exported, a.last_error) == (None, IND, "retry failed: again")
    assert d.effects == (fx.ReleasePcpi(name=SCR),)  # export unchanged: no switch
    assert d.state.pcpis[SCR].releasing


def test_retry_policy_delay_formula():
    p = RetryPolicy(initial=3.0, factor=3.0, maximum=50.0)
    assert [p.delay(i) for i in range(5)] == [3.0, 9.0, 27.0, 50.0, 50.0]
    assert p.delay(-1) == 3.0


def test_tick_starts_only_due_retries_with_a_scratch_pcpi():
    a = rep("A", "unstable_uncoalesced", next_retry=200.0)
    b = rep(
        "B",
        "unstable_uncoalesced",
        exported="co-g-000000-individual",
        last_good="co-g-000000-individual",
        next_retry=900.0,
    )
    st = group(a, b, rep("C")).with_pcpi(pcpi("co-g-000000-individual", "individual", owners=frozenset("B")))
    assert decide(st, ev.Tick(now=199.0)).effects == ()
    d = decide(st, ev.Tick(now=200.0))
    (take,) = d.effects
    assert take.role == "individual"
    assert d.state.replicas["A"].scratch == take.name and d.state.replicas["B"].scratch is None
    assert d.state.pcpis[take.name].owners == frozenset({"A"}) and not d.state.pcpis[take.name].taken
    d = decide(d.state, ev.PcpiTaken(name=take.name))
    assert d.effects == (fx.Rollback(replica="A", from_pcpi=take.name, to_pcpi=IND, retry=True),)
    assert d.state.replicas["A"].exported == IND  # no export switch for a retry


def test_tick_outside_idle_does_nothing():
    st = attrs.evolve(group(rep("A", "unstable_uncoalesced", next_retry=0.0)), phase="updating")
    d = decide(st, ev.Tick(now=1e9))
    assert d.effects == () and d.state == st


def test_retry_succeeded_state():
    st = _retrying(retries=4, next_retry=77.0)
    d = decide(st, ev.RollbackDone(replica="A", ok=True, now=50.0))
    a = d.state.replicas["A"]
    assert (a.state, a.exported, a.scratch, a.active_point, a.retries, a.next_retry) == (
        "stable_uncoalesced",
        IND,
        None,
        S0,
        0,
        0.0,
    )
    assert d.effects == (fx.ReleasePcpi(name=SCR),)


def test_jump_ahead_switches_every_participant_in_one_export():
    """Branch 1032: stable, done and stable_uncoalesced jump; one Export carries the whole
    mapping; source_point := active_point (I4)."""
    st, (e,) = _jump_2()
    d = decide(st, e)
    s = d.state.replicas
    assert {n for (n, t, _s, _d) in edges(d)} == {"S", "D", "SU"}
    for n in ("S", "D", "SU"):
        assert s[n].state == "stable" and s[n].exported == NB
        assert s[n].source_point == st.replicas[n].active_point
        assert (s[n].last_good, s[n].scratch, s[n].retries) == (None, None, 0)
    assert s["D"].source_point == S2 and s["SU"].source_point == S0
    assert s["UU"] == st.replicas["UU"] and s["K"] == st.replicas["K"]
    assert d.effects == (
        fx.Export(mapping={"S": NB, "D": NB, "SU": NB, "UU": "co-g-000000-individual", "K": ACTIVE}, jump=True),
    )
    assert d.state.pcpis[NB].taken
    assert i4_one_coalesced_point(d.state).ok


def test_after_jump_ahead_release_keeps_pinned_pcpis_I2():
    st, (e,) = _jump_2()
    d = decide(st, e)
    d = decide(d.state, ev.Exported(jump=True))
    s = d.state
    assert s.pcpis[NB].role == "base"
    # SU's old individual PCPI is no longer needed; UU's still is; K pins BASE as last good
    assert s.pcpis[IND].releasing
    assert s.pcpis["co-g-000000-individual"].role == "individual" and not s.pcpis["co-g-000000-individual"].releasing
    assert s.pcpis[BASE].role == "individual" and s.pcpis[BASE].owners == frozenset({"K"})
    assert s.pcpis[JA].releasing
    assert set(of(d.effects, fx.ReleasePcpi)) == {fx.ReleasePcpi(IND), fx.ReleasePcpi(JA)}
    check_i1(s)


def test_break_mirror_exports_active_and_pins_last_good():
    st, (e,) = _scn_break_stable()
    d = decide(st, e)
    a = d.state.replicas["A"]
    assert (a.state, a.exported, a.last_good) == ("broken", ACTIVE, BASE)
    assert d.effects == (fx.Export(mapping={"A": ACTIVE, "B": BASE}),)
    st, (e,) = _scn_break_su()
    d = decide(st, e)
    a = d.state.replicas["A"]
    assert (a.state, a.exported, a.last_good) == ("broken", ACTIVE, IND)


@pytest.mark.parametrize("discard", [False, True])
def test_resync_fences_then_takes_a_scratch_pcpi_then_rolls_back(discard):
    """docs/decisions.md, "Resync fences first": the last good image is exported before the scratch
    PCPI of the active FS is taken, so no write through the export comes after that PCPI.  Without
    --discard that scratch is the kept PCPI (I11): never exported, kept whatever the attempt's outcome."""
    st, _ = _scn_resync()
    d = decide(st, ev.Resync(replica="K", discard=discard))
    k = d.state.replicas["K"]
    fence, take = d.effects
    role = "individual" if discard else "kept"
    assert fence == fx.Export(mapping={"K": BASE, "B": BASE})
    assert take == fx.TakePcpi(name=k.scratch, role=role)
    assert take.name.endswith("-individual" if discard else "-kept-K")
    assert (k.state, k.exported, k.last_good, k.retries, k.keep) == ("unstable_uncoalesced", BASE, BASE, 0, not discard)
    assert d.state.pcpis[k.scratch].owners == frozenset({"K"})
    d = decide(d.state, ev.PcpiTaken(name=take.name, now=7.0))
    assert d.state.replicas["K"].exported == BASE  # the fence stays: the scratch PCPI is never exported
    assert not d.state.replicas["K"].keep
    assert d.effects == (fx.Rollback(replica="K", from_pcpi=take.name, to_pcpi=BASE, retry=True),)
    released = () if not discard else (fx.ReleasePcpi(name=take.name),)
    d2 = decide(d.state, ev.RollbackDone(replica="K", ok=True))
    k = d2.state.replicas["K"]
    assert (k.state, k.exported, k.scratch) == ("stable_uncoalesced", BASE, None)
    assert d2.effects == released
    d3 = decide(d.state, ev.RollbackDone(replica="K", ok=False, now=10.0))
    k = d3.state.replicas["K"]
    assert (k.state, k.exported, k.scratch, k.retries) == ("unstable_uncoalesced", BASE, None, 1)
    assert d3.effects == released
    if not discard:
        assert d3.state.kept_pcpi("K") == attrs.evolve(d.state.pcpis[take.name], taken_at=7.0)
        # the retry after a failed attempt: a scratch of its own, released as before; the kept one stays
        d4 = decide(d3.state, ev.Tick(now=10_000.0))
        (retry,) = of(d4.effects, fx.TakePcpi)
        assert retry.role == "individual"
        assert i11_kept_writes(d4.state).ok and i2_bounded_extras(d4.state).ok


def test_add_replica_is_uninitialized_and_idempotent():
    st = rest("A")
    d = decide(st, ev.AddReplica(name="N", source_qtree="q"))
    n = d.state.replicas["N"]
    assert (n.state, n.source_qtree, n.exported) == ("uninitialized", "q", None)
    assert decide(d.state, ev.AddReplica(name="N", source_qtree="q")).state == d.state
    with pytest.raises(NotNow, match="already exists"):
        decide(d.state, ev.AddReplica(name="N", source_qtree="other"))


def test_an_added_replica_records_its_source_and_the_cycle_takes_that_sources_pcpi():
    st = decide(GroupState(name=G), ev.AddReplica(name="N", source_qtree="q", origin="lab")).state
    assert st.replicas["N"].origin == "lab"
    d = decide(st, ev.StartCycle(now=1.0))
    (take,) = d.effects
    assert d.state.cycle_targets == {"lab": take.name} and d.state.source_pcpis[take.name].source == "lab"


# ---------------------------------------------------------------------------
# the agent's phases
# ---------------------------------------------------------------------------
def _agent_start_cycle():
    return rest("A"), [ev.StartCycle(now=1.0)]


def _agent_start_rollback():
    return updating(rep("A", "update"), rep("B", "done", active_point=S2)), [ev.TransferDone(replica="A", ok=False)]


def _agent_jump_from_updating():
    return updating(rep("A", "update")), [ev.TransferDone(replica="A", ok=True)]


def _agent_jump_from_rolling_back():
    return _rolling_back(rep("A", "rollback")), [ev.RollbackDone(replica="A", ok=True)]


def _agent_resume_updates():
    return _scn_resume_update()


def _agent_take_new_base():
    st = updating(rep("A", "done", active_point=S2), phase="jump_ahead_1").with_pcpi(pcpi(JA, "jump_ahead"))
    return st, [ev.PurgatoryPurged()]


def _agent_release_from_updating():
    """Nothing could jump ahead: the only replica's baseline failed."""
    return updating(rep("U", "baseline"), source_pcpis=()), [
        ev.TransferDone(replica="U", ok=False),
        ev.QtreeRemoved(replica="U"),
    ]


def _agent_release_from_rolling_back():
    return _rolling_back(rep("A", "rollback")), [ev.RollbackDone(replica="A", ok=False)]


def _agent_release_from_jump_2():
    st, events = _jump_2()
    return st, [*events, ev.Exported(jump=True)]


def _agent_finish():
    st, events = _agent_release_from_jump_2()
    return st, [
        *events,
        ev.PcpiReleased(name=BASE),
        ev.PcpiReleased(name=JA),
        ev.PcpiReleased(name=IND),
        ev.SourcePcpiReleased(name=S1),
    ]


def _agent_source_unavailable():
    """The source refuses the cycle's PCPI: the cycle ends before any transfer."""
    st = updating(rep("A"), rep("U", "uninitialized"), source_pcpis=(SourcePcpi(S1, 1, True),))
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    return st, [ev.SourcePcpiRefused(name=S2, error="connection refused")]


def _agent_abandon_jump_ahead_1():
    st = updating(rep("A", "done", active_point=S2), phase="jump_ahead_1").with_pcpi(pcpi(JA, "jump_ahead", False))
    return st, [ev.PcpiRefused(name=JA, error="PCPI limit")]


def _agent_abandon_jump_ahead_2():
    return _scn_jump_ahead_refused()


AGENT_SCENARIOS = {
    ("start_cycle", "idle", "updating"): _agent_start_cycle,
    ("start_rollback", "updating", "rolling_back"): _agent_start_rollback,
    ("start_jump_ahead", "updating", "jump_ahead_1"): _agent_jump_from_updating,
    ("start_jump_ahead", "rolling_back", "jump_ahead_1"): _agent_jump_from_rolling_back,
    ("take_new_base", "jump_ahead_1", "jump_ahead_2"): _agent_take_new_base,
    ("resume_updates", "rolling_back", "updating"): _agent_resume_updates,
    ("start_release", "updating", "releasing"): _agent_release_from_updating,
    ("start_release", "rolling_back", "releasing"): _agent_release_from_rolling_back,
    ("start_release", "jump_ahead_2", "releasing"): _agent_release_from_jump_2,
    ("finish_cycle", "releasing", "idle"): _agent_finish,
    ("source_unavailable", "updating", "releasing"): _agent_source_unavailable,
    ("abandon_jump_ahead", "jump_ahead_1", "releasing"): _agent_abandon_jump_ahead_1,
    ("abandon_jump_ahead", "jump_ahead_2", "releasing"): _agent_abandon_jump_ahead_2,
}


def test_every_agent_edge_of_the_spec_has_a_scenario():
    assert set(AGENT_SCENARIOS) == set(load_spec().agent.edges())


@pytest.mark.parametrize("edge", sorted(AGENT_SCENARIOS), ids=lambda e: f"{e[0]}:{e[1]}")
def test_every_agent_phase_transition_through_decide_I8(edge):
    trigger, source, dest = edge
    st, events = AGENT_SCENARIOS[edge]()
    assert st.phase == source or trigger == "finish_cycle"
    st, logged = decide_all(st, events)
    assert (None, trigger, source, dest) in logged
    assert all((t, s, de) in load_spec().agent.edges() for (r, t, s, de) in logged if r is None)


def test_start_rollback_takes_the_rollback_pcpi_only_when_every_transfer_ended():
    st = updating(rep("A", "update"), rep("B", "update"), rep("U", "baseline"))
    d = decide(st, ev.TransferDone(replica="A", ok=False))
    assert d.effects == () and d.state.phase == "updating"
    d = decide(d.state, ev.TransferDone(replica="B", ok=True))
    assert d.effects == () and d.state.phase == "updating"  # a baseline is still in flight
    d = decide(d.state, ev.TransferDone(replica="U", ok=True))
    assert d.state.phase == "rolling_back"
    (take,) = d.effects
    assert take.role == "rollback" and d.state.pcpis[take.name].role == "rollback"


def test_one_rollback_pcpi_for_several_failed_replicas_fig9_step_1120():
    reps = [rep(n, "update") for n in "ABCD"]
    sim = Sim(updating(*reps), fail_transfer="ABC")
    for n in "ABCD":
        sim.feed(ev.TransferDone(replica=n, ok=n == "D", error="x"))
    (take,) = of(sim.effects, fx.TakePcpi)
    assert take.role == "rollback"
    d = sim.feed(ev.PcpiTaken(name=take.name))
    assert d.effects == tuple(fx.Rollback(replica=n, from_pcpi=take.name, to_pcpi=BASE) for n in "ABC")
    assert len([p for p in d.state.pcpis.values() if p.role == "rollback"]) == 1


def test_rollback_pcpi_taken_with_nothing_to_roll_back_moves_on():
    st = _rolling_back(rep("A", "done", active_point=S2))
    st = st.with_pcpi(pcpi(RB, "rollback", taken=False))
    d = decide(st, ev.PcpiTaken(name=RB))
    assert d.state.phase == "jump_ahead_1"


def test_take_new_base_requires_purged_guard():
    st, _ = _agent_take_new_base()
    with pytest.raises(IllegalTransition, match="take_new_base"):
        default_model().agent_next(st, "take_new_base")  # purged is False
    assert default_model().agent_next(attrs.evolve(st, purged=True), "take_new_base") == "jump_ahead_2"


def test_purgatory_purged_outside_jump_ahead_1_is_ignored():
    st = rest("A")
    d = decide(st, ev.PurgatoryPurged())
    assert d.state == st and d.effects == ()


def test_exported_outside_jump_ahead_2_changes_nothing():
    st = rest("A")
    assert decide(st, ev.Exported()).state == st


@pytest.mark.parametrize("phase", ["updating", "rolling_back"])
def test_jump_ahead_guard_over_every_pair_of_replica_states_I8(phase):
    """I8: start_jump_ahead is allowed iff no replica is in update, rollback or baseline
    (a re-seed does not hold it) and some replica (stable, done, stable_uncoalesced,
    reseeded, done_uncoalesced) participates."""
    spec = load_spec()
    model = Model()
    states = spec.replica.state_names
    for a, b in itertools.product(states, repeat=2):
        st = GroupState(
            name=G, phase=phase, replicas={"A": Replica("A", "A", state=a), "B": Replica("B", "B", state=b)}
        )
        expect = not ({a, b} & {"update", "rollback", "baseline"}) and bool(
            {a, b} & {"stable", "done", "stable_uncoalesced", "reseeded", "done_uncoalesced"}
        )
        assert model.agent_may(st, "start_jump_ahead") is expect, (a, b)


def test_jump_ahead_never_starts_while_a_replica_is_in_flight_I8():
    """I8 through decide: every intermediate decision with a replica in update, rollback
    or baseline takes no jump-ahead PCPI."""
    st = updating(rep("A", "update"), rep("B", "update"), rep("U", "baseline"), rep("C", "update"))
    sim = Sim(st, fail_transfer="B", fail_rollback="")
    for e in (
        ev.TransferDone(replica="A", ok=True),
        ev.TransferDone(replica="B", ok=False),
        ev.TransferDone(replica="C", ok=True),
        ev.TransferDone(replica="U", ok=True),
    ):
        d = sim.feed(e)
        assert d.state.phase in ("updating", "rolling_back")
        assert not [t for t in of(d.effects, fx.TakePcpi) if t.role == "jump_ahead"]
    (rb,) = of(sim.effects, fx.TakePcpi)
    d = sim.feed(ev.PcpiTaken(name=rb.name))
    assert d.state.phase == "rolling_back" and of(d.effects, fx.Rollback)
    d = sim.feed(ev.RollbackDone(replica="B", ok=True))
    assert d.state.phase == "jump_ahead_1"
    for d in sim.decisions:
        for t in d.log:
            if t.trigger == "start_jump_ahead":
                in_flight = {r.state for r in d.state.replicas.values()} & {"update", "rollback", "baseline"}
                assert not in_flight


# ---------------------------------------------------------------------------
# illegal requests
# ---------------------------------------------------------------------------
def test_illegal_replica_trigger_names_replica_state_and_trigger():
    with pytest.raises(IllegalTransition) as ei:
        default_model().replica_next("A", "update", "jump_ahead")
    msg = str(ei.value)
    assert "'A'" in msg and "'update'" in msg and "'jump_ahead'" in msg
    assert ei.value.replica == "A" and ei.value.state == "update" and ei.value.trigger == "jump_ahead"
    assert "update_failed" in ei.value.hint and "update_succeeded" in ei.value.hint


@pytest.mark.parametrize(
    "state,event,trigger",
    [
        ("unstable_uncoalesced", ev.BreakMirror(replica="A"), "break_mirror"),
        ("broken", ev.BreakMirror(replica="A"), "break_mirror"),
        ("uninitialized", ev.BreakMirror(replica="A"), "break_mirror"),
        ("stable", ev.Resync(replica="A"), "resync"),
        ("stable_uncoalesced", ev.Resync(replica="A"), "resync"),
    ],
)
def test_illegal_request_through_decide_raises_and_changes_nothing(state, event, trigger):
    st = group(rep("A", state), rep("B"))
    before = copy.deepcopy(st)
    with pytest.raises(IllegalTransition) as ei:
        decide(st, event)
    assert ei.value.replica == "A" and ei.value.state == state and ei.value.trigger == trigger
    assert f"'{state}'" in str(ei.value) and f"'{trigger}'" in str(ei.value)
    assert st == before


def test_illegal_agent_trigger_names_the_phase():
    st = updating(rep("A", "update"))
    with pytest.raises(IllegalTransition) as ei:
        decide(st, ev.StartCycle(now=1.0))
    assert "'updating'" in str(ei.value) and "'start_cycle'" in str(ei.value) and "g" in str(ei.value)


@pytest.mark.parametrize("phase", ["updating", "rolling_back", "jump_ahead_1", "jump_ahead_2", "releasing"])
@pytest.mark.parametrize("event", [ev.BreakMirror(replica="A"), ev.Resync(replica="A")])
def test_break_and_resync_outside_idle_are_not_now(phase, event):
    """Mid-cycle (its transfers started; a cycle that could not begin: the test below)."""
    st = attrs.evolve(
        group(rep("A", "stable" if isinstance(event, ev.BreakMirror) else "broken")),
        phase=phase,
        transfers_started=True,
    )
    with pytest.raises(NotNow) as ei:
        decide(st, event)
    assert phase in str(ei.value) and ei.value.hint


@pytest.mark.parametrize(
    "event",
    [
        ev.BreakMirror(replica="nope"),
        ev.Resync(replica="nope"),
        ev.TransferDone(replica="nope", ok=True),
        ev.RollbackDone(replica="nope", ok=True),
        ev.QtreeRemoved(replica="nope"),
    ],
)
def test_unknown_replica_is_not_now(event):
    with pytest.raises(NotNow, match="no replica 'nope'"):
        decide(rest("A"), event)


def test_non_event_is_a_type_error():
    with pytest.raises(TypeError):
        decide(rest("A"), object())


# ---------------------------------------------------------------------------
# purity
# ---------------------------------------------------------------------------
def _purity_cases():
    yield rest("A", "B"), ev.StartCycle(now=3.0)
    yield from (
        sc()
        for sc in (
            _scn_start_baseline,
            _scn_update_failed,
            _scn_rollback_failed,
            _scn_retry_failed,
            _jump_2,
            _scn_break_stable,
            _scn_resync,
            _agent_release_from_jump_2,
        )
    )
    yield (
        _rolling_back(rep("A", "rollback")),
        ev.Recover(now=1.0, destination_pcpis=frozenset({BASE}), source_pcpis=frozenset({S1})),
    )


@pytest.mark.parametrize("case", range(10))
def test_decide_is_pure(case):
    st, events = list(_purity_cases())[case]
    events = events if isinstance(events, list) else [events]
    for e in events:
        before = copy.deepcopy(st)
        d1 = decide(st, e)
        d2 = decide(st, e)
        assert d1 == d2
        assert st == before  # the input state is not mutated
        st = d1.state


# ---------------------------------------------------------------------------
# recovery (DESIGN §2 Recovery, I6)
# ---------------------------------------------------------------------------
def recover(st: GroupState, dest=(), src=None, now: float = 10.0, i1: bool = True) -> Decision:
    if src is None:
        src = {s for s, sp in st.source_pcpis.items() if sp.taken}
    d = decide(st, ev.Recover(now=now, destination_pcpis=frozenset(dest), source_pcpis=frozenset(src)))
    if i1:
        check_i1(d.state)
    assert_export_first(d)
    return d


def assert_export_first(d: Decision) -> None:
    """Recovery re-applies the export table before anything is released (I3, I6)."""
    kinds = [type(e) for e in d.effects]
    assert kinds and kinds[0] is fx.Export, kinds
    assert d.effects[0].mapping == {r.name: r.exported for r in d.state.replicas.values()} or fx.Export in kinds[1:]
    releases = [i for i, k in enumerate(kinds) if k in (fx.ReleasePcpi, fx.ReleaseSourcePcpi)]
    assert all(i > 0 for i in releases)


def held(st: GroupState) -> set[str]:
    return {n for n, p in st.pcpis.items() if p.taken}


def test_recover_at_rest_only_reapplies_the_export_table():
    st = rest("A", "B")
    d = recover(st, dest={BASE})
    assert d.effects == (fx.Export(mapping={"A": BASE, "B": BASE}),)
    assert d.state == st and d.log == ()


@pytest.mark.parametrize("present", [True, False])
def test_recover_pending_pcpi_present_is_taken_absent_is_dropped(present):
    st = updating(rep("A", "done", active_point=S2), phase="jump_ahead_1").with_pcpi(
        pcpi(JA, "jump_ahead", taken=False)
    )
    d = recover(st, dest={BASE, JA} if present else {BASE})
    if present:
        assert d.state.pcpis[JA].taken
        assert d.effects[1:] == (fx.PurgePurgatory(qtrees=("A",)),)
    else:
        assert JA not in d.state.pcpis
        (take,) = d.effects[1:]
        assert take.role == "jump_ahead" and take.name != JA
        assert d.state.pcpis[take.name].role == "jump_ahead" and not d.state.pcpis[take.name].taken


def test_recover_jump_ahead_1_with_taken_intermediate_purges():
    st = updating(rep("A", "done", active_point=S2), rep("B", "done", active_point=S2), phase="jump_ahead_1")
    st = st.with_pcpi(pcpi(JA, "jump_ahead"))
    d = recover(st, dest={BASE, JA})
    assert d.effects[1:] == (fx.PurgePurgatory(qtrees=("A", "B")),)
    assert d.state.phase == "jump_ahead_1"


def test_recover_releasing_pcpis_are_released_again():
    st = updating(rep("A", active_point=S2, source_point=S2, exported=NB), phase="releasing")
    st = attrs.evolve(
        st,
        pcpis={
            NB: pcpi(NB, "base"),
            BASE: pcpi(BASE, "base", releasing=True),
            JA: pcpi(JA, "jump_ahead", releasing=True),
        },
    )
    st = st.with_source_pcpi(SourcePcpi(S1, 1, taken=True, releasing=True))
    d = recover(st, dest={NB, BASE, JA}, src={S1, S2})
    assert sorted(map(repr, d.effects[1:])) == sorted(
        map(repr, [fx.ReleasePcpi(name=BASE), fx.ReleasePcpi(name=JA), fx.ReleaseSourcePcpi(name=S1)])
    )
    assert d.state.phase == "releasing"
    sim = Sim(d.state)
    for e in d.effects[1:]:
        sim.feed(sim.answer(e))
    assert sim.state.phase == "idle" and cycle_pcpis(sim.state) == [NB] and set(sim.state.source_pcpis) == {S2}


def test_recover_releasing_phase_with_nothing_left_finishes():
    st = updating(rep("A", active_point=S2, source_point=S2, exported=NB), phase="releasing")
    st = attrs.evolve(st, pcpis={NB: pcpi(NB, "base")}, source_pcpis={S2: SourcePcpi(S2, 2, True)})
    d = recover(st, dest={NB}, src={S2})
    assert (None, "finish_cycle", "releasing", "idle") in edges(d)
    assert d.state.phase == "idle" and d.state.cycle_targets == {}


def test_recover_releasing_phase_releases_what_nobody_needs():
    """Crash right after the Exported decision was planned but some PCPI was not yet marked."""
    st = updating(rep("A", active_point=S2, source_point=S2, exported=NB), phase="releasing")
    st = attrs.evolve(st, pcpis={NB: pcpi(NB, "base"), JA: pcpi(JA, "jump_ahead")})
    d = recover(st, dest={NB, JA}, src={S1, S2})
    assert fx.ReleasePcpi(name=JA) in d.effects and fx.ReleaseSourcePcpi(name=S1) in d.effects
    assert d.state.phase == "releasing"


def test_recover_releases_unknown_group_pcpis_but_not_foreign_ones():
    """PCPIs taken but never recorded (crash between take and commit) are released;
    anything without the group's prefix is left alone."""
    st = rest("A")
    dest = {BASE, "co-g-000009-jump_ahead", "co-h-000001-base", "manual-snap", "hourly.0"}
    src = {S1, "co-g-src-000007", "co-h-src-000001", "manual"}
    d = recover(st, dest=dest, src=src)
    assert set(of(d.effects, fx.ReleasePcpi)) == {fx.ReleasePcpi(name="co-g-000009-jump_ahead")}
    assert set(of(d.effects, fx.ReleaseSourcePcpi)) == {fx.ReleaseSourcePcpi(name="co-g-src-000007")}
    assert d.state == st


def test_recover_does_not_release_pcpis_of_a_group_whose_name_extends_ours():
    st = rest("A")
    dest = {BASE, "co-g-x-000002-base"}  # group "g-x" shares the destination volume
    src = {S1, "co-g-src-src-000001"}  # and group "g-src" shares the source volume
    d = recover(st, dest=dest, src=src)
    assert not of(d.effects, fx.ReleasePcpi)
    assert not of(d.effects, fx.ReleaseSourcePcpi)


def test_recover_update_becomes_rollback_and_takes_one_rollback_pcpi():
    st = updating(rep("A", "update"), rep("B", "done", active_point=S2), rep("C", "update"))
    d = recover(st, dest={BASE})
    assert {
        ("A", "update_failed", "update", "rollback"),
        ("C", "update_failed", "update", "rollback"),
        (None, "start_rollback", "updating", "rolling_back"),
    } <= edges(d)
    assert d.state.replicas["A"].last_error == "update interrupted by a restart"
    assert d.state.cycle_failures == 2
    (take,) = d.effects[1:]
    assert take.role == "rollback"


def test_recover_baseline_removes_partial_data():
    st = updating(rep("U", "baseline"), rep("A", "done", active_point=S2))
    d = recover(st, dest={BASE})
    assert d.effects[1:] == (fx.RemoveQtree(replica="U"),)
    assert d.state.replicas["U"].state == "baseline" and d.state.phase == "updating"
    d = decide(d.state, ev.QtreeRemoved(replica="U"))
    assert d.state.replicas["U"].state == "uninitialized"
    assert d.state.phase == "jump_ahead_1"  # A goes on without U (I7: U retries next cycle)


def test_recover_updating_retakes_a_source_pcpi_that_was_never_taken():
    st = updating(rep("A"))
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    d = recover(st, dest={BASE}, src={S1})
    assert d.effects[1:] == (fx.TakeSourcePcpi(name=S2),)
    d = decide(d.state, ev.SourcePcpiTaken(name=S2))
    assert d.state.replicas["A"].state == "update"


def test_recover_updating_with_source_pcpi_present_marks_it_taken():
    st = updating(rep("A", "update"))
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    d = recover(st, dest={BASE}, src={S1, S2})
    assert d.state.source_pcpis[S2].taken


def test_recover_drops_pending_source_pcpi_that_is_not_the_cycle_target():
    st = rest("A").with_source_pcpi(SourcePcpi("co-g-src-000008", 3, taken=False))
    d = recover(st, dest={BASE}, src={S1})
    assert "co-g-src-000008" not in d.state.source_pcpis
    assert d.effects == (fx.Export(mapping={"A": BASE}),)


@pytest.mark.parametrize("present", [True, False])
def test_recover_rolling_back_takes_a_fresh_rollback_pcpi(present):
    """The active FS may be half rolled back: the old rollback PCPI is released and a
    fresh one taken for every replica still in rollback."""
    st = _rolling_back(rep("A", "rollback"), rep("B", "done", active_point=S2))
    if not present:
        st = st.with_pcpi(pcpi(RB, "rollback", taken=False))
    d = recover(st, dest={BASE, RB} if present else {BASE})
    takes = of(d.effects, fx.TakePcpi)
    assert len(takes) == 1 and takes[0].role == "rollback" and takes[0].name != RB
    if present:
        assert fx.ReleasePcpi(name=RB) in d.effects
        assert d.effects.index(fx.ReleasePcpi(name=RB)) > 0
        assert d.state.pcpis[RB].releasing
    else:
        assert RB not in d.state.pcpis and not of(d.effects, fx.ReleasePcpi)
    assert d.state.phase == "rolling_back"
    d = decide(d.state, ev.PcpiTaken(name=takes[0].name))
    assert d.effects == (fx.Rollback(replica="A", from_pcpi=takes[0].name, to_pcpi=BASE),)


def test_recover_rolling_back_with_every_rollback_finished_jumps_ahead():
    st = _rolling_back(rep("A", "done"), rep("B", "done", active_point=S2))
    d = recover(st, dest={BASE, RB})
    assert fx.ReleasePcpi(name=RB) in d.effects
    assert d.state.phase == "jump_ahead_1"
    assert [t.role for t in of(d.effects, fx.TakePcpi)] == ["jump_ahead"]


@pytest.mark.parametrize("nb_state", ["taken", "pending_present"])
def test_recover_jump_ahead_2_with_new_base_rolls_forward(nb_state):
    st, _ = _jump_2()
    if nb_state == "taken":
        st = st.with_pcpi(pcpi(NB, "new_base"))
    d = recover(st, dest={BASE, IND, "co-g-000000-individual", JA, NB})
    assert d.state.pcpis[NB].taken
    exports = of(d.effects, fx.Export)
    assert len(exports) == 2
    assert exports[0].mapping["D"] == BASE  # the old table first (heals a half switch) ...
    assert exports[-1].mapping == {"S": NB, "D": NB, "SU": NB, "UU": "co-g-000000-individual", "K": ACTIVE}
    assert all(d.state.replicas[n].state == "stable" and d.state.replicas[n].exported == NB for n in ("S", "D", "SU"))
    assert not of(d.effects, fx.ReleasePcpi)  # nothing released before the switch is confirmed
    sim = Sim(d.state)
    for e in d.effects:
        sim.feed(sim.answer(e))
    assert sim.state.phase == "releasing"


def test_recover_jump_ahead_2_after_switch_was_recorded_is_idempotent():
    st, events = _jump_2()
    st = decide(st, events[0]).state  # the switch was decided (replicas stable @ NB) then the crash
    d = recover(st, dest={BASE, IND, "co-g-000000-individual", JA, NB})
    assert of(d.effects, fx.Export)[0].mapping["D"] == NB
    assert all(r.exported in (NB, "co-g-000000-individual", ACTIVE) for r in d.state.replicas.values())


def test_recover_jump_ahead_2_without_new_base_takes_it():
    st, _ = _jump_2()  # NB pending, never taken
    d = recover(st, dest={BASE, IND, "co-g-000000-individual", JA})
    assert NB not in d.state.pcpis
    (take,) = of(d.effects, fx.TakePcpi)
    assert take.role == "new_base" and take.name != NB
    assert d.state.replicas["D"].state == "done" and d.state.replicas["D"].exported == BASE
    assert len(of(d.effects, fx.Export)) == 1


@pytest.mark.parametrize("phase", ["idle", "updating", "rolling_back", "jump_ahead_1", "jump_ahead_2", "releasing"])
def test_recover_export_comes_before_every_release(phase):
    """I3/I6: in every recovery decision the export table is re-applied before any
    PCPI is released, so an exported image never disappears under its readers."""
    a = rep("A", "unstable_uncoalesced", scratch=SCR)
    st = updating(a, rep("B", "done", active_point=S2), phase=phase)
    st = st.with_pcpi(pcpi(SCR, "individual", owners=frozenset("A")))
    st = st.with_pcpi(pcpi("co-g-000003-jump_ahead", "jump_ahead", releasing=True))
    if phase == "rolling_back":
        st = st.with_pcpi(pcpi(RB, "rollback"))
    if phase == "jump_ahead_2":
        st = st.with_pcpi(pcpi(NB, "new_base"))
    d = recover(st, dest={BASE, IND, SCR, RB, NB, "co-g-000003-jump_ahead", "co-g-000099-base"}, i1=False)
    first_release = min(i for i, e in enumerate(d.effects) if isinstance(e, fx.ReleasePcpi))
    first_export = min(i for i, e in enumerate(d.effects) if isinstance(e, fx.Export))
    assert first_export == 0 < first_release


def test_recover_abandons_a_retry_scratch_and_exports_last_good():
    a = rep("A", "unstable_uncoalesced", scratch=SCR, retries=2)
    st = group(a, rep("B")).with_pcpi(pcpi(SCR, "individual", owners=frozenset("A")))
    d = recover(st, dest={BASE, IND, SCR})
    a = d.state.replicas["A"]
    assert (a.state, a.scratch, a.exported) == ("unstable_uncoalesced", None, IND)
    assert d.effects == (fx.Export(mapping={"A": IND, "B": BASE}), fx.ReleasePcpi(name=SCR))
    # the next tick starts a fresh retry
    d = decide(d.state, ev.Tick(now=1e9))
    assert [t.role for t in of(d.effects, fx.TakePcpi)] == ["individual"]


def test_recover_abandons_a_resync_scratch_and_exports_last_good():
    k = rep("K", "unstable_uncoalesced", scratch=SCR, exported=SCR, last_good=BASE)
    st = group(k, rep("B")).with_pcpi(pcpi(SCR, "individual", owners=frozenset("K")))
    d = recover(st, dest={BASE, SCR})
    k = d.state.replicas["K"]
    assert (k.scratch, k.exported) == (None, BASE)
    assert d.effects == (fx.Export(mapping={"K": BASE, "B": BASE}), fx.ReleasePcpi(name=SCR))


def test_recover_pending_retry_scratch_absent_is_dropped():
    a = rep("A", "unstable_uncoalesced", scratch=SCR)
    st = group(a, rep("B")).with_pcpi(pcpi(SCR, "individual", taken=False, owners=frozenset("A")))
    d = recover(st, dest={BASE, IND})
    assert SCR not in d.state.pcpis and d.state.replicas["A"].scratch is None
    assert d.state.replicas["A"].exported == IND
    assert not of(d.effects, fx.ReleasePcpi)


def test_recover_pending_resync_scratch_absent_exports_last_good():
    k = rep("K", "unstable_uncoalesced", scratch=SCR, exported=ACTIVE, last_good=BASE)
    st = group(k, rep("B")).with_pcpi(pcpi(SCR, "individual", taken=False, owners=frozenset("K")))
    d = recover(st, dest={BASE})
    k = d.state.replicas["K"]
    assert k.scratch is None
    assert k.exported == BASE  # as when the scratch was present: the spec's exports for this state


def test_recover_twice_is_stable():
    """Recovery is idempotent at rest: recovering the recovered state changes nothing more."""
    st = _rolling_back(rep("A", "rollback"), rep("B", "done", active_point=S2))
    d1 = recover(st, dest={BASE, RB})
    (take,) = of(d1.effects, fx.TakePcpi)
    d2 = recover(d1.state, dest={BASE, RB, take.name})
    assert len([p for p in d2.state.pcpis.values() if p.role == "rollback" and not p.releasing]) == 1
    check_i1(d2.state)


def test_decision_log_entries_are_transitions():
    d = decide(rest("A"), ev.StartCycle(now=0.0))
    assert d.log == (Transition(None, "start_cycle", "idle", "updating"),)


def test_recover_updating_with_untaken_source_pcpi_absent_starts_the_transfers():
    """Crash before the source PCPI was taken: it is re-taken and the cycle's transfers start."""
    st = updating(rep("A"), rep("B")).with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    sim = Sim(st)
    sim.run(ev.Recover(now=1.0, destination_pcpis=frozenset({BASE}), source_pcpis=frozenset({S1})))
    assert {t.replica for t in of(sim.effects, fx.Transfer)} == {"A", "B"}
    assert all(r.source_point == S2 for r in sim.state.replicas.values())


def test_recover_updating_with_source_pcpi_present_starts_the_transfers():
    """Crash at after_source_pcpi: the source PCPI exists but SourcePcpiTaken was never
    decided.  Recovery must finish what was in flight (I6): start the transfers, as it
    does when the source PCPI has to be re-taken."""
    st = updating(rep("A"), rep("B")).with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    sim = Sim(st)
    sim.run(ev.Recover(now=1.0, destination_pcpis=frozenset({BASE}), source_pcpis=frozenset({S1, S2})))
    assert {t.replica for t in of(sim.effects, fx.Transfer)} == {"A", "B"}
    assert all(r.source_point == S2 for r in sim.state.replicas.values())


# ---------------------------------------------------------------------------
# random walks with crashes: the planner against a model of the volumes (I1-I4, I6, I8)
# ---------------------------------------------------------------------------
class Volumes:
    """What the backends hold: PCPIs on both volumes and the destination's export table."""

    def __init__(self, st: GroupState) -> None:
        self.dest = {n for n, p in st.pcpis.items() if p.taken}
        self.src = {n for n, p in st.source_pcpis.items() if p.taken}
        self.exports = {r.name: r.exported for r in st.replicas.values()}

    def run(self, e) -> None:
        if isinstance(e, fx.TakePcpi):
            self.dest.add(e.name)
        elif isinstance(e, fx.ReleasePcpi):
            assert e.name not in self.exports.values(), f"I3/I6: released {e.name} while it is exported"
            self.dest.discard(e.name)
        elif isinstance(e, fx.TakeSourcePcpi):
            self.src.add(e.name)
        elif isinstance(e, fx.ReleaseSourcePcpi):
            self.src.discard(e.name)
        elif isinstance(e, fx.Export):
            for name in e.mapping.values():
                assert name in (None, ACTIVE) or name in self.dest, f"I3: exporting {name}, not on the volume"
            self.exports = dict(e.mapping)
        elif isinstance(e, fx.Rollback):
            assert e.from_pcpi in self.dest and e.to_pcpi in self.dest, e
        elif isinstance(e, fx.Transfer):
            assert e.target in self.src and (e.base is None or e.base in self.src), e


def _walk(seed: int, adds: bool = False) -> None:
    import random

    rng = random.Random(seed)
    st = group(rep("A"), rep("B"), rep("C"), rep("N", "uninitialized"))
    vols = Volumes(st)
    sim = Sim(st)
    legal_r, legal_a = load_spec().replica.edges(), load_spec().agent.edges()
    now = 0.0

    def feed(e):
        d = sim.feed(e)
        for t in d.log:
            assert (t.trigger, t.source, t.dest) in (legal_a if t.replica is None else legal_r), t  # I8
            if t.trigger == "start_jump_ahead":
                assert not sim.state.in_state("update", "rollback", "baseline")  # I8
        for r in sim.state.replicas.values():  # the ledger never exports a PCPI it does not hold
            if r.exported not in (None, ACTIVE):
                assert r.exported in sim.state.pcpis, (r, sim.state.pcpis)
        in_cycle = set(load_spec().states_in_field("cycle"))
        exported = {r.exported for r in sim.state.replicas.values() if r.state in in_cycle} - {None}
        assert len(exported) <= 1, exported  # I4 (a fresh baseline in done exports nothing yet)
        return d.effects

    def drive(effects):
        pending = deque(effects)
        while pending:
            e = pending.popleft()
            crash = rng.random() < 0.06
            if crash and rng.random() < 0.5:
                return False  # crashed before the effect ran
            vols.run(e)
            if crash:
                return False  # the effect ran, its result was lost
            if isinstance(e, fx.Transfer):
                res = ev.TransferDone(replica=e.replica, ok=rng.random() > 0.3, now=now, error="x")
            elif isinstance(e, fx.Rollback):
                res = ev.RollbackDone(replica=e.replica, ok=rng.random() > 0.4, now=now, error="y")
            else:
                res = sim.answer(e)
            pending.extend(feed(res))
        return True

    def recover():
        pre = pcpi_prefix(G)
        e = ev.Recover(
            now=now,
            destination_pcpis=frozenset(n for n in vols.dest if n.startswith(pre)),
            source_pcpis=frozenset(vols.src),
        )
        return drive(feed(e))

    def request(e):
        try:
            effects = feed(e)
        except (NotNow, IllegalTransition):
            return
        while not drive(effects):
            effects = []
            while not recover():
                pass

    for _step in range(25):
        now += rng.choice([1.0, 50.0, 500.0])
        kind = rng.random()
        name = rng.choice("ABCN")
        if adds and kind < 0.08:
            request(ev.AddReplica(name=f"X{_step}", source_qtree=f"X{_step}"))
        elif kind < 0.55:
            request(ev.StartCycle(now=now))
        elif kind < 0.75:
            request(ev.Tick(now=now))
        elif kind < 0.82:
            request(ev.BreakMirror(replica=name))
        elif kind < 0.94:
            request(ev.Resync(replica=name, discard=rng.random() < 0.3))
        else:
            request(ev.ReleaseKept(replica=name))
        assert sim.state.phase == "idle", sim.state.phase
        check_i1(sim.state)
        i11 = i11_kept_writes(sim.state, vols.dest)
        assert i11.ok, i11.detail
        ledger_held = {n for n, p in sim.state.pcpis.items() if p.taken}
        assert vols.dest == ledger_held, "I6: the volume and the ledger disagree at rest"
        assert vols.src == set(sim.state.source_pcpis)
        table = {r.name: r.exported for r in sim.state.replicas.values() if r.exported is not None}
        assert {k: v for k, v in vols.exports.items() if v is not None} == table

    # faults stop: everything comes home (I7); the operator releases the kept writes (I11)
    def release_kept():
        for p in list(sim.state.pcpis.values()):
            if p.role == "kept":
                request(ev.ReleaseKept(replica=next(iter(p.owners))))

    release_kept()
    for r in list(sim.state.replicas.values()):
        if r.state == "broken":
            request(ev.Resync(replica=r.name))
    for _ in range(12):
        now += 10_000.0
        request(ev.Tick(now=now))
        effects = feed(ev.StartCycle(now=now))
        pending = deque(effects)
        while pending:
            e = pending.popleft()
            vols.run(e)
            pending.extend(feed(sim.answer(e)))
        if all(r.state == "stable" for r in sim.state.replicas.values()):
            break
    assert {r.state for r in sim.state.replicas.values()} == {"stable"}, sim.state.replicas
    release_kept()
    check_i1(sim.state)
    assert vols.dest == {n for n, p in sim.state.pcpis.items() if p.taken} and len(vols.dest) == 1


@pytest.mark.parametrize("seed", range(80))
def test_random_walk_with_crashes_keeps_the_invariants_I1_I3_I4_I6_I8(seed):
    """Random requests, transfer/rollback failures and crashes (before or after an effect,
    also during recovery) against a model of the volumes; at rest the ledger and the
    volumes agree, nothing is mid-cycle, and I1/I2 hold; nothing exported is ever
    released; once faults stop every replica ends stable (I7)."""
    _walk(seed)


@pytest.mark.parametrize("seed", range(1000, 1040))
def test_random_walk_with_replicas_added_on_the_way(seed):
    """The same, with new replicas added between cycles (baselines joining at the next
    jump-ahead, or retried after a failed baseline)."""
    _walk(seed, adds=True)


def test_i4_check_accepts_a_fresh_baseline_in_done():
    """I4: a replica whose baseline just finished (done) exports nothing yet; that is not
    a second coalesced point."""
    st = updating(
        rep("A", "done", active_point=S2),
        rep("N", "done", exported=None, source_point=None, active_point=S2),
        phase="jump_ahead_1",
    )
    assert i4_one_coalesced_point(st).ok


def test_recover_jump_ahead_2_without_new_base_then_run_to_rest_I4_I6():
    """Crash after the take_new_base decision was committed but before the new base PCPI
    was created.  Recovery emits [Export(old table), TakePcpi(new_base)]; the executor
    answers the healing Export with Exported, which must NOT count as the jump-ahead's
    switch: the cycle must end with every participant stable at the new base."""
    st, _ = _jump_2()  # NB pending and absent from the volume
    sim = Sim(st)
    sim.run(
        ev.Recover(
            now=1.0,
            destination_pcpis=frozenset({BASE, IND, "co-g-000000-individual", JA}),
            source_pcpis=frozenset({S0, S1, S2}),
        )
    )
    s = sim.state
    assert s.phase == "idle"
    nb = s.base().name
    for n in ("S", "D", "SU"):
        assert s.replicas[n].state == "stable" and s.replicas[n].exported == nb, s.replicas[n]
    assert BASE not in s.pcpis or s.pcpis[BASE].owners == frozenset({"K"})
    assert not [r for r in s.replicas.values() if r.state == "done"]


def test_only_the_jump_ahead_export_is_marked_jump():
    """The Exported answer to a re-export (break, resync, retry, recovery) must not count
    as the jump-ahead's switch (regression: a crash in jump_ahead_2 before the new base
    existed ended idle with replicas in done)."""
    st, events = _jump_2()
    d = decide(st, events[0])
    assert [e.jump for e in of(d.effects, fx.Export)] == [True]
    for e in (_scn_break_stable, _scn_break_su):
        s0, evs = e()
        assert [x.jump for x in of(decide(s0, evs[0]).effects, fx.Export)] == [False]
    rec = recover(st, dest={BASE, IND, "co-g-000000-individual", JA})
    assert [x.jump for x in of(rec.effects, fx.Export)] == [False]
    plain = decide(rec.state, ev.Exported(jump=False))
    assert plain.state.phase == "jump_ahead_2" and plain.effects == () and plain.log == ()
    assert decide(rec.state, ev.Exported(jump=True)).state.phase == "releasing"


# ---------------------------------------------------------------------------
# resume after a restart (docs/decisions.md)
# ---------------------------------------------------------------------------
def test_recover_marks_only_spooled_updates_resumable():
    st = updating(rep("A", "update"), rep("B", "update"), rep("C", "done", active_point=S2))
    d = decide(
        st,
        ev.Recover(
            now=1.0,
            destination_pcpis=frozenset({BASE}),
            source_pcpis=frozenset({S1, S2}),
            spooled=frozenset({"A", "C"}),
        ),
    )
    a, b, c = (d.state.replicas[n] for n in "ABC")
    assert (a.state, a.resume) == ("rollback", True)
    assert (b.state, b.resume) == ("rollback", False)
    assert (c.state, c.resume) == ("done", False)  # not in update: a spool name alone changes nothing
    assert d.state.phase == "rolling_back"


def test_resumed_update_restarts_from_the_base_to_the_cycle_target_and_releases_the_rollback_pcpi_I1():
    st = _rolling_back(rep("A", "rollback", resume=True), rep("B", "rollback"), rep("C", "done", active_point=S2))
    d = decide(st, ev.RollbackDone(replica="A", ok=True))
    assert d.state.phase == "rolling_back" and d.effects == ()  # B's rollback is still running
    d = decide(d.state, ev.RollbackDone(replica="B", ok=True))
    assert d.state.phase == "updating"
    assert d.effects == (
        fx.ReleasePcpi(name=RB),
        fx.Transfer(replica="A", source_qtree="A", base=S1, target=S2, resume=True),
    )
    a, b = d.state.replicas["A"], d.state.replicas["B"]
    assert (a.state, a.target, a.resume) == ("update", S2, False)
    assert b.state == "done"
    st2 = d.state
    # the rollback PCPI is gone before a second failure takes a fresh one (at most 4, I1)
    st2 = decide(st2, ev.PcpiReleased(name=RB)).state
    d = decide(st2, ev.TransferDone(replica="A", ok=False, error="again"))
    assert d.state.phase == "rolling_back"
    (take,) = d.effects
    assert take.role == "rollback" and take.name != RB
    assert len([p for p in d.state.pcpis.values() if p.role in ("base", "rollback")]) == 2
    check_i1(d.state)
    # or the resumed update succeeds and the cycle jumps ahead with A at the target
    d = decide(st2, ev.TransferDone(replica="A", ok=True))
    assert d.state.phase == "jump_ahead_1"
    assert d.state.replicas["A"].active_point == S2


def test_a_resumable_replica_whose_rollback_fails_leaves_the_cycle_without_resuming():
    st = _rolling_back(rep("A", "rollback", resume=True))
    d = decide(st, ev.RollbackDone(replica="A", ok=False))
    a = d.state.replicas["A"]
    assert (a.state, a.resume) == ("unstable_uncoalesced", False)
    assert not any(isinstance(e, fx.Transfer) for e in d.effects)


# ---------------------------------------------------------------------------
# failures that show; re-seeding a replica that cannot apply its stream
# (docs/decisions.md "Re-seeding a replica that cannot apply its stream")
# ---------------------------------------------------------------------------
class UpdatesFail(Sim):
    """A Sim in which the incremental updates of ``broken`` fail (a translation bug, a lost
    base): its baselines and re-seeds (base None) still succeed."""

    def __init__(self, state: GroupState, broken=(), **kw) -> None:
        super().__init__(state, **kw)
        self.broken = set(broken)

    def answer(self, e):
        if isinstance(e, fx.Transfer) and e.replica in self.broken and e.base is not None:
            return ev.TransferDone(replica=e.replica, ok=False, now=self.now, error="stream cannot be applied")
        return super().answer(e)


def _cycles(sim: Sim, n: int, step: float = 100.0) -> Sim:
    for _ in range(n):
        sim.now += step
        sim.run(ev.StartCycle(now=sim.now))
        assert sim.state.phase == "idle"
    return sim


def test_a_failed_update_shows_until_a_later_one_succeeds():
    """last_error and consecutive_failures survive the rollback and the jump-ahead (which
    used to clear the error); the next successful update clears them and sets last_success."""
    sim = _cycles(UpdatesFail(rest("A", "B"), broken={"A"}), 1)
    a, b = sim.state.replicas["A"], sim.state.replicas["B"]
    assert a.state == "stable" and a.exported == b.exported  # rolled back, jumped ahead with the others
    assert (a.last_error, a.consecutive_failures, a.last_success) == ("update failed: stream cannot be applied", 1, 0.0)
    assert a.source_point == S1 != b.source_point  # A's image did not move; B's did
    assert (b.last_error, b.consecutive_failures, b.last_success) == ("", 0, sim.now)
    sim.broken.clear()
    _cycles(sim, 1)
    a = sim.state.replicas["A"]
    assert (a.last_error, a.consecutive_failures, a.last_success) == ("", 0, sim.now)
    assert a.source_point == sim.state.replicas["B"].source_point


def test_rollback_and_jump_ahead_keep_the_error_of_the_update():
    st, (e,) = _jump_2()
    st = st.with_replica(attrs.evolve(st.replicas["D"], last_error="update failed: x", consecutive_failures=2))
    d = decide(st, e)
    d_ = d.state.replicas["D"]
    assert (d_.state, d_.last_error, d_.consecutive_failures) == ("stable", "update failed: x", 2)


@pytest.mark.parametrize("reseed_after", [1, 3])
def test_reseed_after_failed_updates_in_a_row_the_replica_leaves_the_cycle(reseed_after):
    """After reseed_after failed updates in a row the replica leaves the cycle at the end of the
    last one's rollback (request_reseed), keeps exporting that image pinned as its individual
    PCPI (I2), the next cycle re-seeds it by a baseline (base None) and it rejoins at a later
    jump-ahead at the source point of its re-seed."""
    sim = UpdatesFail(attrs.evolve(rest("A", "B"), reseed_after=reseed_after), broken={"A"})
    _cycles(sim, reseed_after - 1)
    assert sim.state.replicas["A"].state == "stable"
    _cycles(sim, 1)
    a = sim.state.replicas["A"]
    assert a.state == "reseed_pending" and a.consecutive_failures == reseed_after
    assert f"{reseed_after} updates failed in a row" in a.reseed_reason
    assert a.last_good == a.exported and a.exported != sim.state.base().name
    assert sim.state.pcpis[a.exported].role == "individual" and sim.state.pcpis[a.exported].owners == {"A"}
    assert i2_bounded_extras(sim.state).ok and i4_one_coalesced_point(sim.state).ok
    exported, point = a.exported, a.source_point
    n = len(sim.effects)
    _cycles(sim, 1)  # the re-seed: a baseline of A from this cycle's source PCPI
    (transfer,) = [e for e in of(sim.effects[n:], fx.Transfer) if e.replica == "A"]
    assert (transfer.base, transfer.reseed, transfer.target) == (None, True, sim.state.replicas["B"].source_point)
    a = sim.state.replicas["A"]
    # the re-seed arrived before the jump-ahead here (the Sim answers in order): A rejoined
    assert (a.state, a.source_point, a.last_error, a.consecutive_failures) == ("stable", transfer.target, "", 0)
    assert a.exported == sim.state.base().name and exported not in sim.state.pcpis  # the pin was released
    assert point != a.source_point and not a.reseed_reason


def test_reseed_after_zero_never_reseeds():
    sim = _cycles(UpdatesFail(attrs.evolve(rest("A"), reseed_after=0), broken={"A"}), 5)
    a = sim.state.replicas["A"]
    assert (a.state, a.consecutive_failures) == ("stable", 5)


def test_reseed_due_rule():
    assert [planner.reseed_due(n, 3) for n in range(5)] == [False, False, False, True, True]
    assert not planner.reseed_due(10, 0)


def test_reseed_after_a_failed_rollback_leaves_from_unstable_uncoalesced():
    st, events = _scn_reseed_after_failed_rollback()
    d = decide(st, events[0])
    a = d.state.replicas["A"]
    assert [t.trigger for t in d.log if t.replica == "A"] == ["rollback_failed", "request_reseed"]
    assert (a.state, a.last_good, a.exported, a.last_error) == ("reseed_pending", BASE, BASE, "rollback failed: io")


def test_a_reseed_does_not_hold_the_jump_ahead_I8():
    """The re-seed is outside the cycle: the others' exports move on while it runs; it ends
    (in any phase, here idle) as reseeded and joins the next jump-ahead."""
    st = group(rep("P", "reseed_pending"), rep("B"))
    d = decide(st, ev.StartCycle(now=500.0))
    (take,) = d.effects
    d = decide(d.state, ev.SourcePcpiTaken(name=take.name, now=501.0))
    target = take.name
    assert set(d.effects) == {
        fx.Transfer(replica="P", source_qtree="P", base=None, target=target, reseed=True),
        fx.Transfer(replica="B", source_qtree="B", base=S1, target=target),
    }
    sim = Sim(d.state)
    sim.run(ev.TransferDone(replica="B", ok=True, now=502.0))  # B ends: the jump-ahead does not wait for P
    s = sim.state
    assert s.phase == "idle" and s.replicas["P"].state == "reseeding"
    assert s.replicas["B"].source_point == target and s.replicas["P"].exported == IND
    assert target in s.source_pcpis  # held for the running re-seed
    assert of(sim.effects, fx.Export) == [fx.Export(mapping={"P": IND, "B": s.base().name}, jump=True)]
    d = decide(s, ev.TransferDone(replica="P", ok=True, now=900.0))
    p_ = d.state.replicas["P"]
    assert (p_.state, p_.active_point, p_.exported, p_.last_success) == ("reseeded", target, IND, 900.0)
    assert d.effects == () and d.state.phase == "idle"
    sim = Sim(d.state, now=1000.0).run(ev.StartCycle(now=1000.0))
    p_ = sim.state.replicas["P"]
    assert (p_.state, p_.source_point, p_.exported) == ("stable", target, sim.state.base().name)
    assert IND not in sim.state.pcpis  # its pinned last good image was released
    assert sim.state.lag(p_, 1000.0) == 499.0  # the age of the re-seed's source PCPI


def test_a_failed_reseed_is_retried_with_backoff():
    st, (e,) = _scn_reseed_failed()
    d = decide(st, e)
    p_ = d.state.replicas["P"]
    assert (p_.state, p_.retries, p_.next_retry, p_.target, p_.active_point) == (
        "reseed_pending",
        1,
        70.0 + RETRY.initial,
        None,
        None,
    )
    assert (p_.last_error, p_.consecutive_failures, p_.exported) == ("re-seed failed: x", 1, IND)
    d2 = decide(d.state, ev.StartCycle(now=70.0 + RETRY.initial - 1))
    d2 = decide(d2.state, ev.SourcePcpiTaken(name=d2.effects[0].name))
    assert d2.state.replicas["P"].state == "reseed_pending"  # not yet due
    assert not [x for x in d2.effects if isinstance(x, fx.Transfer) and x.replica == "P"]
    d3 = decide(d.state, ev.StartCycle(now=70.0 + RETRY.initial))
    d3 = decide(d3.state, ev.SourcePcpiTaken(name=d3.effects[0].name))
    assert d3.state.replicas["P"].state == "reseeding"


def test_reseed_request_pins_the_exported_base_until_it_rejoins_I2():
    d = decide(rest("A", "B"), ev.Reseed(replica="A", reason="operator"))
    a = d.state.replicas["A"]
    assert (a.state, a.exported, a.last_good, a.active_point, a.reseed_reason) == (
        "reseed_pending",
        BASE,
        BASE,
        None,
        "operator",
    )
    assert d.effects == () and edges(d) == {("A", "request_reseed", "stable", "reseed_pending")}
    check_i1(d.state)
    sim = UpdatesFail(d.state, broken=set())
    sim.fail_transfer = {"A"}  # the re-seed fails too: A keeps exporting BASE, now its individual PCPI
    sim.run(ev.StartCycle(now=1.0))
    s = sim.state
    assert s.replicas["A"].state == "reseed_pending" and s.replicas["A"].exported == BASE
    assert s.pcpis[BASE].role == "individual" and s.pcpis[BASE].owners == {"A"}
    assert i2_bounded_extras(s).ok and i4_one_coalesced_point(s).ok


@pytest.mark.parametrize("state", ["reseed_pending", "reseeding", "reseeded"])
def test_reseed_of_a_replica_already_being_reseeded_changes_nothing(state):
    st = group(rep("A", state), rep("B"))
    d = decide(st, ev.Reseed(replica="A", reason="again"))
    assert d.state == st and d.effects == () and d.log == ()


@pytest.mark.parametrize(
    "state,text",
    [("uninitialized", "has no image yet"), ("broken", "is broken"), ("unstable_uncoalesced", "is in state")],
)
def test_reseed_is_refused_with_a_clear_error(state, text):
    kw = {"scratch": SCR} if state == "unstable_uncoalesced" else {}
    st = group(rep("A", state, **kw), rep("B"))
    with pytest.raises(NotNow, match=text) as ei:
        decide(st, ev.Reseed(replica="A", reason="x"))
    assert ei.value.hint and ei.value.exit_code == 6
    with pytest.raises(NotNow, match="no replica 'Z'"):
        decide(st, ev.Reseed(replica="Z", reason="x"))
    with pytest.raises(NotNow, match="phase 'updating'"):
        decide(attrs.evolve(rest("A"), phase="updating"), ev.Reseed(replica="A", reason="x"))


def test_recover_an_interrupted_reseed_waits_for_the_next_cycle_I6():
    st = group(rep("P", "reseeding", consecutive_failures=2), rep("A"))
    st = st.with_source_pcpi(SourcePcpi(S2, 2, taken=True))
    d = recover(st, dest={BASE, IND})
    p_ = d.state.replicas["P"]
    assert edges(d) == {("P", "reseed_failed", "reseeding", "reseed_pending")}
    assert (p_.state, p_.target, p_.next_retry, p_.exported, p_.consecutive_failures) == (
        "reseed_pending",
        None,
        0.0,
        IND,
        2,
    )  # a restart is not the replica's failure
    assert p_.last_error == "re-seed interrupted by a restart"
    assert d.effects[0] == fx.Export(mapping={"P": IND, "A": BASE})


def test_source_pcpi_time_is_recorded_and_gives_the_lag():
    d = decide(rest("A"), ev.StartCycle(now=100.0))
    (take,) = d.effects
    d = decide(d.state, ev.SourcePcpiTaken(name=take.name, now=101.5))
    assert d.state.source_pcpis[take.name].taken_at == 101.5
    sim = Sim(d.state)
    sim.run(ev.TransferDone(replica="A", ok=True, now=102.0))
    a = sim.state.replicas["A"]
    assert a.source_point == take.name and sim.state.source_point_time(a) == 101.5
    assert sim.state.lag(a, 161.5) == 60.0 and sim.state.lag(a, 0.0) == 0.0
    assert sim.state.lag(rep("U", "uninitialized"), 10.0) is None


# ---------------------------------------------------------------------------
# refused PCPIs and source outages (docs/decisions.md): nothing wedges
# ---------------------------------------------------------------------------
def test_a_source_outage_ends_the_cycle_before_any_transfer_every_replica_unchanged_I3():
    st = group(rep("A"), rep("B"), rep("U", "uninitialized"), rep("X", "unstable_uncoalesced"), reseed_after=2)
    sim = Sim(st, refuse={"source"}).run(ev.StartCycle(now=5.0))
    s = sim.state
    triggers = [t.trigger for d in sim.decisions for t in d.log if t.replica is None]
    assert triggers == ["start_cycle", "source_unavailable", "finish_cycle"] and s.cycle == 2 and s.phase == "idle"
    assert not of(sim.effects, fx.Transfer) and not of(sim.effects, fx.ReleaseSourcePcpi)
    assert s.source_pcpis.keys() == st.source_pcpis.keys()  # the refused one is forgotten
    for name in ("A", "B", "U"):
        r, before = s.replicas[name], st.replicas[name]
        assert attrs.evolve(r, last_error="", consecutive_failures=0, outages=0) == before
        assert (r.consecutive_failures, r.outages) == (1, 1) and r.last_error == "source unavailable: source down"
    assert s.replicas["X"] == st.replicas["X"]  # outside the cycle, nothing to miss
    assert s.cycle_failures == 3


def test_outages_do_not_count_towards_reseed_after():
    """Two missed cycles and one failed update, reseed_after 2: not re-seeded; a second failed
    update (the cycles missed in between still do not count) is."""
    a = rep("A", "rollback", consecutive_failures=3, outages=2)
    st = attrs.evolve(_rolling_back(a, rep("B", "rollback")), reseed_after=2)
    d = decide(st, ev.RollbackDone(replica="A", ok=True))
    assert d.state.replicas["A"].state == "done"
    a = rep("A", "rollback", consecutive_failures=4, outages=2)
    d = decide(
        attrs.evolve(_rolling_back(a, rep("B", "rollback")), reseed_after=2), ev.RollbackDone(replica="A", ok=True)
    )
    r = d.state.replicas["A"]
    assert r.state == "reseed_pending" and r.reseed_reason.startswith("2 updates failed in a row")


def test_a_refused_rollback_pcpi_fails_every_rollback_that_needed_it_and_the_rest_jump_ahead_I1():
    st = updating(rep("A", "update"), rep("B", "update"), rep("C", "update"))
    sim = Sim(st, fail_transfer="AB", refuse={"rollback"})
    for n in "ABC":
        sim.feed(ev.TransferDone(replica=n, ok=n == "C", error="x"))
    (take,) = of(sim.effects, fx.TakePcpi)
    sim.run(sim.answer(take))
    s = sim.state
    assert s.phase == "idle" and not of(sim.effects, fx.Rollback)
    for n in "AB":
        r = s.replicas[n]
        assert (r.state, r.exported, r.last_good) == ("unstable_uncoalesced", BASE, BASE)
        assert r.last_error == "rollback failed: the destination refused the rollback PCPI: PCPI limit"
    c = s.replicas["C"]
    assert c.state == "stable" and c.exported != BASE and s.pcpis[c.exported].role == "base"
    assert s.pcpis[BASE].role == "individual" and s.pcpis[BASE].owners == {"A", "B"}
    assert i4_one_coalesced_point(s).ok and i2_bounded_extras(s).ok


@pytest.mark.parametrize("role", ["jump_ahead", "new_base"])
def test_a_refused_jump_ahead_pcpi_sends_the_replicas_in_done_out_of_the_cycle_I1_I4(role):
    st = updating(rep("A", "update"), rep("U", "baseline"), rep("SU", "stable_uncoalesced"), rep("K", "broken"))
    sim = Sim(st, refuse={role})
    for n in ("A", "U"):
        sim.run(ev.TransferDone(replica=n, ok=True, now=7.0))
    s = sim.state
    assert s.phase == "idle" and "abandon_jump_ahead" in {t.trigger for d in sim.decisions for t in d.log}
    a, u = s.replicas["A"], s.replicas["U"]
    assert (a.state, a.exported, a.last_good, a.active_point) == ("done_uncoalesced", BASE, BASE, S2)
    assert (u.state, u.exported, u.last_good) == ("done_uncoalesced", None, None)
    assert a.last_error.startswith(f"jump-ahead failed: the destination refused the {role.replace('_', '-')} PCPI")
    assert s.replicas["SU"] == st.replicas["SU"] and s.replicas["K"] == st.replicas["K"]
    assert cycle_pcpis(s) == [BASE] and not of(sim.effects, fx.Export)
    assert i2_bounded_extras(s).ok and i4_one_coalesced_point(s).ok
    # the next cycle: they rejoin at its jump-ahead with the images they hold
    sim = Sim(s).run(ev.StartCycle(now=9.0))
    s2 = sim.state
    assert {r.state for n, r in s2.replicas.items() if n in ("A", "U", "SU")} == {"stable"}
    assert s2.replicas["A"].source_point == S2 and s2.replicas["U"].source_point == S2
    assert not [t for t in of(sim.effects, fx.Transfer) if t.replica in ("A", "U")]


def test_a_refused_retry_or_resync_pcpi_backs_off_and_exports_the_last_good_image_I2():
    st = group(rep("A", "unstable_uncoalesced", next_retry=10.0), rep("K", "broken"), rep("B"))
    d = decide(st, ev.Tick(now=20.0))
    (take,) = d.effects
    d = decide(d.state, ev.PcpiRefused(name=take.name, now=20.0, error="PCPI limit"))
    a = d.state.replicas["A"]
    assert (a.state, a.scratch, a.retries, a.exported) == ("unstable_uncoalesced", None, 1, IND)
    assert a.next_retry == 20.0 + RETRY.delay(1) and "PCPI limit" in a.last_error
    assert take.name not in d.state.pcpis and d.effects == ()
    d = decide(d.state, ev.Resync(replica="K"))
    fence, take = d.effects  # the fence exported K's last good image before the take
    assert fence == fx.Export(mapping={"A": IND, "K": BASE, "B": BASE})
    d = decide(d.state, ev.PcpiRefused(name=take.name, now=21.0, error="PCPI limit"))
    k = d.state.replicas["K"]
    assert (k.state, k.scratch, k.exported) == ("unstable_uncoalesced", None, BASE)
    assert d.effects == ()  # it exports that image already


def test_pcpi_shortfall_refuses_a_cycle_without_room_for_its_pcpis_I1():
    assert planner.pcpi_shortfall(None, None) == "" and planner.pcpi_shortfall(3, 1) == ""
    assert "can take 2 more PCPIs, a cycle needs 3" in planner.pcpi_shortfall(2, None)
    assert "the source can take no more PCPIs" in planner.pcpi_shortfall(None, 0)
    # the source named, and by how many PCPIs it is short (docs/config.md, "Sources")
    assert (
        planner.pcpi_shortfall(None, 0, "lab")
        == "the source 'lab' can take no more PCPIs, a cycle needs 1 of it (1 short)"
    )
    assert "the source 'lab' can take no more PCPIs, a cycle needs 1 of it (3 short: it holds 2 past its limit)" == (
        planner.pcpi_shortfall(None, -2, "lab")
    )
    assert planner.pcpi_shortfall(None, 1, "lab") == ""
    st = group(rep("A"), rep("P", "reseed_pending", next_retry=50.0), rep("Q", "reseed_pending"))
    d = decide(st, ev.StartCycle(now=10.0, destination_room=2, source_room=5))
    assert d.state.phase == "idle" and d.state.cycle == st.cycle and d.effects == () and d.log == ()
    assert d.state.replicas["A"].last_error.startswith("cycle not started: the destination can take 2 more")
    assert d.state.replicas["Q"].outages == 1 and d.state.replicas["P"] == st.replicas["P"]  # not due yet
    assert decide(st, ev.StartCycle(now=10.0, destination_room=3, source_room=1)).state.phase == "updating"
    d = decide(st, ev.StartCycle(now=10.0, source_room=0, least_room_source="default"))
    assert d.state.phase == "idle" and "cycle not started: the source 'default' can take no more PCPIs" in (
        d.state.replicas["A"].last_error
    )
    with pytest.raises(IllegalTransition, match="start_cycle"):  # a cycle under way is not "refused"
        decide(attrs.evolve(st, phase="updating"), ev.StartCycle(now=10.0, destination_room=0))


def test_recovery_without_the_source_keeps_its_records_and_asks_for_the_cycles_pcpi_again_I6():
    st = updating(rep("A"), rep("B"), transfers_started=False).with_source_pcpi(SourcePcpi(S2, 2, taken=False))
    st = st.with_source_pcpi(SourcePcpi(S0, 0, taken=True, releasing=True))
    d = decide(st, ev.Recover(now=3.0, destination_pcpis=frozenset({BASE}), source_pcpis=None))
    assert d.state.source_pcpis == st.source_pcpis
    assert fx.TakeSourcePcpi(name=S2) in d.effects and fx.ReleaseSourcePcpi(name=S0) in d.effects
    # the source is still down: the take is refused and the cycle ends, every replica unchanged
    sim = Sim(d.state, refuse={"source"})
    for e in d.effects:
        sim.run(sim.answer(e) if not isinstance(e, fx.ReleaseSourcePcpi) else ev.SourcePcpiNotReleased(name=e.name))
    s = sim.state
    assert s.phase == "idle" and S2 not in s.source_pcpis
    assert s.source_pcpis[S0].taken and not s.source_pcpis[S0].releasing  # a later cycle releases it
    assert {r.state for r in s.replicas.values()} == {"stable"}


def test_an_unreleased_source_pcpi_does_not_hold_the_cycle_and_goes_at_the_next_one():
    st = group(rep("A"), phase="releasing").with_source_pcpi(SourcePcpi(S0, 0, taken=True, releasing=True))
    d = decide(st, ev.SourcePcpiNotReleased(name=S0, error="link down"))
    assert d.state.phase == "idle" and not d.state.source_pcpis[S0].releasing
    sim = Sim(d.state).run(ev.StartCycle(now=4.0))
    assert fx.ReleaseSourcePcpi(name=S0) in sim.effects and S0 not in sim.state.source_pcpis


# ---------------------------------------------------------------------------
# coalesce remove (docs/decisions.md, "Removing a replica")
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("state", REMOVABLE)
def test_remove_ends_the_export_then_releases_what_only_it_pinned_I2_I6(state):
    """Between cycles: the export table without the replica comes first (I6: nothing a reader sees is
    released before its export ends), then the PCPIs nobody else needs are released; the coalesced
    base stays, and its qtree is never touched (no RemoveQtree).  The source is never asked (it may be
    out of reach): the source PCPIs only it needed go at the next cycle's release step."""
    st, (e,) = _scn_remove(state)()
    x = st.replicas["X"]
    d = decide(st, e)
    assert "X" not in d.state.replicas and edges(d) == {("X", "remove", state, "removed")}
    assert d.effects[0] == fx.Export(mapping={"A": BASE})
    released = {f.name for f in d.effects if isinstance(f, fx.ReleasePcpi)}
    assert released == {p for p in x.pinned() if p != BASE}
    assert all(d.state.pcpis[p].releasing for p in released)
    assert BASE in d.state.pcpis and not d.state.pcpis[BASE].releasing
    assert not of(d.effects, fx.ReleaseSourcePcpi) and not of(d.effects, fx.TakeSourcePcpi)
    assert not any(isinstance(f, fx.RemoveQtree) for f in d.effects)
    for n in released:
        d = decide(d.state, ev.PcpiReleased(name=n))
    check_i1(d.state)
    assert i2_bounded_extras(d.state).ok
    only_x = {p for p in (x.source_point, x.active_point, x.target) if p} - {S1}
    assert only_x <= d.state.source_pcpis.keys()
    sim = Sim(d.state).run(ev.StartCycle(now=9.0))
    assert only_x <= {f.name for f in of(sim.effects, fx.ReleaseSourcePcpi)}
    assert not only_x & sim.state.source_pcpis.keys() and sim.state.phase == "idle"


def test_remove_keeps_a_pcpi_another_replica_still_pins_I6():
    """Two replicas pin one individual PCPI: removing one leaves it, with the other as its only owner."""
    st = group(rep("X", "stable_uncoalesced"), rep("Y", "stable_uncoalesced"), rep("A"))
    assert st.pcpis[IND].owners == {"X", "Y"}
    d = decide(st, ev.RemoveReplica(replica="X"))
    assert not any(isinstance(f, fx.ReleasePcpi) for f in d.effects)
    assert d.state.pcpis[IND].owners == {"Y"} and not d.state.pcpis[IND].releasing
    assert d.effects == (fx.Export(mapping={"Y": IND, "A": BASE}),)


def test_remove_is_refused_mid_cycle_during_a_retry_and_for_an_unknown_replica():
    st = updating(rep("A", "update"), rep("B", "update"))
    with pytest.raises(NotNow, match="phase 'updating'"):
        decide(st, ev.RemoveReplica(replica="A"))
    retrying = group(rep("X", "unstable_uncoalesced", scratch=SCR), rep("A"), pcpis=(pcpi(BASE, "base"),))
    with pytest.raises(NotNow, match="rollback retry of it is running"):
        decide(retrying, ev.RemoveReplica(replica="X"))
    with pytest.raises(NotNow, match="has no replica 'nosuch'"):
        decide(group(rep("A")), ev.RemoveReplica(replica="nosuch"))


def test_a_removed_name_can_be_added_again_as_a_new_replica():
    st, (e,) = _scn_remove("stable")()
    d = decide(st, e)
    d = decide(d.state, ev.AddReplica(name="X", source_qtree="other"))
    x = d.state.replicas["X"]
    assert (x.state, x.source_qtree, x.exported, x.last_good) == ("uninitialized", "other", None, None)


def test_break_is_taken_in_a_cycle_whose_source_pcpi_is_not_taken_yet():
    """The cycle began (phase updating) but its source PCPI is not taken yet, so no transfer started and
    every replica is in its between-cycles state; a failover is taken there, and the transfers that
    start once the source PCPI is taken leave the broken replica out.  Once a transfer started, break
    waits for the end of the cycle."""
    st = updating(rep("A"), rep("B"), transfers_started=False)
    st = attrs.evolve(st, source_pcpis={**st.source_pcpis, S2: SourcePcpi(name=S2, cycle=2, taken=False)})
    d = decide(st, ev.BreakMirror(replica="A"))
    assert edges(d) == {("A", "break_mirror", "stable", "broken")}
    d = decide(d.state, ev.SourcePcpiTaken(name=S2))
    assert d.effects == (fx.Transfer(replica="B", source_qtree="B", base=S1, target=S2),)
    started = attrs.evolve(st, transfers_started=True)
    with pytest.raises(NotNow, match="phase 'updating'"):
        decide(started, ev.BreakMirror(replica="A"))


# ---------------------------------------------------------------------------
# a resync keeps the broken replica's writes in a kept PCPI until `coalesce release` (I11)
# ---------------------------------------------------------------------------
KEPT = "co-g-000009-kept-K"


def _keeping(**kw) -> GroupState:
    """K resynced (stable_uncoalesced again) with its writes kept in KEPT; B stable."""
    k = rep("K", "stable_uncoalesced", exported=BASE, last_good=BASE, source_point=S1, active_point=S1)
    return group(k, rep("B"), pcpis=(pcpi(BASE, "base"), pcpi(KEPT, "kept", owners=frozenset({"K"}), taken_at=5.0)))


def test_kept_names_are_the_groups_pcpis():
    assert is_group_pcpi("g", KEPT) and is_group_pcpi("g", "co-g-000009-kept-A.b_c-1")
    assert not is_group_pcpi("g-x", KEPT) and not is_group_pcpi("g", "co-g-x-000009-kept-K")
    long = kept_name("g" * 64, 12, "r" * 64)
    assert len(long) == KEPT_NAME_MAX and long.startswith("co-" + "g" * 64 + "-000012-kept-r")
    assert is_group_pcpi("g" * 64, long)


def test_a_second_resync_keeping_writes_is_refused_until_release_or_discard_I11():
    st = _keeping()
    st = decide(st, ev.BreakMirror(replica="K")).state
    with pytest.raises(NotNow, match="already keeps those of an earlier break in PCPI co-g-000009-kept-K") as ei:
        decide(st, ev.Resync(replica="K"))
    assert "coalesce release K" in ei.value.hint and "coalesce resync K --discard" in ei.value.hint
    d = decide(st, ev.Resync(replica="K", discard=True))  # without keeping: an individual scratch
    assert of(d.effects, fx.TakePcpi)[0].role == "individual" and i11_kept_writes(d.state).ok
    d = decide(st, ev.ReleaseKept(replica="K"))
    assert d.effects == (fx.ReleasePcpi(name=KEPT),) and d.state.pcpis[KEPT].releasing
    st = decide(d.state, ev.PcpiReleased(name=KEPT)).state
    (take,) = of(decide(st, ev.Resync(replica="K")).effects, fx.TakePcpi)
    assert take.role == "kept" and take.name.endswith("-kept-K")


def test_a_resync_keeping_writes_needs_room_for_the_kept_pcpi_and_a_cycle():
    st = group(rep("K", "broken"), rep("B"))
    with pytest.raises(NotNow, match="can take 3 more PCPIs, the kept PCPI and a cycle need 4") as ei:
        decide(st, ev.Resync(replica="K", destination_room=3))
    assert "--discard" in ei.value.hint
    assert decide(st, ev.Resync(replica="K", destination_room=4)).state.replicas["K"].keep
    assert decide(st, ev.Resync(replica="K", discard=True, destination_room=0)).state.replicas["K"].state == (
        "unstable_uncoalesced"
    )


def test_release_kept_refusals():
    with pytest.raises(NotNow, match="keeps no writes of replica 'B'"):
        decide(_keeping(), ev.ReleaseKept(replica="B"))
    st = group(rep("K", "broken"), rep("B"))
    st = decide(st, ev.Resync(replica="K")).state
    with pytest.raises(NotNow, match="is rolling back from it"):
        decide(st, ev.ReleaseKept(replica="K"))


def test_the_release_step_and_a_removal_keep_the_kept_pcpi_I11():
    """A cycle's release step never releases a kept PCPI, and `remove` leaves it (with its owner's
    name) until `coalesce release` of that name."""
    sim = Sim(_keeping())
    sim.run(ev.StartCycle(now=1.0))
    assert KEPT in sim.state.pcpis and not sim.state.pcpis[KEPT].releasing
    assert fx.ReleasePcpi(name=KEPT) not in sim.effects
    d = decide(sim.state, ev.RemoveReplica(replica="K"))
    assert d.state.kept_pcpi("K") is not None and fx.ReleasePcpi(name=KEPT) not in d.effects
    assert i11_kept_writes(d.state).ok
    d = decide(d.state, ev.ReleaseKept(replica="K"))
    assert d.effects == (fx.ReleasePcpi(name=KEPT),)


def test_a_refused_kept_pcpi_is_taken_by_the_next_attempt():
    st = group(rep("K", "broken"), rep("B"))
    d = decide(st, ev.Resync(replica="K"))
    (take,) = of(d.effects, fx.TakePcpi)
    d = decide(d.state, ev.PcpiRefused(name=take.name, now=1.0, error="limit"))
    k = d.state.replicas["K"]
    assert (k.state, k.keep, k.scratch, k.exported) == ("unstable_uncoalesced", True, None, BASE)
    assert d.state.kept_pcpi("K") is None
    d = decide(d.state, ev.Tick(now=10_000.0))
    (take,) = of(d.effects, fx.TakePcpi)
    assert take.role == "kept"


@pytest.mark.parametrize("held", [True, False])
def test_recover_a_kept_pcpi_taken_or_not_I6_I11(held):
    """A crash between the take of the kept PCPI and its record (crash point after_kept_pcpi): the one
    the volume holds was taken after the fence and is kept; one it lacks is taken by the next attempt."""
    st = group(rep("K", "broken"), rep("B"))
    d = decide(st, ev.Resync(replica="K"))
    (take,) = of(d.effects, fx.TakePcpi)
    d = recover(d.state, dest={BASE, take.name} if held else {BASE})
    k = d.state.replicas["K"]
    assert (k.scratch, k.exported, k.keep) == (None, BASE, not held)
    assert fx.ReleasePcpi(name=take.name) not in d.effects
    assert (d.state.kept_pcpi("K") is not None) == held
    assert i11_kept_writes(d.state, {BASE, take.name} if held else {BASE}).ok


def test_i11_finds_two_kept_pcpis_of_one_replica_and_a_lost_one():
    st = _keeping().with_pcpi(pcpi("co-g-000010-kept-K", "kept", owners=frozenset({"K"})))
    assert not i11_kept_writes(st).ok and "keeps 2 PCPIs" in i11_kept_writes(st).detail
    f = i11_kept_writes(_keeping(), held={BASE})
    assert not f.ok and "is not on the volume" in f.detail


# ---------------------------------------------------------------------------
# fan-in: one source PCPI per source (docs/config.md, "Sources")
# ---------------------------------------------------------------------------
LAB_S1, OFFICE_S1 = "co-g-src-000001", "co-g-src-000002"


def two_sources(*extra: Replica) -> GroupState:
    """At rest after cycle 1: A and C of the source "lab", B of "office", all exporting BASE."""
    a = rep("A", origin="lab", source_point=LAB_S1, active_point=LAB_S1)
    b = rep("B", origin="office", source_point=OFFICE_S1, active_point=OFFICE_S1)
    c = rep("C", origin="lab", source_point=LAB_S1, active_point=LAB_S1)
    sps = (
        SourcePcpi(name=LAB_S1, cycle=1, taken=True, source="lab"),
        SourcePcpi(name=OFFICE_S1, cycle=1, taken=True, source="office"),
    )
    return group(a, b, c, *extra, source_pcpis=sps)


def test_a_cycle_takes_one_pcpi_of_each_source_that_has_replicas_in_it():
    """Not of a source whose only replica is broken; each record and effect names its source."""
    st = two_sources(rep("K", "broken", origin="spare"))
    d = decide(st, ev.StartCycle(now=5.0))
    takes = of(d.effects, fx.TakeSourcePcpi)
    assert [t.source for t in takes] == ["lab", "office"] and len({t.name for t in takes}) == 2
    assert d.state.cycle_targets == {t.source: t.name for t in takes}
    assert {t.name: d.state.source_pcpis[t.name].source for t in takes} == {t.name: t.source for t in takes}
    assert d.state.phase == "updating" and not of(d.effects, fx.Transfer)


def test_a_sources_transfers_start_when_its_pcpi_is_taken_and_the_jump_ahead_waits_for_every_source():
    st = two_sources(rep("N", "uninitialized", origin="lab"))
    d = decide(st, ev.StartCycle(now=5.0))
    targets = d.state.cycle_targets
    d = decide(d.state, ev.SourcePcpiTaken(name=targets["lab"], source="lab"))
    transfers = of(d.effects, fx.Transfer)
    assert {(t.replica, t.origin, t.target, t.base) for t in transfers} == {
        ("A", "lab", targets["lab"], LAB_S1),
        ("C", "lab", targets["lab"], LAB_S1),
        ("N", "lab", targets["lab"], None),
    }
    assert d.state.replicas["B"].state == "stable" and d.state.replicas["N"].state == "baseline"
    st, _ = decide_all(d.state, [ev.TransferDone(replica=n, ok=True) for n in ("A", "C", "N")])
    assert st.phase == "updating" and {r.state for r in st.replicas.values()} == {"done", "stable"}
    assert not any(p.role == "jump_ahead" for p in st.pcpis.values())  # office's PCPI is not taken yet
    d = decide(st, ev.SourcePcpiTaken(name=targets["office"], source="office"))
    (t,) = of(d.effects, fx.Transfer)
    assert (t.replica, t.origin, t.target, t.base) == ("B", "office", targets["office"], OFFICE_S1)
    d = decide(d.state, ev.TransferDone(replica="B", ok=True))
    assert d.state.phase == "jump_ahead_1"


def test_a_whole_cycle_of_two_sources_exports_each_replica_at_its_own_sources_pcpi_and_releases_per_source():
    sim = Sim(two_sources()).run(ev.StartCycle(now=5.0))
    st = sim.state
    assert st.phase == "idle" and {r.state for r in st.replicas.values()} == {"stable"}
    taken = {e.source: e.name for e in of(sim.effects, fx.TakeSourcePcpi)}
    assert {n: r.source_point for n, r in st.replicas.items()} == {
        "A": taken["lab"],
        "B": taken["office"],
        "C": taken["lab"],
    }
    assert len({r.exported for r in st.replicas.values()}) == 1  # one coalesced image for both sources
    released = {(e.name, e.source) for e in of(sim.effects, fx.ReleaseSourcePcpi)}
    assert released == {(LAB_S1, "lab"), (OFFICE_S1, "office")}
    assert {n: sp.source for n, sp in st.source_pcpis.items()} == {taken["lab"]: "lab", taken["office"]: "office"}
    assert st.cycle_targets == {}


def test_a_refused_source_pcpi_makes_only_that_sources_replicas_miss_the_cycle():
    """They stay stable with their images and record the failure (an outage); the others complete.
    Stable, they join the jump-ahead: the new coalesced base holds their unchanged images, still of
    the refused source's last PCPI, which is kept."""
    sim = Sim(two_sources(), refuse={"source:office"}).run(ev.StartCycle(now=5.0))
    st = sim.state
    lab = next(e.name for e in of(sim.effects, fx.TakeSourcePcpi) if e.source == "lab")
    a, b = st.replicas["A"], st.replicas["B"]
    assert st.phase == "idle" and "source_unavailable" not in [t.trigger for d in sim.decisions for t in d.log]
    assert (a.state, a.source_point, a.exported != BASE, a.last_error) == ("stable", lab, True, "")
    assert (b.state, b.exported, b.source_point, b.active_point) == ("stable", a.exported, OFFICE_S1, OFFICE_S1)
    assert "source unavailable: source down" in b.last_error and (b.consecutive_failures, b.outages) == (1, 1)
    assert BASE not in st.pcpis and fx.ReleasePcpi(name=BASE) in of(sim.effects, fx.ReleasePcpi)
    assert OFFICE_S1 in st.source_pcpis and st.source_pcpis[OFFICE_S1].source == "office"
    assert {(e.name, e.source) for e in of(sim.effects, fx.ReleaseSourcePcpi)} == {(LAB_S1, "lab")}


def test_every_source_refusing_its_pcpi_ends_the_cycle_before_any_transfer():
    sim = Sim(two_sources(), refuse={"source"}).run(ev.StartCycle(now=5.0))
    triggers = [t.trigger for d in sim.decisions for t in d.log if t.replica is None]
    assert triggers == ["start_cycle", "source_unavailable", "finish_cycle"]
    assert not of(sim.effects, fx.Transfer) and not of(sim.effects, fx.ReleaseSourcePcpi)
    assert all(r.outages == 1 and r.exported == BASE for r in sim.state.replicas.values())


def test_a_cycle_with_no_replica_to_transfer_takes_no_source_pcpi():
    st = group(rep("K", "broken"), rep("U", "unstable_uncoalesced", next_retry=1e9))
    sim = Sim(st).run(ev.StartCycle(now=5.0))
    assert not of(sim.effects, fx.TakeSourcePcpi) and sim.state.phase == "idle"
    assert [t.trigger for d in sim.decisions for t in d.log if t.replica is None] == [
        "start_cycle",
        "start_release",
        "finish_cycle",
    ]


def test_recovery_settles_each_sources_pcpis_with_what_that_source_holds():
    """The source "lab" answers: its PCPI of the cycle, held, is taken and its transfers start; a group
    PCPI only it holds is released there.  The source "office" could not be reached: its records stay
    and its PCPI of the cycle is asked for again."""
    st = decide(two_sources(), ev.StartCycle(now=5.0)).state
    targets = st.cycle_targets
    stray = "co-g-src-000009"
    d = decide(
        st, ev.Recover(now=6.0, destination_pcpis=frozenset({BASE}), source_pcpis={"lab": {targets["lab"], stray}})
    )
    assert d.state.source_pcpis[targets["lab"]].taken and not d.state.source_pcpis[targets["office"]].taken
    assert {(e.name, e.source) for e in of(d.effects, fx.TakeSourcePcpi)} == {(targets["office"], "office")}
    assert {(e.name, e.source) for e in of(d.effects, fx.ReleaseSourcePcpi)} == {(stray, "lab")}
    assert {t.replica for t in of(d.effects, fx.Transfer)} == {"A", "C"}
    assert d.state.replicas["B"].state == "stable" and d.state.phase == "updating"
    assert OFFICE_S1 in d.state.source_pcpis  # not reached: kept for a later recovery


def test_resumed_updates_restart_to_their_own_sources_pcpi():
    lab, office = "co-g-src-000011", "co-g-src-000012"
    a = rep("A", "rollback", origin="lab", target=None, resume=True)
    b = rep("B", "rollback", origin="office", target=None, resume=True)
    st = group(
        a,
        b,
        pcpis=(pcpi(BASE, "base"), pcpi(RB, "rollback")),
        source_pcpis=(
            SourcePcpi(name=S1, cycle=1, taken=True),
            SourcePcpi(name=lab, cycle=2, taken=True, source="lab"),
            SourcePcpi(name=office, cycle=2, taken=True, source="office"),
        ),
        phase="rolling_back",
        cycle=2,
        transfers_started=True,
        cycle_targets={"lab": lab, "office": office},
    )
    st = decide(st, ev.RollbackDone(replica="A", ok=True)).state
    d = decide(st, ev.RollbackDone(replica="B", ok=True))
    assert {(t.replica, t.target, t.origin, t.resume) for t in of(d.effects, fx.Transfer)} == {
        ("A", lab, "lab", True),
        ("B", office, "office", True),
    }
    assert d.state.phase == "updating" and {r.target for r in d.state.replicas.values()} == {lab, office}


# ---------------------------------------------------------------------------
# a source's own interval: only the sources that are due (docs/config.md, "Sources")
# ---------------------------------------------------------------------------
def test_a_source_not_due_keeps_its_replicas_stable_and_their_images_in_the_new_base():
    """Only lab's PCPI is taken; B (of office, not due) attempts no update: stable, no error, no
    outage, its image (still office's last PCPI, kept) in the new coalesced base with the others'."""
    sim = Sim(two_sources()).run(ev.StartCycle(now=5.0, due=frozenset({"lab"})))
    st = sim.state
    assert [e.source for e in of(sim.effects, fx.TakeSourcePcpi)] == ["lab"]
    assert {t.replica for t in of(sim.effects, fx.Transfer)} == {"A", "C"}
    b = st.replicas["B"]
    assert (b.state, b.source_point, b.last_error, b.outages, b.consecutive_failures) == (
        "stable",
        OFFICE_S1,
        "",
        0,
        0,
    )
    assert st.phase == "idle" and len({r.exported for r in st.replicas.values()}) == 1 and b.exported != BASE
    assert OFFICE_S1 in st.source_pcpis and st.source_taken == {"lab": 5.0}
    assert {(e.name, e.source) for e in of(sim.effects, fx.ReleaseSourcePcpi)} == {(LAB_S1, "lab")}


def test_a_cycle_in_which_no_source_is_due_does_not_start_and_takes_nothing():
    st = two_sources()
    for due in (frozenset(), frozenset({"spare"})):
        d = decide(st, ev.StartCycle(now=5.0, due=due, destination_room=0))  # not even a shortfall recorded
        assert d.state == st and not d.effects and not d.log
    assert planner.cycle_sources(st, 5.0, frozenset()) == ([], ["lab", "office"])
    assert planner.cycle_sources(st, 5.0, None) == (["lab", "office"], [])


def test_without_due_every_source_is_due_as_before():
    d = decide(two_sources(), ev.StartCycle(now=5.0))
    assert sorted(d.state.cycle_targets) == ["lab", "office"]


def test_a_source_counts_its_interval_from_the_start_of_the_cycle_that_took_its_pcpi():
    """Taken at 7.0 in a cycle started at 5.0: 5.0 is recorded; a refused PCPI records nothing (the
    source stays due), and neither does a PCPI of the source taken outside the cycle's targets."""
    d = decide(two_sources(), ev.StartCycle(now=5.0))
    targets = d.state.cycle_targets
    st = decide(d.state, ev.SourcePcpiTaken(name=targets["lab"], now=7.0, source="lab")).state
    st = decide(st, ev.SourcePcpiRefused(name=targets["office"], now=7.0, error="down", source="office")).state
    assert st.source_taken == {"lab": 5.0}


def test_a_shortfall_records_an_outage_only_for_the_sources_that_are_due():
    d = decide(two_sources(), ev.StartCycle(now=5.0, due=frozenset({"office"}), destination_room=0))
    assert d.state.phase == "idle" and not d.effects
    assert {n: r.outages for n, r in d.state.replicas.items()} == {"A": 0, "B": 1, "C": 0}


def test_recovery_that_finds_a_sources_pcpi_of_the_cycle_records_it_taken():
    st = decide(two_sources(), ev.StartCycle(now=5.0)).state
    targets = st.cycle_targets
    d = decide(st, ev.Recover(now=6.0, destination_pcpis=frozenset({BASE}), source_pcpis={"lab": {targets["lab"]}}))
    assert d.state.source_taken == {"lab": 5.0}


# ---------------------------------------------------------------------------
# stragglers leave the cycle (docs/decisions.md, "Stragglers leave the cycle")
# ---------------------------------------------------------------------------
class HoldingSim(Sim):
    """A Sim whose transfers of the ``hold`` replicas do not end until :meth:`finish` (a slow one)."""

    def __init__(self, state: GroupState, hold=(), **kw) -> None:
        super().__init__(state, **kw)
        self.hold = set(hold)
        self.held: list[fx.Transfer] = []

    def run(self, event) -> "HoldingSim":
        pending = deque(self.feed(event).effects)
        while pending:
            e = pending.popleft()
            if isinstance(e, fx.Transfer) and e.replica in self.hold:
                self.held.append(e)
                continue
            pending.extend(self.feed(self.answer(e)).effects)
        return self

    def finish(self, replica: str, ok: bool = True, now: float = 400.0) -> "HoldingSim":
        """The held transfer of ``replica`` (one started before the sim's first state too) ends."""
        self.held = [t for t in self.held if t.replica != replica]
        self.hold.discard(replica)
        return self.run(ev.TransferDone(replica=replica, ok=ok, now=now, error="" if ok else "net", records=7))


def _straggler_left(**kw) -> HoldingSim:
    """B's update arrived, A's is still running 60 s after the cycle started at 100: A straggles and
    the cycle goes on to its end without it."""
    st = _straggling(**kw).with_replica(rep("B", "done", active_point=S2))
    return HoldingSim(st, hold={"A"}, now=200.0).run(ev.StragglerDue(replica="A", now=160.0))


def test_a_straggler_pins_its_image_and_the_others_jump_ahead_without_it_I1_I2_I4():
    sim = _straggler_left()
    st = sim.state
    a, b = st.replicas["A"], st.replicas["B"]
    assert sim.decisions[0].log[0] == Transition("A", "straggle", "update", "update_uncoalesced")
    assert "straggler_after" in a.last_error and a.consecutive_failures == 0
    # the others' new image is exported at once, in this cycle
    new_base = st.base()
    assert new_base is not None and new_base.name != BASE
    assert (b.state, b.exported, b.source_point) == ("stable", new_base.name, S2)
    assert of(sim.effects, fx.Export)[-1].mapping == {"A": BASE, "B": new_base.name}
    # the straggler goes on exporting its last good image, now its individual PCPI (I2: one)
    assert (a.state, a.exported, a.last_good, a.source_point, a.target) == (
        "update_uncoalesced",
        BASE,
        BASE,
        S1,
        S2,
    )
    assert st.pcpis[BASE].role == "individual" and st.pcpis[BASE].owners == {"A"}
    assert st.phase == "idle" and sim.max_cycle_pcpis <= 4
    # the source PCPI its transfer reads stays
    assert S2 in st.source_pcpis and S2 not in {e.name for e in of(sim.effects, fx.ReleaseSourcePcpi)}
    assert i2_bounded_extras(st).ok and i4_one_coalesced_point(st).ok
    # the purgatory of the qtree it still writes into is not purged
    assert of(sim.effects, fx.PurgePurgatory) == [fx.PurgePurgatory(qtrees=("B",))]


def test_a_straggler_whose_update_arrives_rejoins_at_the_next_jump_ahead_I1_I2():
    sim = _straggler_left().finish("A", ok=True)
    a = sim.state.replicas["A"]
    assert (a.state, a.active_point, a.exported, a.last_error, a.records) == ("done_uncoalesced", S2, BASE, "", 7)
    assert sim.state.phase == "idle"  # outside the cycle: the agent did not wait for it
    first = sim.state.base()
    assert first is not None
    sim.run(ev.StartCycle(now=500.0))
    a, b = sim.state.replicas["A"], sim.state.replicas["B"]
    new_base = sim.state.base()
    assert new_base is not None and new_base.name != first.name
    # A rejoined with the image of the cycle it straggled in (S2); B moved on to this cycle's point
    assert (a.state, a.exported, a.source_point, a.last_good) == ("stable", new_base.name, S2, None)
    assert b.state == "stable" and b.exported == new_base.name and b.source_point != S2
    assert BASE not in sim.state.pcpis and fx.ReleasePcpi(name=BASE) in sim.effects
    assert not [p for p in sim.state.pcpis.values() if p.role == "individual"]
    assert sim.max_cycle_pcpis <= 4


def test_a_straggler_whose_update_fails_takes_the_rollback_retries_I2():
    sim = _straggler_left().finish("A", ok=False, now=400.0)
    a = sim.state.replicas["A"]
    assert (a.state, a.exported, a.last_good, a.target) == ("unstable_uncoalesced", BASE, BASE, None)
    assert a.last_error == "update failed: net" and a.consecutive_failures == 1 and a.next_retry == 400.0
    # loop 1026: the first retry is due at once; its scratch PCPI is the straggler's second (I2: <= 2)
    d = decide(sim.state, ev.Tick(now=400.0))
    (take,) = of(d.effects, fx.TakePcpi)
    assert take.role == "individual" and d.state.replicas["A"].scratch == take.name
    assert len([p for p in d.state.pcpis.values() if p.role == "individual" and "A" in p.owners]) == 2
    sim = HoldingSim(sim.state, now=410.0).run(ev.Tick(now=400.0))
    (rb,) = of(sim.effects, fx.Rollback)
    assert (rb.replica, rb.to_pcpi, rb.retry) == ("A", BASE, True)
    a = sim.state.replicas["A"]
    assert (a.state, a.exported, a.active_point, a.scratch) == ("stable_uncoalesced", BASE, S1, None)
    sim.run(ev.StartCycle(now=500.0))
    assert sim.state.replicas["A"].state == "stable" and BASE not in sim.state.pcpis


@pytest.mark.parametrize(
    ("why", "st", "now"),
    [
        ("not due yet", _straggling(), 159.9),
        ("no straggler_after: the cycle waits", _straggling(straggler_after=None), 10_000.0),
        ("not in update", _straggling().with_replica(rep("A", "done", active_point=S2)), 160.0),
        ("another phase", attrs.evolve(_straggling(), phase="rolling_back"), 160.0),
        ("no such replica", _straggling(), 160.0),
    ],
)
def test_a_straggler_event_changes_nothing_unless_due(why, st, now):
    replica = "Z" if why == "no such replica" else "A"
    d = decide(st, ev.StragglerDue(replica=replica, now=now))
    assert (d.state, d.effects, d.log) == (st, (), ()), why


def test_without_straggler_after_the_cycle_waits_for_the_slowest_update():
    st = _straggling(straggler_after=None).with_replica(rep("B", "done", active_point=S2))
    sim = HoldingSim(st, hold={"A"}).run(ev.StragglerDue(replica="A", now=10_000.0))
    assert sim.state.phase == "updating" and sim.state.replicas["A"].state == "update" and not sim.effects
    sim.finish("A")
    assert sim.state.phase == "idle" and {r.state for r in sim.state.replicas.values()} == {"stable"}


def test_every_straggler_leaves_and_a_failed_update_rolls_back_beside_them_I1():
    """Two stragglers and a failed update in one cycle: the rollback PCPI, the intermediate and the new
    base are taken beside the base, never more than 4 cycle PCPIs (I1); the stragglers' bases pin one
    individual PCPI."""
    st = updating(
        rep("A", "update"),
        rep("B", "update"),
        rep("C", "update"),
        rep("D", "update"),
        cycle_started=100.0,
        straggler_after=60.0,
    )
    sim = HoldingSim(st, hold={"A", "B"}, fail_transfer={"C"}, now=150.0)
    sim.run(ev.TransferDone(replica="C", ok=False, now=150.0, error="net"))
    sim.run(ev.TransferDone(replica="D", ok=True, now=150.0))
    assert sim.state.phase == "updating"
    for name in ("A", "B"):
        sim.run(ev.StragglerDue(replica=name, now=161.0))
    assert sim.phases == ["updating", "rolling_back", "jump_ahead_1", "jump_ahead_2", "releasing", "idle"]
    assert sim.state.phase == "idle" and sim.max_cycle_pcpis == 4
    assert {n: r.state for n, r in sim.state.replicas.items()} == {
        "A": "update_uncoalesced",
        "B": "update_uncoalesced",
        "C": "stable",
        "D": "stable",
    }
    assert sim.state.pcpis[BASE].owners == {"A", "B"} and sim.state.pcpis[BASE].role == "individual"
    sim.finish("A").finish("B", ok=False)
    assert (sim.state.replicas["A"].state, sim.state.replicas["B"].state) == (
        "done_uncoalesced",
        "unstable_uncoalesced",
    )


def test_recover_a_straggler_from_the_ledger_I6():
    """A crash while a straggler's transfer runs, after the others jumped ahead: recovery knows only the
    ledger, so the straggler's active FS is partial; it exports its last good image and takes the rollback
    retries of loop 1026, like any replica outside the cycle."""
    st = _straggler_left().state
    new_base = st.base()
    assert new_base is not None
    d = decide(st, ev.Recover(now=900.0, destination_pcpis=frozenset({BASE, new_base.name}), source_pcpis={S1, S2}))
    a = d.state.replicas["A"]
    assert (d.log[0].trigger, a.state) == ("straggler_failed", "unstable_uncoalesced")
    assert (a.exported, a.last_good, a.target, a.next_retry) == (BASE, BASE, None, 900.0)
    assert "restart" in a.last_error and a.consecutive_failures == 0  # a restart is not the replica's failure
    assert d.effects[0] == fx.Export(mapping={"A": BASE, "B": new_base.name})
    assert not of(d.effects, fx.ReleasePcpi) and d.state.phase == "idle"
    check_i1(d.state)
    tick = decide(d.state, ev.Tick(now=900.0))
    assert [t.role for t in of(tick.effects, fx.TakePcpi)] == ["individual"]


def test_recover_a_straggler_in_the_middle_of_the_jump_ahead_I1_I6():
    """A crash after the intermediate PCPI was taken, the straggler out of the cycle: the jump-ahead is
    rolled forward for the others; the straggler is not a participant and keeps its image."""
    sim = _straggler_left()
    mid = next(d.state for d in sim.decisions if d.state.phase == "jump_ahead_1" and d.state.pcpi_of_role("jump_ahead"))
    ja = mid.pcpi_of_role("jump_ahead")
    assert ja is not None
    mid = mid.with_pcpi(attrs.evolve(ja, taken=True))
    sim = HoldingSim(mid, now=900.0)
    sim.run(ev.Recover(now=900.0, destination_pcpis=frozenset({BASE, ja.name}), source_pcpis={S1, S2}))
    a, b = sim.state.replicas["A"], sim.state.replicas["B"]
    assert (a.state, a.exported) == ("unstable_uncoalesced", BASE)
    assert b.state == "stable" and b.exported == sim.state.base().name != BASE
    assert of(sim.effects, fx.PurgePurgatory) == [fx.PurgePurgatory(qtrees=("B",))]
    assert sim.state.phase == "idle" and sim.max_cycle_pcpis <= 4


def test_a_running_straggler_cannot_be_removed_or_reseeded():
    st = group(rep("L", "update_uncoalesced"), rep("A"))
    for event in (ev.RemoveReplica(replica="L"), ev.Reseed(replica="L", reason="x")):
        with pytest.raises(NotNow, match="straggler") as info:
            decide(st, event)
        assert info.value.hint
