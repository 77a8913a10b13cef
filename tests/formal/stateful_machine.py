"""The hypothesis state machine of the cycle (I1-I11 after every step).

It drives the REAL agent (coalesce_core.testing.harness.Harness) on a real
backend, a group of two sources (fan-in: ``a`` holds qtrees A, C, E, ``b`` B and D):
source writes, cycles, transfers cut at a random record, failing
rollbacks, updates that keep failing (a stream the destination can never
apply: the replica is re-seeded after ``reseed_after`` of them), the reseed
verb, crashes at any named crash point (n-th pass) followed by a restart
from the ledger, new replicas (baseline) and removed ones, break and resync, the same verbs handed to
the running agent as requests, the retry timer,
a source outage (one source or both cannot be opened or reached for as many
steps as hypothesis likes, then come back), a source that refuses its PCPI of a
cycle, a straggler (an update held past ``straggler_after``: it leaves the cycle
and rejoins later), a PCPI the destination refuses, and
hostile change records fed to the applier; on sim also power cuts of the
destination, the source or both at any crash point (writes not yet flushed
are lost, some torn) followed by a restart.  After every step it checks
the invariants against the volumes and against the SourceWriter's own record
of every source PCPI (never the agent's beliefs alone); I6 after every
restart; I7 in a final "faults stop" phase (``teardown``).

Used by tests/formal/test_stateful.py, tools/mutants.py and tools/check.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coalesce_core import crashpoints, requests
from coalesce_core.agent import Agent
from coalesce_core.backend.faults import FaultInjector, Rule, source_outage
from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.config import ReplicaConfig, parse_config
from coalesce_core.crashpoints import CRASH_POINTS
from coalesce_core.cycle import events as ev
from coalesce_core.cycle.generations import as_retained
from coalesce_core.cycle.invariants import seq_of
from coalesce_core.cycle.planner import NotNow
from coalesce_core.cycle.spec import load_spec
from coalesce_core.cycle.state import CYCLE_ROLES, GENERATION
from coalesce_core.errors import CoalesceError, GroupLocked, HostilePath
from coalesce_core.ledger import Ledger
from coalesce_core.retention import Policy, limit
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill

SPEC = load_spec()
IN_FLIGHT = SPEC.in_flight_states
OUTSIDE = frozenset(SPEC.states_in_field("outside")) - {"uninitialized", "baseline"}
INITIAL = ("A", "B", "C")
EXTRA = ("D", "E")
QTREES = INITIAL + EXTRA
#: the group's two sources, each feeding a subset of the replicas (fan-in; docs/config.md, "Sources")
SOURCES = ("a", "b")
ORIGIN = {"A": "a", "B": "b", "C": "a", "D": "b", "E": "a"}
#: [group] straggler_after of the machine's group, in seconds of its fake clock, which stands still during a
#: step: only SlowUpdate (the straggler rule) moves it past this while an update runs
STRAGGLER_AFTER = 0.05
#: I7: once faults stop, every replica is stable at the newest source point within this many cycles
SETTLE_CYCLES = 4
#: [group] reseed_after of the machine's group
RESEED_AFTER = 2
RESEEDING = ("reseed_pending", "reseeding", "reseeded")
_ids = itertools.count()

#: counters read by tools/check (steps and examples run in this process)
STATS = {
    "examples": 0,
    "steps": 0,
    "crashes": 0,
    "restarts": 0,
    "power_cuts": 0,
    "hostile": 0,
    "resumes": 0,
    "reseeds": 0,
    "outages": 0,
    "refusals": 0,
    "late_writes": 0,
    "kept": 0,
    "kept_released": 0,
    "policies": 0,
    "pins": 0,
    "generations_pruned": 0,
    "stragglers": 0,
    "source_refusals": 0,
}


def backend_works(scheme: str) -> bool:
    """True if ``scheme`` serves volumes well enough for one whole cycle."""
    if scheme == "mem":
        return True
    tmp = tempfile.mkdtemp(prefix="coalesce-probe-")
    try:
        h = Harness(make_config(scheme, Path(tmp)))
        for source, w in h.writers.items():
            fill(w, [q for q in INITIAL if ORIGIN[q] == source], files=2, size=100)
        h.cycle()
        h.assert_invariants()
        return set(h.states().values()) == {"stable"}
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_config(scheme: str, tmp: Path, parallel: int = 1):
    n = next(_ids)
    # every source URL holds "src" and its own "src<name>" (source_outage takes both or one down)
    if scheme == "mem":
        srcs = {s: f"mem://fsrc{s}-{os.getpid()}-{n}" for s in SOURCES}
        dst = f"mem://fdst-{os.getpid()}-{n}"
    else:
        srcs = {s: f"{scheme}://{tmp}/src{s}{n}" for s in SOURCES}
        dst = f"{scheme}://{tmp}/dst{n}"
    lines = [
        "[group]",
        'name = "g"',
        f'destination = "{dst}"',
        f"parallel = {parallel}",
        f'metadata = "{tmp}/meta{n}"',
        # every other example spools its updates, so a crash mid-update resumes (resume_updates)
        f"spool = {'true' if n % 2 else 'false'}",
        f"reseed_after = {RESEED_AFTER}",
        f"straggler_after = {STRAGGLER_AFTER}",
        "[group.retry]",
        "initial = 5",
        "factor = 2",
        "maximum = 60",
    ]
    for s, url in srcs.items():
        lines += ["[[source]]", f'name = "{s}"', f'url = "{url}"']
    for r in INITIAL:
        lines += ["[[replica]]", f'name = "{r}"', f'from = "{ORIGIN[r]}"']
    return parse_config("\n".join(lines) + "\n", str(tmp / f"g{n}.toml"))


def hostile_records(kind: int) -> list[object]:
    """Change records a hostile source could send, built with validators off."""
    with attrs.validators.disabled():
        cases: list[list[object]] = [
            [R.MkFile(path="../evil", mode=0o644)],
            [R.MkDir(path="a", mode=0o755), R.MkFile(path="a/../../evil", mode=0o644)],
            [R.MkFile(path="/etc/evil", mode=0o644)],
            [R.Symlink(path="ln", target=".."), R.MkFile(path="ln/evil", mode=0o644)],
            [R.MkFile(path="f", mode=0o644), R.Rename(old="f", new="../evil")],
            [R.MkDir(path="..", mode=0o755)],
            [R.Write(path="../A/x", offset=0, data=b"evil")],
        ]
        return cases[kind]


class ExportWatch:
    """Observer plugin: I4 at the instant of every export switch the volume performs.

    The switch must be one call that moves every replica of the cycle at once: at no
    moment may two replicas in cycle states (per the committed ledger) export different
    PCPIs on the volume."""

    CYCLE = frozenset(SPEC.states_in_field("cycle"))

    def __init__(self) -> None:
        self.machine: "CoalescingMachine | None" = None
        self.violations: list[str] = []

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume, mapping):
        before = dict(volume.exported()) if hasattr(volume, "exported") else None
        result = yield
        m = self.machine
        if before is not None and all(before.get(n) == x for n, x in mapping.items()):
            return result  # a re-application of the table the volume already served (recovery): no switch
        if m is not None and "dst" in str(getattr(volume, "url", volume)):  # the destination volume
            # the committed ledger, read afresh: during a restart's recovery the harness still holds
            # the crashed agent, whose state is not the one the exporting agent committed (and whose
            # volumes a power cut killed: the ledger is found through the volume being exported)
            ledger = Ledger.open(m.h.config.ledger_path(volume.metadata_dir()))
            try:
                committed = ledger.load_consistent()
            finally:
                ledger.close()
            states = {r.name: r.state for r in committed.replicas.values()}
            seen = {
                mapping.get(n) for n, st in states.items() if st in self.CYCLE and mapping.get(n) not in (None, ACTIVE)
            }
            if len(seen) > 1:
                self.violations.append(f"I4: one export switch left cycle replicas on {sorted(seen)}")
        return result


class PruneWatch:
    """Observer plugin: at the instant the destination releases a generation, the committed ledger
    must neither pin it (`coalesce pin`) nor have a replica export it or keep it as its last good
    image, and the volume must not export it (spec/invariants.md, I1: a pinned or exported
    generation is never pruned; I3: an export names a live PCPI)."""

    def __init__(self) -> None:
        self.machine: "CoalescingMachine | None" = None
        self.violations: list[str] = []

    @hookimpl(wrapper=True)
    def coalesce_snapshot_delete(self, volume, name):
        m = self.machine
        if m is not None and "dst" in str(getattr(volume, "url", volume)):
            mine = m.h.agent.state.pcpis.get(name)
            if mine is None or mine.role == GENERATION:  # the crashed agent's state may lag: read the ledger
                self._check(m, volume, name)
        return (yield)

    def _check(self, m: "CoalescingMachine", volume, name: str) -> None:
        ledger = Ledger.open(m.h.config.ledger_path(volume.metadata_dir()))
        try:
            committed = ledger.load_consistent()
        finally:
            ledger.close()
        p = committed.pcpis.get(name)
        if p is None or p.role != GENERATION:
            return
        STATS["generations_pruned"] += 1
        if p.pinned:
            self.violations.append(f"I1: pinned generation {name} released")
        users = sorted(r.name for r in committed.replicas.values() if name in r.pinned())
        if users:
            self.violations.append(f"I1: generation {name} released while {users} export or keep it")
        shown = sorted(q for q, x in volume.exported().items() if x == name) if hasattr(volume, "exported") else []
        if shown:
            self.violations.append(f"I3: generation {name} released while the volume exports it for {shown}")


class LateWriter:
    """A writer that kept a file of a broken replica open: armed for replica ``q``, it writes into
    q's active FS when the next individual PCPI is taken, i.e. after the resync's fence and its
    scratch PCPI (docs/decisions.md, "Resync fences first")."""

    def __init__(self) -> None:
        self.machine: "CoalescingMachine | None" = None
        self.armed: str | None = None
        self.exported_then: object = None

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        q, m = self.armed, self.machine
        if q is None or m is None or role not in ("individual", "kept"):
            return
        self.armed = None
        self.exported_then = m.agent.state.replicas[q].exported
        dest = Volume.open(plugin_manager(), m.h.config.destination)
        with attrs.validators.disabled():
            dest.apply(
                q,
                R.framed(
                    q,
                    None,
                    "late",
                    [R.MkFile(path="late-file", mode=0o644), R.Write(path="late-file", offset=0, data=b"late")],
                ),
                use_purgatory=False,
            )


class SlowUpdate:
    """Observer plugin: armed for qtree ``q`` (:meth:`arm`), it holds q's next update on the destination
    (in the cycle: phase updating, q in update) after moving the fake clock past ``straggler_after``, so
    that the agent sends StragglerDue; the hold ends at the agent's next phase change (the cycle goes on
    without q: a rollback, the jump-ahead or the release; its transfer goes on beside them, and whatever
    waits in the machine's one-worker pool after it), or when a crash point fires (the crashing agent's
    pool must end), or after 5 s at most."""

    def __init__(self) -> None:
        self.machine: "CoalescingMachine | None" = None
        self.qtree: str | None = None
        self.holding = False
        self.release = threading.Event()

    def arm(self, q: str) -> None:
        self.qtree = q

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        m = self.machine
        if m is not None and qtree == self.qtree and "dst" in str(getattr(volume, "url", volume)):
            s = m.agent.state
            r = s.replicas.get(qtree)
            # only when no baseline waits in the pool behind the held worker (a baseline never straggles)
            baselines = any(x.state == "baseline" for x in s.replicas.values())
            if s.phase == "updating" and r is not None and r.state == "update" and not baselines:
                self.qtree = None  # once
                self.release.clear()
                self.holding = True
                m.clock.advance(STRAGGLER_AFTER + 1)
                try:
                    self.release.wait(5)
                finally:
                    self.holding = False
        return (yield)

    @hookimpl
    def coalesce_phase_changed(self, group, trigger, source, dest):
        if self.holding:
            self.release.set()


class CoalescingMachine(RuleBasedStateMachine):
    """Drives one group of 3 (up to 5) replicas; see the module docstring."""

    scheme = "mem"

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.tmp = Path(tempfile.mkdtemp(prefix="coalesce-stateful-"))
        self.watch = ExportWatch()
        #: streams that can never be applied (every update of the qtree fails; baselines work)
        self.stream_bugs = FaultInjector()
        #: a source outage: armed by source_goes_down, cleared by source_comes_back (or the teardown)
        self.outage = FaultInjector()
        self.clock = FakeClock()  # the harness's clock (its default), moved by hand
        self.late = LateWriter()
        self.prunes = PruneWatch()
        self.slow = SlowUpdate()
        self._unhook = crashpoints.at_crash(lambda _point: self.slow.release.set())
        self.h = Harness(
            make_config(self.scheme, self.tmp),
            plugins=[self.watch, self.stream_bugs, self.outage, self.late, self.prunes, self.slow],
            clock=self.clock,
        )
        self.watch.machine = self.late.machine = self.prunes.machine = self.slow.machine = self
        self.rng = random.Random(0)
        self.replay: dict[str, str] = {}
        self.seen = 0
        self.newest_source: str | None = None

    # -- helpers --------------------------------------------------------------
    @property
    def agent(self):
        return self.h.agent

    def _sync_replay(self) -> None:
        self.replay = {r.name: r.state for r in self.agent.state.replicas.values()}
        self.seen = len(self.h.recorder.transitions)

    def _writer(self, q: str):
        """The writer of the source qtree ``q`` lives on (its replica's source)."""
        return self.h.writers[ORIGIN[q]]

    def _newest(self, q: str) -> str:
        """The newest source PCPI of the source of qtree ``q``."""
        return max(self._writer(q).snapshots, key=lambda n: n.rsplit("-", 1)[-1])

    def _run(self, step) -> None:
        try:
            step()
        finally:
            self.h.faults.clear()

    def _exported_images(self) -> dict[str, str | None]:
        return self.h.exported_fingerprints()

    # -- setup ----------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed: int) -> None:
        self.rng = random.Random(seed)
        for source, w in self.h.writers.items():
            fill(w, [q for q in QTREES if ORIGIN[q] == source], files=3, size=300, seed=seed)
        self._sync_replay()

    # -- rules ----------------------------------------------------------------
    @rule(q=st.sampled_from(QTREES), n=st.integers(1, 4))
    def source_changes(self, q: str, n: int) -> None:
        """Writes, renames and deletes in a source qtree."""
        self._writer(q).random_changes(self.rng, q, n)

    @rule()
    def cycle(self) -> None:
        self._run(self.h.cycle)

    @rule(q=st.sampled_from(QTREES), record=st.integers(0, 6))
    def transfer_fails(self, q: str, record: int) -> None:
        """A cycle in which q's transfer is cut after ``record`` records."""
        self._writer(q).random_changes(self.rng, q, 2)
        self.h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=record, times=1, volume="src"))
        self._run(self.h.cycle)

    @rule(q=st.sampled_from(QTREES), record=st.integers(0, 4), times=st.integers(1, 3))
    def rollback_fails(self, q: str, record: int, times: int) -> None:
        """q's transfer fails and so does its rollback (and maybe retries): leaves the cycle."""
        self._writer(q).random_changes(self.rng, q, 2)
        self.h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=record, times=1, volume="src"))
        self.h.faults.add(Rule(hook="coalesce_rollback", qtree=q, times=times))
        self._run(self.h.cycle)
        self.h.faults.clear()

    @rule(q=st.sampled_from(QTREES), heal=st.booleans())
    def update_keeps_failing(self, q: str, heal: bool) -> None:
        """q's stream can no longer be applied (a translation bug, a lost base): every update of q
        fails for reseed_after cycles with changes in q, so a replica of q in the cycle is
        re-seeded (its baseline still works); then the stream heals, or stays broken (a re-seeded
        replica that rejoins fails again) until ``heal`` or the teardown."""
        self.stream_bugs.rules[:] = [r for r in self.stream_bugs.rules if r.qtree != q]
        self.stream_bugs.add(
            Rule(hook="coalesce_diff", qtree=q, volume="src", updates_only=True, message="stream cannot be applied")
        )
        for _ in range(RESEED_AFTER):
            self._writer(q).random_changes(self.rng, q, 2)
            self._run(self.h.cycle)
        if heal:
            self.stream_bugs.rules[:] = [r for r in self.stream_bugs.rules if r.qtree != q]

    @precondition(lambda self: not self.outage.rules)
    @rule(which=st.sampled_from(["both", *SOURCES]))
    def source_goes_down(self, which: str) -> None:
        """A source's host goes down (``which``: one source, or both): opening it and every call to it
        fail until source_comes_back. Meanwhile every other rule runs: the replicas of a source that is
        down miss the cycles, unchanged (still exporting their images) with the error recorded, while the
        other source's go on; with both down cycles end before any transfer; restarts recover with the
        destination and the sources they reach; break, resync, reseed and the retries need nothing else."""
        STATS["outages"] += 1
        down = set(SOURCES) if which == "both" else {which}
        for fault in source_outage("src" if which == "both" else f"src{which}"):  # see make_config's URLs
            self.outage.add(fault)
        before = dict(self.agent.state.replicas)
        images = self._exported_images()
        self._run(self.h.cycle)
        s = self.agent.state
        assert s.phase == "idle", f"a source outage left the agent in phase {s.phase}"
        self._missed(before, images, down, "source unavailable")

    def _missed(self, before: dict, images: dict, down: set[str], error: str) -> None:
        """The replicas of the ``down`` sources that the cycle would have transferred into missed it: each
        unchanged (its state, source point and exported image: a jump-ahead of the other source's replicas
        exports its image in the new base), one more outage, ``error`` recorded. A replica that waited for a
        jump-ahead (done_uncoalesced, reseeded: its image already on the destination) may rejoin at one: it
        needs the destination alone; every other export of those sources stays."""
        after = self.agent.state.replicas
        waiting = {n for n, b in before.items() if b.state in ("done_uncoalesced", "reseeded")}
        mine = {n for n, b in before.items() if b.origin in down}
        moved = {n for n, f in self._exported_images().items() if images.get(n) != f and n in mine} - waiting
        assert not moved, f"exports of {sorted(moved)} moved in a cycle without their source"
        for name, r in after.items():
            b = before.get(name)
            if b is None or b.origin not in down or b.state not in ("stable", "uninitialized", "reseed_pending"):
                continue
            assert (r.state, r.source_point) == (b.state, b.source_point), f"{name} changed in an outage"
            if r.outages == b.outages:  # only a re-seed still waiting for its retry time is not in the cycle
                assert b.state == "reseed_pending" and r.last_error == b.last_error, f"{name} missed no cycle"
            else:
                assert r.outages == b.outages + 1, f"{name}: outages {b.outages} -> {r.outages}"
                assert error in r.last_error, f"{name}: {r.last_error!r}"

    @precondition(lambda self: not self.outage.rules)  # a source that is down refuses everything already
    @rule(which=st.sampled_from(SOURCES), q=st.sampled_from(QTREES))
    def source_refuses_its_pcpi(self, which: str, q: str) -> None:
        """Source ``which`` refuses its PCPI of a cycle (its PCPI limit, a full pool): its replicas miss the
        cycle, unchanged, with the error recorded; the other source's replicas go on (docs/config.md,
        "Sources")."""
        STATS["source_refusals"] += 1
        self._writer(q).random_changes(self.rng, q, 2)
        self.h.faults.add(
            Rule(hook="coalesce_snapshot_create", volume=f"src{which}", times=1, message="source PCPI limit")
        )
        before = dict(self.agent.state.replicas)
        images = self._exported_images()
        self._run(self.h.cycle)
        assert self.agent.state.phase == "idle", f"a refused source PCPI left the agent in {self.agent.state.phase}"
        self._missed(before, images, {which}, "source PCPI limit")

    @rule(q=st.sampled_from(QTREES))
    def straggler(self, q: str) -> None:
        """q's update is slow: held on the destination while the clock passes ``straggler_after``, so it
        leaves the cycle (``straggle``) and the others jump ahead without it; its transfer ends after the
        cycle did, and it waits outside the cycle (done_uncoalesced, or the retries of loop 1026 after a
        failure) until a later jump-ahead takes it back (I7 in the teardown)."""
        self._writer(q).random_changes(self.rng, q, 2)
        self.slow.arm(q)
        seen = len(self.h.recorder.transitions)
        try:
            self._run(self.h.cycle)
        finally:
            held, self.slow.qtree = self.slow.qtree is None, None
        if held:  # q's update ran: it left the cycle, and its transfer ended before the step did
            STATS["stragglers"] += 1
            mine = [t[1] for t in self.h.recorder.transitions[seen:] if t[0] == q]
            assert "straggle" in mine, f"{q}'s held update did not leave the cycle: {mine}"
            assert self.agent.state.replicas[q].state != "update_uncoalesced", f"{q}'s transfer outlived the step"

    @precondition(lambda self: bool(self.outage.rules))
    @rule()
    def source_comes_back(self) -> None:
        self.outage.clear()

    @rule(
        nth=st.integers(1, 3),
        what=st.sampled_from(["cycle", "failing_cycle", "tick", "resync"]),
        q=st.sampled_from(INITIAL),
    )
    def pcpi_refused(self, nth: int, what: str, q: str) -> None:
        """The destination refuses its ``nth`` PCPI take of the step (its PCPI limit, no space): the
        replicas that needed it leave the cycle, the step ends with the agent idle."""
        STATS["refusals"] += 1
        self._writer(q).random_changes(self.rng, q, 2)
        if what == "failing_cycle":  # the rollback PCPI is the first destination PCPI
            self.h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src"))
        step: Callable[[], object] = self.h.cycle
        if what == "tick":
            self.clock.advance(100)
            step = self.agent.tick
        elif what == "resync":
            broken = sorted(n for n, r in self.agent.state.replicas.items() if r.state == "broken")
            if broken:
                step = lambda: self._resync(broken[0])  # noqa: E731
        self.h.faults.add(Rule(hook="coalesce_snapshot_create", volume="dst", nth=nth, times=1, message="PCPI limit"))
        self._run(step)
        s = self.agent.state
        assert s.phase == "idle", f"a refused PCPI left the agent in phase {s.phase}"
        flying = [r.name for r in s.replicas.values() if r.state in IN_FLIGHT or r.state == "done"]
        assert not flying, f"a refused PCPI left {flying} mid-cycle"

    @rule(q=st.sampled_from(QTREES))
    def reseed_verb(self, q: str) -> None:
        """`coalesce reseed q`: legal from stable, stable_uncoalesced, unstable_uncoalesced (no
        retry running), a no-op while a re-seed is under way, a clear NotNow otherwise."""
        r = self.agent.state.replicas.get(q)
        if r is None:
            return
        legal = r.state in ("stable", "stable_uncoalesced", "unstable_uncoalesced") and r.scratch is None
        try:
            self.agent.reseed(q, "stateful test")
        except NotNow as exc:
            assert not legal and r.state not in RESEEDING, f"reseed of {q} in {r.state} refused: {exc}"
            assert self.agent.state.replicas[q] == r and exc.hint
            return
        after = self.agent.state.replicas[q]
        if legal:
            assert (after.state, after.exported, after.source_point) == ("reseed_pending", r.exported, r.source_point)
            assert after.last_good == (r.last_good or r.exported)
        else:
            assert r.state in RESEEDING and after == r, f"reseed of {q} in {r.state} was accepted"

    @rule(readonly=st.booleans())
    def second_agent(self, readonly: bool) -> None:
        """A second invocation beside the running agent: a changing one is refused (GroupLocked) and
        changes nothing; a reader sees exactly the committed state and writes nothing."""
        before = self.agent.state
        commits = self.agent.ledger.commits
        if readonly:
            other = Agent.open(self.h.config, pm=self.h.pm, clock=self.h.clock, readonly=True)
            try:
                assert other.state == before and other.lock is None
            finally:
                other.close()
        else:
            try:
                Agent.open(self.h.config, pm=self.h.pm, clock=self.h.clock).close()
            except GroupLocked as exc:
                assert exc.hint
            else:
                raise AssertionError("a second agent opened a group the first one holds")
        assert self.agent.state == before and self.agent.ledger.commits == commits
        assert Agent.open(self.h.config, pm=self.h.pm, readonly=True).state == before

    @rule(seconds=st.sampled_from([1.0, 6.0, 30.0, 100.0]))
    def retry_timer(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._run(self.agent.tick)

    @rule(seconds=st.sampled_from([6.0, 100.0]), q=st.sampled_from(QTREES))
    def retry_fails(self, seconds: float, q: str) -> None:
        self.clock.advance(seconds)
        self.h.faults.add(Rule(hook="coalesce_rollback", qtree=q, times=1))
        self._run(self.agent.tick)

    @precondition(lambda self: len(self.agent.state.replicas) < len(QTREES))
    @rule()
    def add_replica(self) -> None:
        """`coalesce add`: the config first (the truth a restart checks the ledger against), then the ledger."""
        name = next(q for q in QTREES if q not in self.agent.state.replicas)
        cfg = self.h.config
        self.h.config = attrs.evolve(
            cfg, replicas=(*cfg.replicas, ReplicaConfig(name=name, source=name, origin=ORIGIN[name]))
        )
        self.agent.handle(ev.AddReplica(name=name, source_qtree=name, origin=ORIGIN[name]))  # as `run` adds it
        self.replay[name] = "uninitialized"

    @precondition(lambda self: len(self.agent.state.replicas) > 1)
    @rule(q=st.sampled_from(QTREES))
    def remove_replica(self, q: str) -> None:
        """`coalesce remove`: its export ends and what only it pinned is released (the invariants check the
        rest, I2 at rest included); its data stay; refused, changing nothing, mid-cycle or while a retry of
        it runs."""
        r = self.agent.state.replicas.get(q)
        if r is None:
            return
        before = self.agent.state
        try:
            self._run(lambda: self.agent.remove_replica(q))
        except NotNow:
            refusable = r.scratch is not None or before.phase != "idle"
            assert refusable and self.agent.state == before, f"remove of {q} in {r.state} refused"
            return
        cfg = self.h.config
        self.h.config = attrs.evolve(cfg, replicas=tuple(c for c in cfg.replicas if c.name != q))
        assert q not in self.agent.state.replicas
        assert self.agent.dest.exported().get(q) is None, f"{q} is still exported after its removal"
        if r.active_point is not None or r.exported == ACTIVE:
            assert q in self.agent.dest.qtree_list(None), f"the data of removed {q} are gone"

    @rule(q=st.sampled_from(QTREES), verb=st.sampled_from(["break", "resync", "release", "reseed", "remove"]))
    def handed_request(self, q: str, verb: str) -> None:
        """A verb handed to the running agent (coalesce_core.requests): queued in the ledger, taken at
        the next safe point and answered once; a refused one changes nothing."""
        if verb == "remove" and len(self.agent.state.replicas) <= 1:
            return
        led = self.agent.ledger
        req = led.ask(verb, requests.make_args(verb, replica=q, reason="handed"), self.clock(), os.getpid())
        before = self.agent.state
        try:
            self._run(self.agent.take_requests)
        finally:
            answer = led.request(req.id)
        assert answer is not None and answer.status in requests.ANSWERED, f"{req.describe()} not answered"
        assert self.agent.take_requests() == []
        if answer.status == requests.REFUSED:
            assert self.agent.state == before and answer.message, f"{req.describe()} refused but changed the state"
        elif verb == "remove":
            cfg = self.h.config
            self.h.config = attrs.evolve(cfg, replicas=tuple(c for c in cfg.replicas if c.name != q))

    @rule(q=st.sampled_from(QTREES), data=st.binary(max_size=64))
    def break_mirror(self, q: str, data: bytes) -> None:
        r = self.agent.state.replicas.get(q)
        if r is None or r.state not in ("stable", "stable_uncoalesced"):
            return
        self.agent.break_mirror(q)
        # the administrator writes into the now-writable replica
        with attrs.validators.disabled():
            self.agent.dest.apply(
                q,
                R.framed(
                    q,
                    None,
                    "admin",
                    [R.MkFile(path="admin-file", mode=0o644), R.Write(path="admin-file", offset=0, data=data)],
                ),
                use_purgatory=False,
            )

    def _resync(self, q: str) -> None:
        """Resync ``q``, keeping its writes unless it already keeps some (then --discard)."""
        self.agent.resync(q, discard=self.agent.state.kept_pcpi(q) is not None)

    @rule(q=st.sampled_from(QTREES), discard=st.booleans())
    def resync(self, q: str, discard: bool) -> None:
        """A resync keeps the broken replica's writes in one PCPI (I11); a second one that would keep
        writes while the replica keeps some is refused and changes nothing."""
        r = self.agent.state.replicas.get(q)
        if r is None or r.state != "broken":
            return
        before = self.agent.state
        if not discard and before.kept_pcpi(q) is not None:
            try:
                self.agent.resync(q)
            except NotNow as exc:
                assert "already keeps" in exc.message and "--discard" in (exc.hint or ""), exc
            else:
                raise AssertionError(f"a second resync of {q} keeping writes was taken (I11)")
            assert self.agent.state == before, "a refused resync changed the state"
            return
        self._run(lambda: self.agent.resync(q, discard=discard))

    @rule(q=st.sampled_from(QTREES))
    def release_kept(self, q: str) -> None:
        """`coalesce release`: the kept PCPI leaves the ledger and the volume; without one, refused."""
        kept = self.agent.state.kept_pcpi(q)
        if kept is None:
            before = self.agent.state
            try:
                self.agent.release_kept(q)
            except NotNow as exc:
                assert "keeps no writes" in exc.message, exc
            else:
                raise AssertionError(f"release of {q}, which keeps no writes, was taken")
            assert self.agent.state == before
            return
        STATS["kept_released"] += 1
        self._run(lambda: self.agent.release_kept(q))
        assert self.agent.state.kept_pcpi(q) is None and kept.name not in self.agent.state.pcpis
        assert kept.name not in self.agent.dest.snapshot_list(), f"{kept.name} released but still on the volume"

    @rule(q=st.sampled_from(QTREES))
    def write_during_resync(self, q: str) -> None:
        """A writer that kept a file of the broken replica open writes after the resync's scratch
        PCPI: the export was fenced before (it showed the last good image), and the write never
        reaches an export or the coalesced base: the attempt fails on the check of the rolled-back
        active FS (the retry undoes it) or a native rollback already discarded it (I9 after every
        step, I3 and I7 at the teardown)."""
        r = self.agent.state.replicas.get(q)
        if r is not None and r.state in ("stable", "stable_uncoalesced"):
            self.break_mirror(q, b"before the resync")  # the failover this resync ends
            r = self.agent.state.replicas[q]
        if r is None or r.state != "broken":
            return
        STATS["late_writes"] += 1
        last_good = r.last_good
        if self.agent.state.kept_pcpi(q) is not None:
            self.agent.release_kept(q)  # copied what was needed: this resync keeps the new writes
        writes = self.agent.dest.fingerprint(q, None)  # the broken replica's writes, before the fence
        self.late.armed = q
        try:
            self._run(lambda: self.agent.resync(q))
        finally:
            fired, self.late.armed = self.late.armed is None, None
        kept = self.agent.state.kept_pcpi(q)
        if fired:  # I11: the kept PCPI holds exactly the writes before the resync, not the late one
            assert kept is not None and kept.taken, f"{q}: the resync kept no PCPI"
            assert self.agent.dest.fingerprint(q, kept.name) == writes, f"{q}: {kept.name} is not the writes"
            STATS["kept"] += 1
        r = self.agent.state.replicas[q]
        if fired:
            assert self.late.exported_then == last_good, "the resync took its scratch PCPI before the fence"
        assert r.exported == last_good, f"{q} exports {r.exported} after a resync, not its last good image"
        if fired and r.state == "unstable_uncoalesced":  # a rollback by the scratch's diff left the write
            assert "the rolled-back active FS differs" in r.last_error and "late-file" in r.last_error, r.last_error
        elif fired:  # a native rollback restored the last good image itself
            assert r.state == "stable_uncoalesced", r.state

    @rule(
        point=st.sampled_from(sorted(CRASH_POINTS)),
        nth=st.integers(1, 3),
        what=st.sampled_from(["cycle", "failing_cycle", "straggler", "tick", "resync", "release", "reseed"]),
        q=st.sampled_from(INITIAL),
    )
    def crash_and_restart(self, point: str, nth: int, what: str, q: str) -> None:
        """A crash at the n-th pass through a named point, then a new agent from the ledger (I6)."""
        before = self._exported_images()
        step = self._interrupted_step(what, q)
        if step is None:
            return
        try:
            crashed = self.h.crash(f"{point}:{nth}", step)
        finally:
            self.h.faults.clear()
            self.slow.qtree = None  # a straggler step the crash or cut came before
        STATS["restarts"] += 1
        STATS["crashes"] += int(crashed)
        STATS["resumes"] += sum(1 for t in self.h.recorder.transitions[self.seen :] if t[1] == "resume_update")
        self._check_i6(before)
        self._sync_replay()

    def _interrupted_step(self, what: str, q: str) -> Callable[[], object] | None:
        """The step a crash interrupts (its source changes and faults are set up here), or None
        when ``what`` cannot run now (a resync of a replica that is not broken)."""
        if what == "failing_cycle":
            self._writer(q).random_changes(self.rng, q, 2)
            self.h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src"))
            return self.h.cycle
        if what == "cycle":
            self._writer(q).random_changes(self.rng, q, 1)
            return self.h.cycle
        if what == "straggler":  # q's update is held past straggler_after (the straggler rule)
            self._writer(q).random_changes(self.rng, q, 2)
            self.slow.arm(q)
            return self.h.cycle
        if what == "tick":
            self.clock.advance(100)
            return self.agent.tick
        if what == "reseed":  # a cycle that re-seeds q, when q can be re-seeded
            r = self.agent.state.replicas.get(q)
            if r is not None and r.state in ("stable", "stable_uncoalesced"):
                self.agent.reseed(q, "crash test")
            self._writer(q).random_changes(self.rng, q, 1)
            return self.h.cycle
        agent = self.agent
        if what == "release":  # `coalesce release` of q's kept writes
            return (lambda: agent.release_kept(q)) if agent.state.kept_pcpi(q) is not None else None
        r = self.agent.state.replicas.get(q)
        if r is None or r.state != "broken":
            return None
        return lambda: agent.resync(q, discard=agent.state.kept_pcpi(q) is not None)

    @rule(
        most=st.integers(2, 3),
        keep_min=st.sampled_from([0.0, 30.0, 600.0]),
        keep=st.sampled_from(["1h", "", "2h 1d"]),
        hours=st.sampled_from([0, 1]),
    )
    def set_retention(self, most: int, keep_min: float, keep: str, hours: int) -> None:
        """The operator sets a small [retention] (max 2-3) and restarts the agent, which applies it
        (docs/config.md, "Retention"); ``hours`` passes first, so images fall in several hours. A
        policy stricter than what the group holds prunes the surplus as the agent starts (at rest),
        or at the release step of the cycle its recovery finishes, with a jump-ahead or without one:
        the bound holds at rest at once (spec/invariants.md, I1; checked by ``i1_generations``)."""
        if not keep_min and not keep:
            keep = "1h"
        policy = Policy(keep_min=keep_min, keep=keep, max=most)
        STATS["policies"] += 1
        self.clock.advance(3600 * hours)
        self.h.config = attrs.evolve(self.h.config, retention=policy)
        self.h.restart()
        assert self.agent.state.retention == policy

    @rule(which=st.integers(0, 3), pinned=st.booleans())
    def pin_generation(self, which: int, pinned: bool) -> None:
        """`coalesce pin GEN` / `unpin GEN` of a retained generation (by its id): recorded in the ledger;
        an unpin at rest prunes what the policy no longer keeps (I1 at rest)."""
        gens = self.agent.state.generations()
        if not gens:
            return
        g = gens[which % len(gens)]
        STATS["pins"] += 1
        self._run(lambda: self.agent.pin(str(seq_of(g.name)), pinned))
        after = self.agent.state.pcpis.get(g.name)
        if pinned:
            assert after is not None and after.pinned and after.role == GENERATION, f"pin of {g.name}: {after}"
        else:
            assert after is None or not after.pinned, f"unpin of {g.name}: {after}"
            assert self.agent.ledger.load().pcpis.get(g.name) == after

    @rule(kind=st.integers(0, 6))
    def hostile_stream(self, kind: int) -> None:
        """I10: hostile records are refused with HostilePath and change nothing outside the qtree."""
        STATS["hostile"] += 1
        dest = self.agent.dest
        qtrees = sorted(self.agent.state.replicas)
        before = {q: dest.fingerprint(q, None) for q in qtrees}
        before_list = sorted(dest.qtree_list(None))
        try:
            dest.apply("hostile", R.framed("hostile", None, "evil", hostile_records(kind)), use_purgatory=False)
        except HostilePath:
            pass
        except CoalesceError as exc:
            raise AssertionError(
                f"I10: hostile stream {kind} refused with {type(exc).__name__}, not HostilePath: {exc}"
            )
        else:
            raise AssertionError(f"I10: hostile stream {kind} was applied without HostilePath")
        after = {q: dest.fingerprint(q, None) for q in qtrees}
        assert after == before, f"I10: a hostile stream into 'hostile' changed other qtrees: {before} -> {after}"
        assert sorted(q for q in dest.qtree_list(None) if q != "hostile") == [q for q in before_list if q != "hostile"]

    # -- invariants (after every step) ------------------------------------------
    @invariant()
    def i1_to_i5_i8_i9(self) -> None:
        STATS["steps"] += 1
        bad = [f for f in self.h.findings() if not f.ok]
        assert not bad, "; ".join(f"{f.invariant}: {f.detail}" for f in bad)

    @invariant()
    def failures_show(self) -> None:
        """At rest a failed transfer shows (last_error) until a later one of the replica succeeds,
        and a replica whose updates failed reseed_after times in a row is being re-seeded,
        not left in (or back in) the cycle to fail for ever."""
        s = self.agent.state
        if s.phase != "idle":
            return
        for r in s.replicas.values():
            if r.consecutive_failures:
                assert r.last_error, f"{r.name}: {r.consecutive_failures} failed transfers but no last_error"
            assert 0 <= r.outages <= r.consecutive_failures, f"{r.name}: {r.outages} outages"
            failed = r.consecutive_failures - r.outages  # an outage is not the replica's failure
            if failed >= s.reseed_after > 0 and r.state != "uninitialized":
                assert r.state in RESEEDING, (
                    f"{r.name}: {failed} failed updates in a row, still {r.state} (reseed_after)"
                )
            assert bool(r.reseed_reason) == (r.state in RESEEDING), f"{r.name}: reseed_reason in {r.state}"

    @invariant()
    def i1_generations(self) -> None:
        """I1 with retained generations (spec/invariants.md): at most 4 PCPIs in cycle roles on the volume
        besides the generations; at rest exactly 1 (the base) plus the generations the ledger retains,
        the unpinned ones at most the policy's ceiling (``retention.limit``); never a pinned or
        exported generation released (PruneWatch, at the instant of the release)."""
        assert not self.prunes.violations, self.prunes.violations[0]
        s = self.agent.state
        on_volume = set(self.agent.dest.snapshot_list())
        roles = {p.name: p.role for p in s.pcpis.values()}
        in_cycle = [n for n in on_volume if roles.get(n) in CYCLE_ROLES]
        assert len(in_cycle) <= 4, f"I1: {sorted(in_cycle)} in cycle roles"
        if s.phase != "idle":
            return
        gens = {p.name for p in s.generations()}
        held = {n for n in on_volume if roles.get(n) == GENERATION}
        assert held == gens, f"I1: the volume holds generations {sorted(held)}, the ledger {sorted(gens)}"
        if any(p.role == "base" for p in s.pcpis.values()):
            assert len(in_cycle) == 1, f"I1: at rest {sorted(in_cycle)} in cycle roles, expected the base alone"
        ceiling = limit(s.retention)
        unpinned = [g.id for g in as_retained(s) if not g.protected]
        assert ceiling is None or len(unpinned) <= ceiling, f"I1: {unpinned} unpinned generations > {ceiling}"

    @invariant()
    def i4_every_export_switch(self) -> None:
        assert not self.watch.violations, self.watch.violations[0]

    @invariant()
    def at_rest_budget(self) -> None:
        """I1/I2 read from the volume alone: at rest, 1 base + at most 2 per replica outside (besides
        the retained generations and kept PCPIs)."""
        s = self.agent.state
        if s.phase != "idle":
            return
        kept = {p.name: p for p in s.pcpis.values() if p.role == "kept"}
        owners = [o for p in kept.values() for o in p.owners]
        assert len(owners) == len(set(owners)) == len(kept), f"I11: kept PCPIs {sorted(kept)} of {owners}"
        gens = {p.name for p in s.generations()}  # besides the budget: checked by i1_generations
        held = [n for n in self.agent.dest.snapshot_list() if n.startswith("co-g-") and n not in kept and n not in gens]
        k = sum(1 for r in s.replicas.values() if r.state in OUTSIDE)
        # the base: some replica exports an image, or `coalesce remove` took the last one that did (the
        # base stays until the next jump-ahead replaces it)
        based = any(r.exported is not None for r in s.replicas.values()) or any(
            p.role == "base" for p in s.pcpis.values()
        )
        assert len(held) <= int(based) + 2 * k, f"I1/I2: volume holds {held} with {k} replicas outside"
        exported = self.agent.dest.exported()
        cycle_exports = {
            exported.get(r.name) for r in s.replicas.values() if r.state in ("stable", "done") and exported.get(r.name)
        }
        assert len(cycle_exports) <= 1, f"I4: in-cycle replicas export {cycle_exports} on the volume"

    @invariant()
    def i8_replayed_transitions(self) -> None:
        """I8 from the observer's stream: each change starts where the last ended, is an edge of
        the spec, and jump_ahead never fires while a replica is in update, rollback or baseline."""
        edges = SPEC.replica.edges()
        trans = self.h.recorder.transitions[self.seen :]
        for i, (replica, trigger, source, dest) in enumerate(trans):
            assert (trigger, source, dest) in edges, f"I8: {replica} {trigger} {source}->{dest} not in the spec"
            assert self.replay.get(replica, source) == source, (
                f"I8: {replica} moved from {source} but was in {self.replay.get(replica)}"
            )
            STATS["reseeds"] += trigger == "start_reseed"
            if trigger == "jump_ahead":
                flying = {n: s for n, s in self.replay.items() if s in IN_FLIGHT}
                assert not flying, f"I8: jump_ahead of {replica} while {flying} in flight"
            self.replay[replica] = dest
        self.seen += len(trans)

    @invariant()
    def i9_stable_means_equal(self) -> None:
        """Independent I9: a stable replica's active FS equals what the volume exports for it."""
        dest = self.agent.dest
        exported = dest.exported()
        for r in self.agent.state.replicas.values():
            snap = exported.get(r.name)
            if r.state in ("stable", "stable_uncoalesced") and snap not in (None, ACTIVE):
                assert dest.fingerprint(r.name, None) == dest.fingerprint(r.name, snap), f"I9: {r.name}"

    # -- I6 / I7 ------------------------------------------------------------------
    def _check_i6(self, before: dict[str, str | None]) -> None:
        s = self.agent.state
        assert s.phase == "idle", f"I6: after restart the agent is still in phase {s.phase}"
        flying = [r.name for r in s.replicas.values() if r.state in IN_FLIGHT]
        assert not flying, f"I6: after restart {flying} are still in flight"
        after = self._exported_images()
        lost = [
            n for n, f in before.items() if f is not None and after.get(n) is None and s.replicas[n].state != "broken"
        ]
        assert not lost, f"I6: exported images lost by the crash: {lost}"
        bad = [f for f in self.h.findings() if not f.ok]
        assert not bad, "I6: " + "; ".join(f"{f.invariant}: {f.detail}" for f in bad)

    def settle(self) -> None:
        """I7: faults stop (the administrator resyncs broken replicas); within SETTLE_CYCLES
        cycles every replica is stable and exports the newest source PCPI's image."""
        self.h.faults.clear()
        self.stream_bugs.clear()
        self.outage.clear()
        for r in list(self.agent.state.replicas.values()):
            if r.state == "broken":
                self._resync(r.name)
        for q in self.agent.state.replicas:
            self._writer(q).random_changes(self.rng, q, 1)
        for _ in range(SETTLE_CYCLES):
            self.clock.advance(1000)
            self.h.cycle()
            self.i1_to_i5_i8_i9()
            s = self.agent.state
            if all(r.state == "stable" and r.source_point == self._newest(r.name) for r in s.replicas.values()):
                break
        s = self.agent.state
        assert all(r.state == "stable" for r in s.replicas.values()), f"I7: not all stable: {self.h.states()}"
        points = {r.name: (r.source_point, self._newest(r.name)) for r in s.replicas.values()}
        assert all(p == newest for p, newest in points.values()), f"I7: not at the newest source point: {points}"
        fps = self.h.exported_fingerprints()
        for r in s.replicas.values():
            newest = self._newest(r.name)
            want = self._writer(r.name).snapshots[newest][r.source_qtree]
            assert fps[r.name] == want, f"I7/I3: {r.name} does not export the image of {newest}"
        for source, w in self.h.writers.items():  # no source PCPI leaks: each source holds what its replicas show
            held = {n for n in w.volume.snapshot_list() if n.startswith("co-g-src-")}
            shown = {r.source_point for r in s.replicas.values() if r.origin == source}
            assert held == shown, f"source {source} holds {sorted(held)}, its replicas show {sorted(shown)}"

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            self._unhook()
            try:
                self.agent.close()
            except Exception:
                pass
            if self.scheme == "mem":
                import coalesce_mem

                for one in self.h.config.sources:
                    coalesce_mem.forget(one.url)
                coalesce_mem.forget(self.h.config.destination)
            shutil.rmtree(self.tmp, ignore_errors=True)


class SimCoalescingMachine(CoalescingMachine):
    """The machine on sim volumes, plus power cuts (docs/sim.md, "Power cuts")."""

    scheme = "sim"

    @rule(
        point=st.none() | st.sampled_from(sorted(CRASH_POINTS)),
        nth=st.integers(1, 3),
        what=st.sampled_from(["cycle", "failing_cycle", "straggler", "tick", "resync", "release", "reseed"]),
        q=st.sampled_from(INITIAL),
        side=st.sampled_from(["destination", "source", "both"]),
        torn=st.none() | st.integers(0, 2**16),
    )
    def power_cut(self, point: str | None, nth: int, what: str, q: str, side: str, torn: int | None) -> None:
        """The power of the destination, the source or both is cut at the n-th pass through a named
        point (or, if the step never gets there or no point is drawn, when it ends): the agent dies
        at that instant, the volumes lose every write not yet flushed (with ``torn``: a random
        subset, some torn); a new agent recovers from the ledger's committed transactions.  Every
        primitive that returned was durable, so recovery is as after a crash (I6) and no export
        shows a partial image (I3, checked after every step)."""
        from coalesce_sim.testing import power_cut_at

        before = self._exported_images()
        step = self._interrupted_step(what, q)
        if step is None:
            return
        volumes = ("source", "destination") if side == "both" else (side,)
        rng = None if torn is None else random.Random(torn)
        try:
            crashed = power_cut_at(self.h, f"{point}:{nth}" if point else None, step, volumes, rng)
        finally:
            self.h.faults.clear()
            self.slow.qtree = None  # a straggler step the crash or cut came before
        STATS["restarts"] += 1
        STATS["power_cuts"] += 1
        STATS["crashes"] += int(crashed)
        STATS["resumes"] += sum(1 for t in self.h.recorder.transitions[self.seen :] if t[1] == "resume_update")
        self._check_i6(before)
        self._sync_replay()
