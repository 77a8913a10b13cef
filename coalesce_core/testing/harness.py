"""A test harness around one group: agent, fault injector, source writer, clock.

Used by the scenario tests, the stateful property tests, the demo and the
benchmarks.  ``crash(point)`` runs a step with an armed crash point and then
restarts a NEW agent from the ledger on the same volumes, as a reboot would.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from coalesce_core import crashpoints
from coalesce_core.agent import Agent
from coalesce_core.backend.faults import FaultInjector
from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.config import GroupConfig
from coalesce_core.cycle.invariants import Finding, live_check
from coalesce_core.ledger import iter_log_edges
from coalesce_core.stream import privileges
from coalesce_core.testing.workload import SourceWriter


class FakeClock:
    """A clock tests move by hand (retry backoff without sleeping)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Recorder:
    """Observer plugin: remembers each source PCPI's expected content and every export switch."""

    def __init__(self, harness: "Harness") -> None:
        self.h = harness
        self.exports: list[dict[str, Any]] = []
        self.transitions: list[tuple[str, str, str, str]] = []

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if role == "source":
            self.h.writer_of(volume).remember(name)

    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        self.transitions.append((replica, trigger, source, dest))

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume: Any, mapping: Any):
        result = yield
        self.exports.append(dict(mapping))
        return result


class Harness:
    def __init__(
        self,
        config: GroupConfig,
        plugins: Iterable[object] = (),
        clock: Callable[[], float] | None = None,
        create: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock or FakeClock()
        self.faults = FaultInjector()
        self.recorder = _Recorder(self)
        self.pm = plugin_manager([self.faults, self.recorder, *plugins])
        self.agent = (Agent.init if create else Agent.open)(config, pm=self.pm, clock=self.clock)
        # the test's own handle of each source, not the agent's: the agent's calls may be made to
        # fail (FaultInjector rules, a source outage), the test's writes and reads never are
        self.writers = {
            one.name: SourceWriter(Volume.open(plugin_manager(), one.url, options=one.options()), config.privileges)
            for one in config.sources
        }
        #: the writer of the group's first source (of a group of one source: its only one)
        self.writer = self.writers[config.sources[0].name]
        self.i5_marks: dict[str, str | None] = {}

    def writer_of(self, volume: str) -> SourceWriter:
        """The writer of the source volume whose URL is ``volume`` (a group of one source: :attr:`writer`)."""
        if len(self.writers) == 1:
            return self.writer
        return next(w for w in self.writers.values() if str(w.volume.url) == volume)

    def source_writer(self, replica: str) -> SourceWriter:
        """The writer of the source replica ``replica`` comes from."""
        if len(self.writers) == 1:
            return self.writer
        return self.writers[self.agent.state.replicas[replica].origin]

    # -- driving ---------------------------------------------------------------
    def cycle(self) -> dict[str, Any]:
        return self.agent.run_once()

    def restart(self) -> None:
        """A new agent from the ledger (the old one is abandoned, as after a kill)."""
        try:
            self.agent.ledger.close()
        except Exception:
            pass
        if self.agent.lock is not None:
            self.agent.lock.release()  # the kernel frees a dead process's flock
        self.agent = Agent.open(self.config, pm=self.pm, clock=self.clock)

    def crash(self, point: str, step: Callable[[], Any]) -> bool:
        """Run ``step`` with crash point ``point`` (``name[:n]``) armed; restart after it.

        Returns True if the crash happened (the point was reached)."""
        crashed = crashpoints.run_armed(point, step)
        self.restart()
        return crashed

    # -- reading -------------------------------------------------------------------
    def exported_fingerprints(self) -> dict[str, str | None]:
        dest = self.agent.dest
        out = {}
        for name, snap in dest.exported().items():
            out[name] = None if snap in (None, ACTIVE) else dest.fingerprint(name, snap)
        return out

    def cycle_pcpis_on_volume(self) -> int:
        roles = {p.name: p.role for p in self.agent.state.pcpis.values()}
        return sum(
            1 for n in self.agent.dest.snapshot_list() if roles.get(n) in ("base", "rollback", "jump_ahead", "new_base")
        )

    def findings(self) -> list[Finding]:
        """I1-I5, I8, I9 from the live volumes, the lag, plus I3 against the writer's own record:
        each export must be the image the writer recorded for the source PCPI the ledger says
        the replica shows (any recorded image only for a source PCPI the writer never saw)."""
        a = self.agent
        # the test's own view of each source (it never depends on the agent's), as the group's
        # privilege policy strips it
        views = {name: privileges.view(w.volume, a.config.privileges) for name, w in self.writers.items()}
        out = live_check(
            a.state,
            privileges.view(self.writer.volume, a.config.privileges) if len(views) == 1 else views,
            a.dest,
            self.i5_marks,
            edges=list(iter_log_edges(a.ledger.transitions())),
            now=self.clock(),
        )
        bad = []
        for name, fp in self.exported_fingerprints().items():
            r = a.state.replicas.get(name)
            if fp is None or r is None:
                continue
            writer = self.source_writer(name)
            known = {f for fps in writer.snapshots.values() for q, f in fps.items() if q == r.source_qtree}
            recorded = writer.snapshots.get(r.source_point or "", {}).get(r.source_qtree)
            if fp != recorded if recorded is not None else fp not in known:
                bad.append(f"{name} (source point {r.source_point})")
        out.append(
            Finding(
                "I3-independent",
                not bad,
                "every export equals the image the writer recorded at its source point"
                if not bad
                else f"exports differing from the writer's image at their source point: {bad}",
            )
        )
        if all(x.ok for x in out):
            self.i5_marks = {r.name: r.source_point for r in a.state.replicas.values()}
        return out

    def assert_invariants(self) -> None:
        bad = [f for f in self.findings() if not f.ok]
        assert not bad, "invariants violated: " + "; ".join(f"{f.invariant}: {f.detail}" for f in bad)

    def states(self) -> dict[str, str]:
        return {r.name: r.state for r in self.agent.state.replicas.values()}
