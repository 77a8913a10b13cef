"""The management agent (the patent's agent 799): the thin executor.

It holds no policy.  For each event it asks the planner for a decision,
persists the decision's state (write-ahead, one durable commit per batch),
tells the observers, and runs the effects through the backend hooks:
PCPI takes, releases and export switches inline; transfers (the data path is
coalesce_core.transfer) and rollbacks concurrently in a pool of ``parallel`` workers (a source's
own ``parallel`` caps its transfers inside it).  Every effect's result goes
back to the planner as an event, a PCPI a source or the destination refused
(or a source that cannot be reached) included: the planner decides what it means
(docs/decisions.md, "Refused PCPIs and source outages").  Every effect runs against
the source its ``source`` (a transfer: its ``origin``) names, one volume per source
of the group (fan-in, docs/config.md "Sources"), each opened at its first use: the
read verbs never open one, and only transfers need them.  Named crash
points (coalesce_core.crashpoints) sit between every two steps so tests can kill it anywhere.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable

import attrs
import pluggy

from coalesce_core import crashpoints, outcome, ownership, requests, restorer, retention, verifier, verify
from coalesce_core import sources as per_source
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.config import GroupConfig, check_origins, check_replicas, removed_sources
from coalesce_core.cycle import effects as fx
from coalesce_core.cycle import events as ev
from coalesce_core.cycle import restore
from coalesce_core.cycle.invariants import i5_marks
from coalesce_core.cycle.planner import (
    Decision,
    NotNow,
    Transition,
    cycle_sources,
    decide,
    is_group_pcpi,
    is_group_source_pcpi,
    pcpi_shortfall,
    straggler_due,
)
from coalesce_core.cycle.state import INDIVIDUAL, KEPT, GroupState
from coalesce_core.errors import BackendError, CoalesceError, ConfigError, MetadataError, VolumeInUse
from coalesce_core.grouplock import GroupLock
from coalesce_core.ledger import Ledger, RequestGone
from coalesce_core.stream import privileges
from coalesce_core.stream.records import Begin
from coalesce_core.stream.spool import Budget, Spool
from coalesce_core.transfer import run_transfer
from coalesce_core.ui.peertext import clean

#: transitions that record a failed transfer (`run --once` exits EXIT_TRANSFER_FAILED) or rollback
TRANSFER_FAILURES = ("update_failed", "baseline_failed", "reseed_failed", "straggler_failed")
FAILURES = TRANSFER_FAILURES + ("rollback_failed", "retry_failed", "jump_ahead_refused")
#: what the failures list names a replica that missed a cycle (source outage, no PCPI headroom)
MISSED = "missed_cycle"
#: what a volume that refuses a PCPI, or cannot be reached, raises; and a source that serves another
#: group of this name (coalesce_core/ownership.py), whose PCPIs are then left alone like an unreachable one's
REFUSED = (BackendError, OSError, VolumeInUse)

SOURCE_HINT = (
    "the cycle ended without transfers: every replica keeps exporting its image and `coalesce status` "
    "shows the error; `coalesce run` tries again every interval. Is the source volume there, or "
    "`coalesce serve` running on its host?"
)
DEST_HINT = (
    "the replicas that needed it left the cycle and export their own image until the destination takes "
    "PCPIs again (free space, or release PCPIs other tools hold); `coalesce status` shows them"
)
ROOM_HINT = (
    "release PCPIs the volume no longer needs (other tools' snapshots) or raise its limit; every replica "
    "keeps exporting its image and the next cycle tries again"
)


class _CycleStats:
    def __init__(self, now: float) -> None:
        self.started = now
        self.seconds: dict[str, float] = {}
        self.taken: list[str] = []
        self.released: list[str] = []
        self.records = 0
        self.nbytes = 0
        self.failed: dict[str, str] = {}


class _SourceSlots:
    """The transfers of each source with a cap (``caps``: source name -> its ``parallel``) that run,
    and those that wait for one of theirs to end, in order.  Other effects pass freely."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps
        self.running: collections.Counter[str] = collections.Counter()
        self.waiting: dict[str, collections.deque[object]] = collections.defaultdict(collections.deque)

    def admit(self, eff: object) -> bool:
        """True: run ``eff`` now; False: it waits (:meth:`release` hands it back)."""
        if not isinstance(eff, fx.Transfer) or eff.origin not in self.caps:
            return True
        if self.running[eff.origin] >= self.caps[eff.origin]:
            self.waiting[eff.origin].append(eff)
            return False
        self.running[eff.origin] += 1
        return True

    def release(self, eff: object) -> object | None:
        """``eff`` ended: the next transfer of its source that waited, now running, or None."""
        if not isinstance(eff, fx.Transfer) or eff.origin not in self.caps:
            return None
        self.running[eff.origin] -= 1
        queue = self.waiting[eff.origin]
        if not queue:
            return None
        self.running[eff.origin] += 1
        return queue.popleft()


class Agent:
    """One group's management agent.  Use :meth:`init` once, then :meth:`open`."""

    def __init__(
        self,
        config: GroupConfig,
        pm: pluggy.PluginManager,
        sources: dict[str, Volume] | None,
        dest: Volume,
        ledger: Ledger,
        clock: Callable[[], float],
        lock: GroupLock | None = None,
    ) -> None:
        self.config = config
        #: the group's lock (coalesce_core.grouplock); None for a read-only agent
        self.lock = lock
        self.pm = pm
        #: the source volumes opened so far, by source name (each opened at first use: :meth:`source_volume`)
        self._sources: dict[str, Volume] = dict(sources or {})
        self._source_lock = threading.Lock()
        self.dest = dest
        self.ledger = ledger
        self.clock = clock
        self.state: GroupState = ledger.load_consistent()
        self._stats: _CycleStats | None = None
        #: full verifications (baselines, re-seeds) that passed since the last cycle ended
        self._verified: dict[str, dict[str, Any]] = {}
        #: failures decided since the last `run_once` began: {"replica", "trigger", "error"} (trigger: the
        #: spec trigger, or MISSED for a replica whose cycle could not run)
        self.failures: list[dict[str, str]] = []
        #: PCPIs the volumes refused, a source that could not be reached or serves another group of this
        #: name, a cycle refused for want of PCPIs, since the last `run_once` began (`run --once` exits with
        #: the first one's code: 4, or 2 for the source of another group)
        self.refusals: list[CoalesceError] = []
        #: of those, the sources that refused a PCPI (to take or release) or could not be reached
        self.refused_sources: list[str] = []
        #: the sources whose PCPI the cycles since the last `run_once` began asked for: True, taken
        self.taken_sources: dict[str, bool] = {}
        #: this cycle's record of each source it asked (coalesce_core/sources.py), kept in the ledger's
        #: note ``sources`` with the cycle's history row
        self._seen: dict[str, per_source.Seen] = {}
        self._abort = threading.Event()
        #: the pool of ``parallel`` workers the transfers and rollbacks run in, made at the first that
        #: runs and kept for the agent's lifetime (:meth:`close` ends it): not a pool, and its threads, per cycle
        self._pool: cf.ThreadPoolExecutor | None = None
        #: what the last recovery did to a ledger behind its volumes (coalesce_core/cycle/restore.py)
        self.restored: list[str] = []
        self._spool: Spool | None = None
        #: whether the updates of each source spool, by source name (decided at first use)
        self._spools: dict[str, bool] = {}

    # -- the volumes ----------------------------------------------------------
    def source_volume(self, name: str) -> Volume:
        """The volume of the source called ``name``, opened at its first use with that source's URL and
        transport tables; a source that cannot be opened raises BackendError each time (the next use
        tries again), one that serves another group of this name VolumeInUse
        (coalesce_core/ownership.py: the group's record is checked, and written, at its first open), one
        the config no longer names BackendError (its PCPIs wait until its [[source]] is back)."""
        with self._source_lock:
            volume = self._sources.get(name)
            if volume is None:
                try:
                    one = self.config.source_named(name)
                except ConfigError as exc:
                    raise BackendError(exc.message, hint=exc.hint) from None
                volume = Volume.open(self.pm, one.url, options=one.options())
                try:
                    ownership.bind_source(self.config, self.ledger, volume, write=self.lock is not None)
                except BaseException:
                    volume.close()
                    raise
                self._sources[name] = volume
            return volume

    @property
    def source(self) -> Volume:
        """The volume of the group's one source (:meth:`source_volume`; a ConfigError for a group of several)."""
        return self.source_volume(self.config.sole_source().name)

    def source_if_open(self, name: str | None = None) -> Volume | None:
        """The volume of source ``name`` (None: the group's one source) if something already opened it
        (never opens it)."""
        return self._sources.get(self.config.sole_source().name if name is None else name)

    def _source_url(self, name: str) -> str:
        """The URL of source ``name`` for messages (its name when the config no longer has it)."""
        return next((s.url for s in self.config.sources if s.name == name), name)

    def spool_for(self, source: str) -> Spool | None:
        """Where the updates of source ``source`` spool their records (coalesce_core.stream.spool), or
        None.  ``[group] spool``, by default on for a source that resumes its diffs (a remote one): then
        deciding opens that source.  One spool directory and budget serve every source."""
        use = self._spools.get(source)
        if use is None:
            use = self.config.spool if self.config.spool is not None else self.source_volume(source).resumable_diff
            self._spools[source] = use
        if use and self._spool is None:
            budget = Budget(self.config.spool_max, self.config.spool_group_max)
            self._spool = Spool(self.config.spool_dir(self.dest.metadata_dir()), budget)
        return self._spool if use else None

    @property
    def spool(self) -> Spool | None:
        """The spool of the group's one source (:meth:`spool_for`)."""
        return self.spool_for(self.config.sole_source().name)

    def _refused(self, message: str, exc: BaseException, hint: str) -> str:
        """Remember a refusal for `run --once` and return its text for the planner."""
        error = _describe(exc)
        self.refusals.append(BackendError(f"{message}: {error}", hint=hint))
        return error

    @classmethod
    def init(
        cls,
        config: GroupConfig,
        *,
        pm: pluggy.PluginManager | None = None,
        plugins: Iterable[object] = (),
        clock: Callable[[], float] = time.time,
    ) -> "Agent":
        """Create the volumes (if the backend can) and a new ledger for the group (holding its lock)."""
        pm = pm or plugin_manager(plugins)
        sources: list[Volume] = []
        try:
            for one in config.sources:
                sources.append(Volume.open(pm, one.url, create=True, options=one.options()))
            dest = Volume.open(pm, config.destination, create=True)
        except BaseException:
            for source in sources:
                source.close()
            raise
        path = config.ledger_path(dest.metadata_dir())
        lock = GroupLock.acquire(path, config.name, "init")
        try:
            ours = [n for n in dest.snapshot_list() if is_group_pcpi(config.name, n)]
            if ours and not path.exists():
                raise MetadataError(
                    f"the destination already holds {len(ours)} PCPIs of group {config.name!r} "
                    f"but no metadata at {path}",
                    hint="restore the group's .coalesce/ metadata from a backup; coalesce will not guess which image "
                    "each replica exports, and deletes nothing",
                )
            if not path.exists():  # (an existing ledger: Ledger.create says the group is initialised)
                for source in sources:
                    ownership.check_free(config, source, dest, path)
            state = GroupState(
                name=config.name,
                retry=config.retry,
                reseed_after=config.reseed_after,
                retention=config.retention,
                straggler_after=config.straggler_after,
            )
            Ledger.create(path, state, identity=ownership.new_identity()).close()
        except BaseException:
            lock.release()
            raise
        finally:
            for source in sources:
                source.close()
            dest.close()
        return cls.open(config, pm=pm, clock=clock, _lock=lock)

    @classmethod
    def open(
        cls,
        config: GroupConfig,
        *,
        pm: pluggy.PluginManager | None = None,
        plugins: Iterable[object] = (),
        clock: Callable[[], float] = time.time,
        recover: bool = True,
        readonly: bool = False,
        verb: str = "run",
        reach_source: bool = True,
        reconcile: bool = True,
        _lock: GroupLock | None = None,
    ) -> "Agent":
        """Open an initialised group and (by default) recover from whatever a crash left.

        A changing agent holds the group's lock (GroupLocked, exit 9, when another process has it)
        until :meth:`close`; ``verb`` is what the lock file tells the next one.  ``readonly``: no
        lock, no recovery, nothing written (the state as committed, read in one transaction), for
        the read verbs beside a running agent.  The source is not opened here (:attr:`source`);
        ``reach_source`` False: recovery does not ask it what it holds either (an administrative
        verb, which needs only the destination; :meth:`recover`).  ``reconcile``: a replica of the
        ledger that the config lacks or gives another source qtree or source is a ConfigError before anything
        changes (the config is the truth; `coalesce remove`/`add` reconcile them, and open without
        it); a replica only the config has is added."""
        pm = pm or plugin_manager(plugins)
        dest = Volume.open(pm, config.destination)
        try:
            if not readonly:  # generations the destination has no room for: a ConfigError before anything is locked
                retention.check_capacity(config.retention, dest.max_pcpis)
            path = config.ledger_path(dest.metadata_dir())
            lock = None if readonly else (_lock or GroupLock.acquire(path, config.name, verb))
        except BaseException:
            dest.close()
            raise
        try:
            ledger = Ledger.open(path, group=config.name)
            try:
                ownership.bind(config, ledger, dest, write=not readonly)
            except BaseException:
                ledger.close()
                raise
        except BaseException:
            dest.close()
            if lock is not None:
                lock.release()
            raise
        agent = cls(config, pm, None, dest, ledger, clock, lock)
        if readonly:
            return agent
        try:  # whatever fails from here on closes the agent: its lock must not outlive a failed open
            if reconcile:
                check_replicas(config, {r.name: r.source_qtree for r in agent.state.replicas.values()})
                check_origins(config, {r.name: r.origin for r in agent.state.replicas.values()})
            policy = (config.retry, config.reseed_after, config.retention, config.straggler_after)
            held = (agent.state.retry, agent.state.reseed_after, agent.state.retention, agent.state.straggler_after)
            if held != policy:
                # the config is the source of policy
                new = attrs.evolve(
                    agent.state,
                    retry=config.retry,
                    reseed_after=config.reseed_after,
                    retention=config.retention,
                    straggler_after=config.straggler_after,
                )
                ledger.commit(agent.state, new, now=clock())
                agent.state = new
            for rc in config.replicas:
                if rc.name not in agent.state.replicas:
                    agent.handle(ev.AddReplica(name=rc.name, source_qtree=rc.source, origin=rc.origin))
            if recover:
                agent.recover(reach_source=reach_source)
        except BaseException:
            agent.close()
            raise
        return agent

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger and the volumes, then free the group's lock."""
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self.ledger.close()
            for source in self._sources.values():
                source.close()
            self.dest.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    # -- the loop -------------------------------------------------------------
    def _commit(self, batch: list[tuple[object, Decision]], answered: requests.Request | None = None) -> list[object]:
        old = self.state
        new = batch[-1][1].state
        log = [t for _e, d in batch for t in d.log]
        if log or answered is not None or new != old:  # a decision that changed nothing (a Tick with no
            self.ledger.commit(old, new, log, now=self.clock(), answered=answered)  # retry due) writes nothing
        self.state = new
        crashpoints.hit("after_commit")
        _straggler_points(old, new, log)
        if any(isinstance(e, (ev.StartCycle, ev.SourcePcpiRefused)) for e, _d in batch):
            self._note_missed(old, new)
        for t in log:
            if t.replica is None:
                self.pm.hook.coalesce_phase_changed(group=new.name, trigger=t.trigger, source=t.source, dest=t.dest)
            else:
                self.pm.hook.coalesce_state_changed(
                    group=new.name, replica=t.replica, trigger=t.trigger, source=t.source, dest=t.dest
                )
            if t.trigger == "start_cycle":
                self._stats = _CycleStats(self.clock())
            if t.trigger in FAILURES and t.replica is not None:
                error = new.replicas[t.replica].last_error
                self.failures.append({"replica": t.replica, "trigger": t.trigger, "error": error})
                if self._stats is not None and t.trigger in TRANSFER_FAILURES:
                    self._stats.failed[t.replica] = error
            if t.trigger == "finish_cycle":
                self._finish_cycle()
        return [eff for _e, d in batch for eff in d.effects]

    def _note_missed(self, old: GroupState, new: GroupState) -> None:
        """The replicas that missed the cycle (an outage) join the run's failures and the cycle's report."""
        for name, r in sorted(new.replicas.items()):
            before = old.replicas.get(name)
            if before is not None and r.outages > before.outages:
                self.failures.append({"replica": name, "trigger": MISSED, "error": r.last_error})
                if self._stats is not None:
                    self._stats.failed[name] = r.last_error

    def _decide_batch(self, events: list[object]) -> list[object]:
        batch = []
        state = self.state
        for e in events:
            e = self._with_room(e)
            d = decide(state, e)
            batch.append((e, d))
            state = d.state
        return self._commit(batch) if batch else []

    def _with_room(self, event: object) -> object:
        """A resync that keeps writes learns the destination's PCPI room (I11: the kept PCPI must leave
        room for a cycle); only the destination is asked."""
        if isinstance(event, ev.Resync) and not event.discard and event.destination_room is None:
            limit = self.dest.max_pcpis
            if limit is not None:
                return attrs.evolve(event, destination_room=limit - len(self.dest.snapshot_list()))
        return event

    def handle(self, event: object) -> None:
        """Decide on one request and run everything it leads to, to the end."""
        self._drive(self._decide_batch([event]))

    def _drive(self, effects: list[object]) -> None:
        """Run ``effects`` and everything their results lead to, to the end: concurrent ones in a pool
        of the group's ``parallel`` workers, the transfers of a source with a ``parallel`` of its own
        at most that many at once (the others wait, in order, for one of theirs to end; docs/config.md,
        "Sources"). It returns only when no transfer or rollback runs any more, a straggler's included
        (docs/decisions.md, "Stragglers leave the cycle": its result is decided when it arrives, after
        the cycle it left may have ended, and no process ends while one of its transfers writes)."""
        pending = collections.deque(effects)
        running: dict[cf.Future, object] = {}
        held = _SourceSlots({one.name: one.parallel for one in self.config.sources if one.parallel is not None})
        asked: set[str] = set()  # replicas already named in a StragglerDue
        self._abort.clear()
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.config.parallel, thread_name_prefix="coalesce")
        pool = self._pool
        try:
            while pending or running:
                while pending:
                    eff = pending.popleft()
                    if isinstance(eff, fx.CONCURRENT):
                        if held.admit(eff):
                            running[pool.submit(self._run_concurrent, eff)] = eff
                    else:
                        pending.extend(self._decide_batch([self._run_inline(eff)]))
                if running:
                    done, _ = cf.wait(
                        running, timeout=self._straggler_wait(running, asked), return_when=cf.FIRST_COMPLETED
                    )
                    results: list[object] = []
                    for fut in done:
                        nxt = held.release(running.pop(fut))
                        if nxt is not None:
                            running[pool.submit(self._run_concurrent, nxt)] = nxt
                        results.append(fut.result())  # re-raises SimulatedCrash
                    if not done:
                        results = self._stragglers(running, asked)
                    pending.extend(self._decide_batch(results))
        except BaseException:
            self._abort.set()
            for fut in running:  # those not started never start; the others end (aborted) before this returns
                fut.cancel()
            cf.wait(running)
            raise

    def _running_updates(self, running: dict[cf.Future, object], asked: set[str]) -> list[str]:
        """The replicas whose update runs in the cycle (state ``update``) and was not named yet."""
        names = {eff.replica for eff in running.values() if isinstance(eff, fx.Transfer)}
        return sorted(n for n in names - asked if (r := self.state.replicas.get(n)) is not None and r.state == "update")

    def _straggler_wait(self, running: dict[cf.Future, object], asked: set[str]) -> float | None:
        """Seconds until the updates that run become stragglers (``[group] straggler_after`` past the
        cycle's start, by the agent's clock); None: wait for a result, however long."""
        after = self.state.straggler_after
        if after is None or self.state.phase != "updating" or not self._running_updates(running, asked):
            return None
        return max(0.0, self.state.cycle_started + after - self.clock())

    def _stragglers(self, running: dict[cf.Future, object], asked: set[str]) -> list[object]:
        """``StragglerDue`` for every update still running once its cycle is ``straggler_after`` old
        (the planner decides again from the same times); their transfers go on in the pool."""
        now = self.clock()
        if not straggler_due(self.state.cycle_started, self.state.straggler_after, now):
            return []
        names = self._running_updates(running, asked)
        asked.update(names)
        return [ev.StragglerDue(replica=name, now=now) for name in names]

    # -- effects ----------------------------------------------------------------
    def _run_inline(self, eff: object) -> object:
        now = self.clock
        if isinstance(eff, fx.TakeSourcePcpi):
            if any(sp.taken for sp in map(self.state.source_pcpis.get, self.state.cycle_targets.values()) if sp):
                crashpoints.hit("between_source_pcpis")  # an earlier source's take of this cycle was recorded
            try:
                source = self.source_volume(eff.source)
                source.snapshot_create(eff.name)
            except VolumeInUse as exc:  # a configuration to fix: its own message, hint and exit code
                self.refusals.append(exc)
                self.taken_sources[eff.source] = False
                self._seen[eff.source] = per_source.Seen(at=now(), reachable=False, error=_describe(exc))
                return ev.SourcePcpiRefused(name=eff.name, now=now(), error=_describe(exc), source=eff.source)
            except REFUSED as exc:
                what = f"the source {self._source_url(eff.source)} could not be reached or refused PCPI {eff.name}"
                error = self._refused(what, exc, SOURCE_HINT)
                self.refused_sources.append(eff.source)
                self.taken_sources[eff.source] = False
                self._seen[eff.source] = per_source.Seen(at=now(), reachable=False, error=error)
                return ev.SourcePcpiRefused(name=eff.name, now=now(), error=error, source=eff.source)
            self.taken_sources[eff.source] = True
            taken_at = now()
            self._seen[eff.source] = per_source.Seen(at=taken_at, reachable=True)
            self.pm.hook.coalesce_pcpi_taken(
                group=self.state.name, volume=str(source.url), name=eff.name, role="source"
            )
            crashpoints.hit("after_source_pcpi")
            return ev.SourcePcpiTaken(name=eff.name, now=taken_at, source=eff.source)
        if isinstance(eff, fx.ReleaseSourcePcpi):
            if eff.source not in {one.name for one in self.config.sources}:
                # its [[source]] table was removed: no URL to release it with; kept and reported
                # (removed_source_pcpis), not a refusal of a source the group still has
                error = f"source {eff.source!r} is no longer in {self.config.path or 'the config'}"
                return ev.SourcePcpiNotReleased(name=eff.name, error=error, source=eff.source)
            try:
                source = self.source_volume(eff.source)
                source.snapshot_delete(eff.name)
            except REFUSED as exc:
                what = f"the source {self._source_url(eff.source)} could not release PCPI {eff.name}"
                error = self._refused(what, exc, "a later cycle releases it")
                self.refused_sources.append(eff.source)
                self._seen[eff.source] = per_source.Seen(at=now(), reachable=False, error=error)
                return ev.SourcePcpiNotReleased(name=eff.name, error=error, source=eff.source)
            self.pm.hook.coalesce_pcpi_released(group=self.state.name, volume=str(source.url), name=eff.name)
            return ev.SourcePcpiReleased(name=eff.name, source=eff.source)
        if isinstance(eff, fx.TakePcpi):
            try:
                self.dest.snapshot_create(eff.name)
            except REFUSED as exc:
                what = f"the destination {self.config.destination} refused the {eff.role} PCPI {eff.name}"
                return ev.PcpiRefused(name=eff.name, now=now(), error=self._refused(what, exc, DEST_HINT))
            if self._stats is not None:
                self._stats.taken.append(eff.name)
            self.pm.hook.coalesce_pcpi_taken(
                group=self.state.name, volume=str(self.dest.url), name=eff.name, role=eff.role
            )
            crashpoints.hit("after_pcpi_taken")
            if eff.role in ("rollback", "jump_ahead", "new_base", "kept"):
                crashpoints.hit(f"after_{eff.role}_pcpi")
            return ev.PcpiTaken(name=eff.name, now=now())
        if isinstance(eff, fx.ReleasePcpi):
            self.dest.snapshot_delete(eff.name)
            if self._stats is not None:
                self._stats.released.append(eff.name)
            self.pm.hook.coalesce_pcpi_released(group=self.state.name, volume=str(self.dest.url), name=eff.name)
            pcpi = self.state.pcpis.get(eff.name)
            if pcpi is not None and pcpi.role == "kept":
                crashpoints.hit("after_kept_release")
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

    def _run_concurrent(self, eff: object) -> object:
        t0 = self.clock()
        if isinstance(eff, fx.Transfer):

            def progress(records: int, nbytes: int) -> None:
                self.pm.hook.coalesce_transfer_progress(
                    group=self.state.name, replica=eff.replica, records=records, nbytes=nbytes
                )

            try:
                moved = run_transfer(  # from the volume of the replica's own source
                    eff,
                    self.source_volume(eff.origin),
                    self.dest,
                    spool=self.spool_for(eff.origin),
                    verify=self.config.verify,
                    progress=progress,
                    aborted=self._abort.is_set,
                    privileges=self.config.privileges,
                    limits=self.config.limits_for(eff.origin),
                )
                if moved.verified and eff.base is None:
                    self._verified[eff.replica] = {"at": self.clock(), "ok": True, "error": ""}
            except Exception as exc:
                return ev.TransferDone(replica=eff.replica, ok=False, now=self.clock(), error=_describe(exc))
            finally:
                if self._stats is not None:
                    self._stats.seconds[eff.replica] = self.clock() - t0
            if self._stats is not None:
                self._stats.records += moved.records
                self._stats.nbytes += moved.nbytes
            return ev.TransferDone(
                replica=eff.replica, ok=True, now=self.clock(), records=moved.records, nbytes=moved.nbytes
            )
        if isinstance(eff, fx.Rollback):
            try:
                with crashpoints.during("mid_retry" if eff.retry else "mid_rollback"):
                    self.dest.rollback(eff.replica, eff.from_pcpi, eff.to_pcpi)
                if eff.retry:
                    error = self._rolled_back_differs(eff.replica, eff.to_pcpi)
                    if error:
                        return ev.RollbackDone(replica=eff.replica, ok=False, now=self.clock(), error=error)
            except Exception as exc:
                return ev.RollbackDone(replica=eff.replica, ok=False, now=self.clock(), error=_describe(exc))
            return ev.RollbackDone(replica=eff.replica, ok=True, now=self.clock())
        raise TypeError(f"not a concurrent effect: {eff!r}")

    def _rolled_back_differs(self, replica: str, restored: str) -> str:
        """A retry's or resync's rolled-back active FS against the PCPI it restored, without content
        (docs/decisions.md, "Resync fences first"): "" when equal, else the first difference (a
        writer that kept a file of a broken replica open wrote after the scratch PCPI)."""
        outcome = verifier.compare_trees(
            self.dest,
            replica,
            restored,
            self.dest,
            replica,
            None,
            content=False,
            holds=self.dest.describe_holds(),
            limit=1,
        )
        if outcome.ok:
            return ""
        return "the rolled-back active FS differs: " + outcome.differences[0].explain(restored, side="PCPI")

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
            "failed": dict(sorted(st.failed.items())) if st else {},
            "records": st.records if st else 0,
            "bytes": st.nbytes if st else 0,
            "states": s.state_counts(),
            "max_lag_seconds": _max_lag(s, ended),
        }
        # I5's high-water marks (spec/invariants.md), read by `coalesce check`, which writes nothing; each
        # source's record of this cycle (coalesce_core/sources.py), read by `status`: advisory, not write-ahead
        marks = i5_marks(self.ledger.note("i5_marks") or {}, s)
        seen, self._seen = per_source.seen_to_note(self.ledger.note("sources"), self._seen), {}
        self.ledger.record_cycle(report, notes={"i5_marks": marks, "sources": seen})
        # observers (metrics) also get every replica's and every source's health; the history row stays small
        health = self.source_health(s, per_source.seen_from_note(seen), ended)
        self.pm.hook.coalesce_cycle_finished(
            group=s.name,
            report={**report, "replicas": replica_health(s, ended), "sources": [h.data() for h in health]},
        )
        self._stats = None

    def source_health(
        self, state: GroupState | None = None, seen: dict[str, per_source.Seen] | None = None, now: float | None = None
    ) -> list[per_source.SourceHealth]:
        """Each source of the config (then any a replica of ``state`` still comes from) as `status` and the
        metrics show it (coalesce_core/sources.py); ``seen`` defaults to the ledger's note ``sources``."""
        records = per_source.seen_from_note(self.ledger.note("sources")) if seen is None else seen
        intervals = {one.name: one.interval for one in self.config.sources}
        return per_source.source_health(state or self.state, intervals, records, self.clock() if now is None else now)

    # -- requests -----------------------------------------------------------------
    def recover(self, reach_source: bool = True) -> None:
        """Reconcile the ledger with the volumes and finish or undo what was in flight.

        Only the destination is needed: a source that cannot be reached (every source, with
        ``reach_source`` False) leaves the ledger's PCPIs of that source as they are, for a later
        recovery to settle, and no update of it resumes from its spool; the sources reached are
        settled now.  A ledger behind its volumes (older than they are, or PCPIs of it removed) is
        first made to match them (coalesce_core/cycle/restore.py); what that did is logged and kept
        in :attr:`restored`.  Restoring an older ledger compares the images with their sources, so it
        asks every source even when ``reach_source`` is False, and raises BackendError, changing
        nothing, when one cannot be reached."""
        group = self.state.name
        dest = frozenset(n for n in self.dest.snapshot_list() if is_group_pcpi(group, n))
        src = self._source_pcpis() if reach_source else {}
        examined = restore.examine(self.state, dest, src)
        if examined.needed:
            if examined.stale and len(src) < len(self.config.sources):
                src = self._source_pcpis()
                missing = [s.name for s in self.config.sources if s.name not in src]
                if missing:
                    urls = ", ".join(self._source_url(name) for name in missing)
                    raise BackendError(
                        f"the ledger of group {group!r} is older than its volumes (they hold PCPIs up to number "
                        f"{examined.newest}, the ledger's last is {self.state.seq}), and restoring it compares "
                        f"each replica's image with its source, which cannot be reached: {urls}",
                        hint="bring the source back (or `coalesce serve` on its host) and run `coalesce run`; "
                        'nothing was changed (docs/operations.md, "Backing up the ledger")',
                    )
            views = (
                {name: privileges.view(self.source_volume(name), self.config.privileges) for name in src}
                if examined.stale
                else None
            )
            facts = restorer.survey(self.state, views, self.dest, dest, src)
            decision, self.restored = restore.reconcile(self.state, facts)
            self._commit([(facts, decision)])  # the ledger only: it has no effects
            if examined.stale:
                self.restored += self._withdraw_old_requests()
            for line in self.restored:
                restorer.log.warning("%s", line)
        spooled = self._spooled(frozenset(src))
        self.handle(ev.Recover(now=self.clock(), destination_pcpis=dest, source_pcpis=src, spooled=spooled))

    def _withdraw_old_requests(self) -> list[str]:
        """An older ledger's pending requests are withdrawn: the verbs that asked them stopped waiting
        long ago (and said so), and a request never takes effect after that (coalesce_core.requests)."""
        lines = []
        for req in self.ledger.requests(pending=True):
            if self.ledger.withdraw(req.id, self.clock()):
                lines.append(
                    f"{req.describe()}: pending in the older ledger, withdrawn (ask again if it is still wanted)"
                )
        return lines

    def _source_pcpis(self) -> dict[str, frozenset[str]]:
        """The group's source PCPIs each source of the config holds, by source name; a source that
        cannot be reached is absent (what it holds is not known: coalesce_core.cycle.events.Recover)."""
        out = {}
        for one in self.config.sources:
            try:
                names = self.source_volume(one.name).snapshot_list()
            except REFUSED:
                continue
            out[one.name] = frozenset(n for n in names if is_group_source_pcpi(self.state.name, n))
        return out

    def _spooled(self, reached: frozenset[str]) -> frozenset[str]:
        """Replicas in update whose spool holds their running update (of the ``reached`` sources only:
        the others' are rolled back without resuming); other spools are stale, except those of a
        source not reached, which a later recovery settles."""
        out, keep = set(), set()
        for r in self.state.replicas.values():
            if r.origin not in reached:
                keep.add(r.name)
                continue
            spool = self.spool_for(r.origin)
            if (
                spool is not None
                and r.state == "update"
                and r.active_point is not None
                and r.target is not None
                and spool.holds(r.name, Begin(qtree=r.source_qtree, base=r.active_point, target=r.target))
            ):
                out.add(r.name)
            if r.resume:
                keep.add(r.name)
        if self._spool is not None:
            for name in self._spool.replicas():
                if name not in out | keep:
                    self._spool.discard(name)
        return frozenset(out)

    def tick(self) -> None:
        """Run the rollback retries that are due (loop 1026)."""
        self.handle(ev.Tick(now=self.clock()))

    def _due(self, now: float) -> frozenset[str] | None:
        """The sources whose ``interval`` has passed at ``now`` since the start of the cycle that took
        their last PCPI (StartCycle's ``due``); None when no source sets an interval (every one is due)."""
        if all(one.interval is None for one in self.config.sources):
            return None
        taken = self.state.source_taken
        return frozenset(one.name for one in self.config.sources if one.due(taken.get(one.name), now))

    def _room(self, names: Iterable[str]) -> dict[str, Any]:
        """How many more PCPIs each volume that declares a limit can take (StartCycle's rooms): the
        destination's, and the least of the sources' ``names`` (those the cycle takes a PCPI of), with
        the name of the source that has it (the first such in ``names``)."""
        room: dict[str, Any] = {}
        limit = self.dest.max_pcpis
        if limit is not None:
            room["destination_room"] = limit - len(self.dest.snapshot_list())
        rooms: dict[str, int] = {}
        for name in names:
            try:
                source = self.source_volume(name)
                limit = source.max_pcpis
                if limit is not None:
                    rooms[name] = limit - len(source.snapshot_list())
            except REFUSED:
                pass  # a source that cannot be reached: the take of its PCPI of the cycle says so
        if rooms:
            least = min(rooms, key=lambda name: rooms[name])
            room["source_room"] = rooms[least]
            room["least_room_source"] = least
        return room

    def run_cycle(self) -> dict[str, Any]:
        """One whole coalescing cycle; returns its history row ({} when it could not start: no PCPI
        headroom, see :attr:`refusals`)."""
        before = self.state.cycle
        due = self._due(self.clock())
        names, waiting = cycle_sources(self.state, self.clock(), due)
        if waiting and not names:  # no source is due (each one's `interval`): no cycle, nothing taken
            return {}
        room = self._room(names)
        short = pcpi_shortfall(room.get("destination_room"), room.get("source_room"), room.get("least_room_source"))
        if short:
            self.refusals.append(
                BackendError(f"not starting cycle {before + 1} of group {self.state.name!r}: {short}", hint=ROOM_HINT)
            )
            self._note_not_started(names, f"cycle not started: {short}")
        self.handle(ev.StartCycle(now=self.clock(), due=due, **room))
        self._background_verification()
        last = self.ledger.last_cycle()  # not the whole history: a year of hourly cycles is 8,760 rows
        return last if last is not None and last["cycle"] > before else {}

    def _note_not_started(self, names: Iterable[str], error: str) -> None:
        """The cycle did not start for want of PCPIs: each source it would have taken a PCPI of records
        ``error`` (which names the short volume) in the note ``sources``; a note that cannot be written
        is left as it was (advisory: it never holds a cycle back)."""
        at = self.clock()
        seen = {name: per_source.Seen(at=at, reachable=True, error=error) for name in names}
        try:
            self.ledger.update_note("sources", lambda old: per_source.seen_to_note(old, seen))
        except (MetadataError, sqlite3.Error):
            pass

    def run_once(self) -> dict[str, Any]:
        """Due retries, then one cycle (what `coalesce run --once` does).

        ``self.failures`` then lists every failure decided meanwhile (a re-seed may
        end after the cycle's history row was written: it is listed here too), ``self.refusals``
        every PCPI a volume refused and every source it could not reach."""
        self.failures = []
        self.refusals = []
        self.refused_sources = []
        self.taken_sources = {}
        self.take_requests()
        self.tick()
        report = self.run_cycle()
        self.take_requests()  # those asked during the cycle, before a `run --once` ends
        return report

    def take_requests(self) -> list[requests.Request]:
        """Decide the pending requests of the queue, oldest first, and run what each leads to
        (coalesce_core.requests); only at a safe point (between cycles).  Each answer is committed
        with its decision; a refused request is answered with its error.  Returns the answers."""
        answers = []
        for req in self.ledger.requests(pending=True):
            try:
                event = self._with_room(requests.event_for(req))
                if isinstance(event, ev.AddReplica):
                    origin = req.args.get("from")  # `add --from`: a source of this agent's config
                    origin = self.config.source_named(origin).name if origin else self._origin(event.name)
                    event = attrs.evolve(event, origin=origin)
                d = decide(self.state, event)
            except (CoalesceError, KeyError, ValueError) as exc:  # a malformed request: refused, not fatal
                if not isinstance(exc, CoalesceError):
                    exc = NotNow(f"{req.describe()} cannot be decided: {exc!r}", hint="check the verb's arguments")
                answer = requests.refused(req, self.clock(), exc)
                try:
                    self.ledger.answer(answer)
                except RequestGone:
                    continue
                answers.append(answer)
                continue
            answer = requests.done(req, self.clock(), d.state.replicas)
            try:
                effects = self._commit([(event, d)], answered=answer)
            except RequestGone:
                continue  # withdrawn by its verb meanwhile: nothing was committed
            answers.append(answer)
            self._drive(effects)
        return answers

    def run_forever(
        self,
        interval: float,
        *,
        cycle: Callable[[], dict[str, Any]] | None = None,
        on_cycle: Callable[[dict[str, Any]], None] = lambda report: None,
        on_error: Callable[[BackendError, float], None] = lambda exc, wait: None,
        sleep: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
        poll: float | None = None,
    ) -> None:
        """`coalesce run`: ``cycle`` (default :meth:`run_once`) every ``interval`` seconds until
        ``stop`` is set (checked between cycles, the safe point: a cycle is never cut short by it;
        the wait ends at once) or a callback raises. A BackendError outside a transfer (a PCPI
        take or release, an export, the link) does not end the run: ``on_error(exc, interval)``,
        and the next attempt first recovers what the failed cycle left in flight, exactly as after
        a restart (the ledger holds the last decision).  With ``poll``, the wait is cut into
        slices of at most ``poll`` seconds, and the requests queued meanwhile
        (coalesce_core.requests) are taken after each slice."""
        run = cycle or self.run_once
        pause: Callable[[float], object] = sleep or (stop.wait if stop is not None else time.sleep)
        failed = False

        def wait() -> None:
            nonlocal failed
            if poll is None:
                pause(interval)
                return
            end = time.monotonic() + interval
            while (left := end - time.monotonic()) > 0 and (stop is None or not stop.is_set()):
                pause(min(left, poll))
                try:  # on the committed state: after a failed cycle, what it left stays for recovery
                    self.take_requests()
                except BackendError as exc:
                    failed = True
                    on_error(exc, max(0.0, end - time.monotonic()))

        while stop is None or not stop.is_set():
            try:
                if failed:
                    self.recover()
                    failed = False
                report = run()
            except BackendError as exc:
                failed = True
                on_error(exc, interval)
            else:
                on_cycle(report)
            if stop is not None and stop.is_set():
                break
            wait()

    def add_replica(self, name: str, source_qtree: str | None = None, origin: str | None = None) -> None:
        """``coalesce add``: replica ``name`` of qtree ``source_qtree`` (default: ``name``) of the source
        named ``origin`` (default: :meth:`_origin`; a ConfigError when the config has no such source)."""
        origin = self.config.source_named(origin).name if origin else self._origin(name)
        self.handle(ev.AddReplica(name=name, source_qtree=source_qtree or name, origin=origin))

    def _origin(self, replica: str) -> str:
        """The name of the source replica ``replica`` comes from: its ``from`` in the config, or the
        group's one source for a replica the config does not list yet (`coalesce add`)."""
        for rc in self.config.replicas:
            if rc.name == replica:
                return rc.origin
        return self.config.sole_source().name

    def remove_replica(self, name: str) -> None:
        """``coalesce remove``: the replica leaves the group between cycles; its data stay."""
        self.handle(ev.RemoveReplica(replica=name))

    def break_mirror(self, name: str) -> None:
        self.handle(ev.BreakMirror(replica=name))

    def resync(self, name: str, discard: bool = False) -> None:
        """``coalesce resync``: back to the last good image; unless ``discard``, the broken replica's
        writes are kept in a PCPI until :meth:`release_kept` (docs/decisions.md, "Resync fences first")."""
        self.handle(ev.Resync(replica=name, discard=discard))

    def release_kept(self, name: str) -> None:
        """``coalesce release``: delete the PCPI that keeps the writes replica ``name`` had when it was
        resynced (a removed replica's too); never asks the source."""
        self.handle(ev.ReleaseKept(replica=name))

    def pin(self, generation: str, pinned: bool = True) -> None:
        """``coalesce pin`` (``unpin``: ``pinned`` False): exempt retained generation ``generation``
        (an id, an ISO time or ``latest``, coalesce_core.cycle.refs) from pruning, or no longer."""
        self.handle(ev.PinGeneration(generation=generation, pinned=pinned))

    def reseed(self, name: str, reason: str) -> None:
        """Re-seed replica ``name`` (``coalesce reseed``, the background verification).

        It leaves the cycle at once, keeps exporting its last good image (pinned as its
        individual PCPI), and the next cycle rebuilds its active FS by a baseline transfer;
        it rejoins at a jump-ahead after that.  Nothing happens if a re-seed is already
        under way.  Only between cycles (NotNow otherwise, and for replicas that cannot
        be re-seeded: uninitialized, broken, mid-retry); ``reason`` is shown in `status`."""
        self.handle(ev.Reseed(replica=name, reason=reason))

    # -- verification (coalesce_core.verifier) ---------------------------------------
    def verification_times(self) -> dict[str, dict[str, Any]]:
        """{replica: {"at", "ok", "error"}}: each replica's last full verification."""
        return verifier.load_times(self.ledger)

    def _background_verification(self) -> None:
        """After a cycle: record the baselines verified in it, then, with ``[group] verify_every``,
        verify the one replica that is due (coalesce_core.verify.due_for_verification) in full;
        a difference asks for a re-seed of that replica.  A volume error leaves it for a later
        cycle; nothing here fails the cycle."""
        pending, self._verified = self._verified, {}
        names = list(self.state.replicas)
        every = self.config.verify_every
        if not every:
            if pending:
                verifier.save_times(self.ledger, pending, names)
            return
        times = {**self.verification_times(), **pending}
        candidates = sorted(
            r.name
            for r in self.state.replicas.values()
            if r.state in ("stable", "stable_uncoalesced") and verifier.verifiable(r)
        )
        name = verify.due_for_verification({k: v["at"] for k, v in times.items()}, candidates, every, self.clock())
        if name is None:
            if pending:
                verifier.save_times(self.ledger, pending, names)
            return
        r = self.state.replicas[name]
        try:
            source = privileges.view(self.source_volume(r.origin), self.config.privileges)
            outcome = verifier.verify_export(source, self.dest, r, content=True, limit=1)
        except CoalesceError as exc:
            pending[name] = {
                "at": times.get(name, {}).get("at", 0.0),
                "ok": None,
                "error": f"not verified: {_describe(exc)}",
            }
            verifier.save_times(self.ledger, pending, names)
            return
        error = "" if outcome.ok else outcome.differences[0].explain(r.source_point or "?")
        pending[name] = {"at": self.clock(), "ok": outcome.ok, "error": error}
        verifier.save_times(self.ledger, pending, names)
        if not outcome.ok:
            try:
                self.reseed(name, f"background verification: {error}")
            except CoalesceError:
                pass  # a replica that cannot be re-seeded now is found again by a later verification

    def removed_source_pcpis(self) -> dict[str, tuple[str, ...]]:
        """The source PCPIs the ledger holds on sources the config no longer names, by source: they
        wait until the source's [[source]] table is back, when a cycle's release step releases those
        no replica needs (docs/config.md, "Removing a source")."""
        return removed_sources(self.config, {n: sp.source for n, sp in self.state.source_pcpis.items()})

    def source_outcome(self) -> outcome.SourceOutcome:
        """What the cycles since the last `run_once` began came to per source (coalesce_core.outcome)."""
        return outcome.source_outcome(
            self.taken_sources,
            {r.name: r.origin for r in self.state.replicas.values()},
            self.failures,
            self.refused_sources,
            len(self.refusals) - len(self.refused_sources),
        )

    def all_stable(self) -> bool:
        return all(r.state == "stable" for r in self.state.replicas.values())

    def export_path(self, replica: str) -> str | None:
        return self.dest.export_path(replica)

    def generation_paths(self, state: GroupState | None = None) -> dict[str, dict[str, str | None]]:
        """Where each replica's image in each retained generation of ``state`` (default: the agent's) is
        readable, by PCPI name then replica; None: the backend has no path for it (hook
        ``coalesce_pcpi_path``: btrfs and OpenZFS have one, mem, sim and zfs-fuse none)."""
        st = state or self.state
        return {p.name: {r: self.dest.pcpi_path(p.name, r) for r in sorted(st.replicas)} for p in st.generations()}

    def kept_paths(self, state: GroupState | None = None) -> dict[str, str | None]:
        """Where each kept PCPI of ``state`` (default: the agent's) shows its owner's qtree, by PCPI
        name; None: the backend has no path for it (hook ``coalesce_pcpi_path``)."""
        pcpis = (state or self.state).pcpis.values()
        return {
            p.name: self.dest.pcpi_path(p.name, sorted(p.owners)[0]) if p.taken and p.owners else None
            for p in pcpis
            if p.role == KEPT
        }


def replica_health(s: GroupState, now: float) -> dict[str, dict[str, Any]]:
    """Per replica: its source's name, state, last error, failures in a row, last success, and the lag
    (age of the exported source point, None when it is not known)."""
    out = {}
    for r in sorted(s.replicas.values(), key=lambda r: r.name):
        lag = s.lag(r, now)
        out[r.name] = {
            "source": r.origin,
            "state": r.state,
            "last_error": r.last_error,
            "consecutive_failures": r.consecutive_failures,
            "last_success": r.last_success,
            "source_point_time": s.source_point_time(r),
            "lag_seconds": None if lag is None else round(lag, 6),
        }
    return out


def _max_lag(s: GroupState, now: float) -> float | None:
    lags = [lag for r in s.replicas.values() if (lag := s.lag(r, now)) is not None]
    return round(max(lags), 6) if lags else None


#: the states of a straggler outside the cycle (its transfer running, or its update arrived)
_STRAGGLING = ("update_uncoalesced", "done_uncoalesced")


def _straggler_points(old: GroupState, new: GroupState, log: Iterable[Transition]) -> None:
    """Pass the crash points of a straggler's way out of the cycle and back (coalesce_core/crashpoints.py)
    that the commit from ``old`` to ``new`` (with transitions ``log``) made."""
    triggers = {(t.trigger, t.source) for t in log if t.replica is not None}
    if any(trigger == "straggle" for trigger, _s in triggers):
        crashpoints.hit("after_straggle")
    # the PCPIs (retained generations among them) are looked at only when a replica straggles
    straggling = any(r.state in _STRAGGLING for r in new.replicas.values())
    for name, p in new.pcpis.items() if straggling else ():
        before = old.pcpis.get(name)
        if p.role == INDIVIDUAL and (before is None or before.role != INDIVIDUAL):
            if any((r := new.replicas.get(o)) is not None and r.state in _STRAGGLING for o in p.owners):
                crashpoints.hit("after_straggler_individual_pcpi")
                break
    if any(trigger == "straggler_succeeded" for trigger, _s in triggers):
        crashpoints.hit("after_straggler_succeeded")
    if ("jump_ahead", "done_uncoalesced") in triggers:
        crashpoints.hit("after_straggler_rejoins")


def _describe(exc: BaseException) -> str:
    """The text of a failure as the ledger keeps it (``last_error``): one line, bounded, a peer's
    control characters shown as escapes (coalesce_core.ui.peertext), whatever the error held."""
    hint = getattr(exc, "hint", "")
    text = f"{type(exc).__name__}: {exc}"
    return clean(f"{text} ({hint})" if hint else text)
