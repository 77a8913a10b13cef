"""The management agent (the patent's agent 799): the thin executor.

It holds no policy.  For each event it asks the planner for a decision,
persists the decision's state (write-ahead, one durable commit per batch),
tells the observers, and runs the effects through the backend hooks:
PCPI takes, releases and export switches inline; transfers and rollbacks
concurrently in a pool of ``parallel`` workers.  Every effect's result goes
back to the planner as an event.  Named crash points (coalesce_core.
crashpoints) sit between every two steps so tests can kill it anywhere.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import attrs
import pluggy

from . import codec, crashpoints
from . import effects as fx
from . import events as ev
from .config import GroupConfig
from .crashpoints import SimulatedCrash
from .errors import CoalesceError, MetadataError
from .ledger import Ledger
from .planner import Decision, decide, is_group_pcpi, is_group_source_pcpi
from .plugins import Volume, plugin_manager
from .records import Begin
from .spool import Spool, skip_changes
from .state import GroupState, Replica

PROGRESS_EVERY = 256


class _CycleStats:
    def __init__(self, now: float) -> None:
        self.started = now
        self.seconds: dict[str, float] = {}
        self.taken: list[str] = []
        self.released: list[str] = []
        self.records = 0
        self.nbytes = 0


class Agent:
    """One group's management agent.  Use :meth:`init` once, then :meth:`open`."""

    def __init__(self, config: GroupConfig, pm: pluggy.PluginManager, source: Volume, dest: Volume,
                 ledger: Ledger, clock: Callable[[], float]) -> None:
        self.config = config
        self.pm = pm
        self.source = source
        self.dest = dest
        self.ledger = ledger
        self.clock = clock
        self.state: GroupState = ledger.load()
        self._stats: _CycleStats | None = None
        self._abort = threading.Event()
        remote = bool(getattr(source.handle, "resumable_diff", False))
        self.spool: Spool | None = None
        if config.spool if config.spool is not None else remote:
            self.spool = Spool(config.spool_dir(dest.metadata_dir()))

    # -- construction ---------------------------------------------------------
    @staticmethod
    def _volumes(config: GroupConfig, pm: pluggy.PluginManager, create: bool) -> tuple[Volume, Volume]:
        return (Volume.open(pm, config.source, create=create), Volume.open(pm, config.destination, create=create))

    @classmethod
    def init(cls, config: GroupConfig, *, pm: pluggy.PluginManager | None = None, plugins: Iterable[object] = (),
             clock: Callable[[], float] = time.time) -> "Agent":
        """Create the volumes (if the backend can) and a new ledger for the group."""
        pm = pm or plugin_manager(plugins)
        source, dest = cls._volumes(config, pm, create=True)
        path = config.ledger_path(dest.metadata_dir())
        ours = [n for n in dest.snapshot_list() if is_group_pcpi(config.name, n)]
        if ours and not path.exists():
            raise MetadataError(
                f"the destination already holds {len(ours)} PCPIs of group {config.name!r} but no metadata at {path}",
                hint="restore the group's .coalesce/ metadata from a backup; coalesce will not guess which image "
                     "each replica exports, and deletes nothing",
            )
        state = GroupState(name=config.name, retry=config.retry)
        Ledger.create(path, state).close()
        return cls.open(config, pm=pm, clock=clock)

    @classmethod
    def open(cls, config: GroupConfig, *, pm: pluggy.PluginManager | None = None, plugins: Iterable[object] = (),
             clock: Callable[[], float] = time.time, recover: bool = True) -> "Agent":
        """Open an initialised group and (by default) recover from whatever a crash left."""
        pm = pm or plugin_manager(plugins)
        source, dest = cls._volumes(config, pm, create=False)
        ledger = Ledger.open(config.ledger_path(dest.metadata_dir()), group=config.name)
        agent = cls(config, pm, source, dest, ledger, clock)
        if agent.state.retry != config.retry:  # the config is the source of policy
            new = attrs.evolve(agent.state, retry=config.retry)
            ledger.commit(agent.state, new, now=clock())
            agent.state = new
        for rc in config.replicas:
            if rc.name not in agent.state.replicas:
                agent.handle(ev.AddReplica(name=rc.name, source_qtree=rc.source))
        if recover:
            agent.recover()
        return agent

    def close(self) -> None:
        self.ledger.close()
        self.source.close()
        self.dest.close()

    # -- the loop -------------------------------------------------------------
    def _commit(self, batch: list[tuple[object, Decision]]) -> list[object]:
        old = self.state
        new = batch[-1][1].state
        log = [t for _e, d in batch for t in d.log]
        self.ledger.commit(old, new, log, now=self.clock())
        self.state = new
        crashpoints.hit("after_commit")
        for t in log:
            if t.replica is None:
                self.pm.hook.coalesce_phase_changed(group=new.name, trigger=t.trigger, source=t.source, dest=t.dest)
            else:
                self.pm.hook.coalesce_state_changed(group=new.name, replica=t.replica, trigger=t.trigger,
                                                    source=t.source, dest=t.dest)
            if t.trigger == "start_cycle":
                self._stats = _CycleStats(self.clock())
            if t.trigger == "finish_cycle":
                self._finish_cycle()
        return [eff for _e, d in batch for eff in d.effects]

    def _decide_batch(self, events: list[object]) -> list[object]:
        batch = []
        state = self.state
        for e in events:
            d = decide(state, e)
            batch.append((e, d))
            state = d.state
        return self._commit(batch) if batch else []

    def handle(self, event: object) -> None:
        """Decide on one request and run everything it leads to, to the end."""
        self._drive(self._decide_batch([event]))

    def _drive(self, effects: list[object]) -> None:
        pending = collections.deque(effects)
        running: dict[cf.Future, object] = {}
        self._abort.clear()
        pool = cf.ThreadPoolExecutor(max_workers=self.config.parallel, thread_name_prefix="coalesce")
        try:
            while pending or running:
                while pending:
                    eff = pending.popleft()
                    if isinstance(eff, fx.CONCURRENT):
                        running[pool.submit(self._run_concurrent, eff)] = eff
                    else:
                        pending.extend(self._decide_batch([self._run_inline(eff)]))
                if running:
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    results = []
                    for fut in done:
                        running.pop(fut)
                        results.append(fut.result())  # re-raises SimulatedCrash
                    pending.extend(self._decide_batch(results))
        except BaseException:
            self._abort.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- effects ----------------------------------------------------------------
    def _run_inline(self, eff: object) -> object:
        now = self.clock
        if isinstance(eff, fx.TakeSourcePcpi):
            self.source.snapshot_create(eff.name)
            self.pm.hook.coalesce_pcpi_taken(group=self.state.name, volume=str(self.source.url), name=eff.name, role="source")
            crashpoints.hit("after_source_pcpi")
            return ev.SourcePcpiTaken(name=eff.name)
        if isinstance(eff, fx.ReleaseSourcePcpi):
            self.source.snapshot_delete(eff.name)
            self.pm.hook.coalesce_pcpi_released(group=self.state.name, volume=str(self.source.url), name=eff.name)
            return ev.SourcePcpiReleased(name=eff.name)
        if isinstance(eff, fx.TakePcpi):
            self.dest.snapshot_create(eff.name)
            if self._stats is not None:
                self._stats.taken.append(eff.name)
            self.pm.hook.coalesce_pcpi_taken(group=self.state.name, volume=str(self.dest.url), name=eff.name, role=eff.role)
            crashpoints.hit("after_pcpi_taken")
            if eff.role in ("rollback", "jump_ahead", "new_base"):
                crashpoints.hit(f"after_{eff.role}_pcpi")
            return ev.PcpiTaken(name=eff.name, now=now())
        if isinstance(eff, fx.ReleasePcpi):
            self.dest.snapshot_delete(eff.name)
            if self._stats is not None:
                self._stats.released.append(eff.name)
            self.pm.hook.coalesce_pcpi_released(group=self.state.name, volume=str(self.dest.url), name=eff.name)
            crashpoints.hit("mid_release")
            return ev.PcpiReleased(name=eff.name)
        if isinstance(eff, fx.PurgePurgatory):
            self.dest.purge_purgatory(list(eff.qtrees))
            crashpoints.hit("between_jump_ahead_pcpis")
            return ev.PurgatoryPurged()
        if isinstance(eff, fx.Export):
            if eff.jump:
                crashpoints.hit("before_export_switch")
            self.dest.export(eff.mapping)
            if eff.jump:
                crashpoints.hit("after_export_switch")
            return ev.Exported(jump=eff.jump)
        if isinstance(eff, fx.RemoveQtree):
            try:
                self.dest.remove_qtree(eff.replica)
            except CoalesceError:
                pass  # the next baseline clears the qtree again before it starts
            return ev.QtreeRemoved(replica=eff.replica)
        raise TypeError(f"not an effect: {eff!r}")

    def _records(self, records: Iterable[object], replica: str, point: str) -> Iterator[object]:
        n = nbytes = 0
        for rec in records:
            if self._abort.is_set() or crashpoints.fired():
                raise SimulatedCrash("abort")
            yield rec
            n += 1
            data = getattr(rec, "data", None)
            if data is not None:
                nbytes += len(data)
            crashpoints.hit(point)
            if n % PROGRESS_EVERY == 0:
                self.pm.hook.coalesce_transfer_progress(group=self.state.name, replica=replica, records=n,
                                                        nbytes=nbytes)

    def _run_concurrent(self, eff: object) -> object:
        t0 = self.clock()
        if isinstance(eff, fx.Transfer):
            point = "mid_baseline" if eff.base is None else "mid_apply"
            sources: list[object] = []

            def diff(skip: int = 0) -> Iterator[object]:
                """The source's stream after its first ``skip`` change records."""
                # a remote source's records were decoded and checked by the codec on arrival, and
                # its server skips; a local stream is checked whole by the codec, then skipped
                remote = getattr(self.source.handle, "records_decoded", False)
                source = self.source.diff(eff.source_qtree, eff.base, eff.target, skip=skip if remote else 0)
                sources.append(source)
                if remote:
                    return source
                stream = codec.roundtrip(source)
                return skip_changes(stream, skip) if skip else stream

            spool = self.spool if eff.base is not None else None
            stream: Iterator[object] | None = None
            try:
                if eff.base is None:
                    self.dest.remove_qtree(eff.replica)  # a baseline starts from nothing
                if spool is None:
                    stream = diff()
                else:
                    begin = Begin(qtree=eff.source_qtree, base=eff.base, target=eff.target)
                    if eff.resume and spool.holds(eff.replica, begin):
                        stream = spool.resume(eff.replica, begin, diff)
                    else:
                        stream = spool.record(eff.replica, diff())
                stats = self.dest.apply(eff.replica, self._records(stream, eff.replica, point), use_purgatory=True)
            except Exception as exc:
                if spool is not None:
                    _close(stream)
                    spool.discard(eff.replica)  # a failed update is not resumed: it is rolled back
                return ev.TransferDone(replica=eff.replica, ok=False, now=self.clock(), error=_describe(exc))
            finally:
                for source in sources:
                    _close(source)  # a diff cut short must release what it holds (clones, pipes) now
                if self._stats is not None:
                    self._stats.seconds[eff.replica] = self.clock() - t0
            if spool is not None:
                spool.discard(eff.replica)  # applied and about to be committed: nothing left to resume
            if self._stats is not None:
                self._stats.records += int(stats.get("records", 0))
                self._stats.nbytes += int(stats.get("bytes", 0))
            return ev.TransferDone(replica=eff.replica, ok=True, now=self.clock(),
                                   records=int(stats.get("records", 0)), nbytes=int(stats.get("bytes", 0)))
        if isinstance(eff, fx.Rollback):
            try:
                with crashpoints.during("mid_retry" if eff.retry else "mid_rollback"):
                    self.dest.rollback(eff.replica, eff.from_pcpi, eff.to_pcpi)
            except Exception as exc:
                return ev.RollbackDone(replica=eff.replica, ok=False, now=self.clock(), error=_describe(exc))
            return ev.RollbackDone(replica=eff.replica, ok=True, now=self.clock())
        raise TypeError(f"not a concurrent effect: {eff!r}")

    def _finish_cycle(self) -> None:
        st = self._stats
        s = self.state
        ended = self.clock()
        slowest = max(st.seconds.items(), key=lambda kv: kv[1]) if st and st.seconds else (None, 0.0)
        report = {
            "cycle": s.cycle,
            "started": st.started if st else s.cycle_started,
            "ended": ended,
            "seconds": round(ended - (st.started if st else s.cycle_started), 6),
            "slowest": slowest[0],
            "slowest_seconds": round(slowest[1], 6),
            "pcpis_taken": list(st.taken) if st else [],
            "pcpis_released": list(st.released) if st else [],
            "failures": s.cycle_failures,
            "records": st.records if st else 0,
            "bytes": st.nbytes if st else 0,
            "states": _count_states(s),
        }
        self.ledger.record_cycle(report)
        self.pm.hook.coalesce_cycle_finished(group=s.name, report=report)
        self._stats = None

    # -- requests -----------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile the ledger with the volumes and finish or undo what was in flight."""
        group = self.state.name
        dest = frozenset(n for n in self.dest.snapshot_list() if is_group_pcpi(group, n))
        src = frozenset(n for n in self.source.snapshot_list() if is_group_source_pcpi(group, n))
        self.handle(ev.Recover(now=self.clock(), destination_pcpis=dest, source_pcpis=src, spooled=self._spooled()))

    def _spooled(self) -> frozenset[str]:
        """Replicas in update whose spool holds their running update; other spools are stale."""
        if self.spool is None:
            return frozenset()
        out = set()
        for r in self.state.replicas.values():
            if r.state == "update" and r.active_point is not None and r.target is not None and self.spool.holds(
                    r.name, Begin(qtree=r.source_qtree, base=r.active_point, target=r.target)):
                out.add(r.name)
        keep = out | {r.name for r in self.state.replicas.values() if r.resume}
        for name in self.spool.replicas():
            if name not in keep:
                self.spool.discard(name)
        return frozenset(out)

    def tick(self) -> None:
        """Run the rollback retries that are due (loop 1026)."""
        self.handle(ev.Tick(now=self.clock()))

    def run_cycle(self) -> dict[str, Any]:
        """One whole coalescing cycle; returns its history row."""
        before = self.state.cycle
        self.handle(ev.StartCycle(now=self.clock()))
        cycles = self.ledger.cycles()
        return cycles[-1] if cycles and cycles[-1]["cycle"] > before else {}

    def run_once(self) -> dict[str, Any]:
        """Due retries, then one cycle (what `coalesce run --once` does)."""
        self.tick()
        return self.run_cycle()

    def add_replica(self, name: str, source_qtree: str | None = None) -> None:
        self.handle(ev.AddReplica(name=name, source_qtree=source_qtree or name))

    def break_mirror(self, name: str) -> None:
        self.handle(ev.BreakMirror(replica=name))

    def resync(self, name: str) -> None:
        self.handle(ev.Resync(replica=name))

    def all_stable(self) -> bool:
        return all(r.state == "stable" for r in self.state.replicas.values())

    def export_path(self, replica: str) -> str | None:
        return self.dest.export_path(replica)


def _count_states(s: GroupState) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in s.replicas.values():
        out[r.state] = out.get(r.state, 0) + 1
    return out


def _close(iterator: object) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _describe(exc: BaseException) -> str:
    hint = getattr(exc, "hint", "")
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({hint})" if hint else text
