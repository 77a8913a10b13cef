"""The pure planner: ``decide(state, event) -> Decision(state, effects, log)``.

Sans-I/O: no clock, no disk, no backend.  The management agent (the
executor) persists ``Decision.state`` before it runs ``Decision.effects``
(write-ahead) and feeds each effect's result back as an event.  Every
replica state change goes through the spec-built machine
(coalesce_core.cycle.machines), so an illegal one raises IllegalTransition (I8).

The group procedures, in the patent's words:

* cycle start: ONE PCPI of each source that has replicas in the cycle; once a
  source's PCPI is taken, every stable replica of that source starts an update
  to it, every uninitialized one a baseline (concurrently, in the executor's pool);
* rollback (Fig. 9): when every transfer ended, ONE rollback PCPI for all
  replicas in rollback (step 1120), then per replica the changes between it
  and the exported coalesced base are applied (1130-1140);
* two-step jump-ahead (1032): intermediate PCPI, purge purgatory, new
  coalesced base PCPI, one atomic export switch of every participant
  (stable, done, the replicas waiting outside the cycle), then release what nobody needs;
* leaving the cycle: the PCPI holding the last good image is pinned as the
  replica's individual PCPI; retries with backoff take a scratch PCPI of
  the damaged active FS and roll back from it;
* re-seed: a replica whose updates failed ``reseed_after`` times in a row (or
  that ``Reseed`` names) leaves the cycle after its rollback, keeps exporting
  its last good image (pinned), and at a later cycle start its active FS is
  rebuilt by a baseline transfer from that cycle's source PCPI; the re-seed
  does not hold the jump-ahead, and the replica rejoins at a jump-ahead after
  it arrived (docs/decisions.md);
* recovery: ``Recover`` reconciles the ledger with the PCPIs the volumes
  really hold and finishes or undoes what was in flight (DESIGN §2); an
  update with a spool of received records is rolled back, then restarts in
  the same cycle from the spool (``resume_updates``);
* stragglers (docs/decisions.md, "Stragglers leave the cycle"): with
  ``straggler_after``, an update still in flight that long after the cycle
  started leaves the cycle on ``StragglerDue`` (``straggle``: its exported
  image pinned as its individual PCPI) and no longer holds the jump-ahead;
  its transfer goes on, and when it ends the replica waits for a later
  jump-ahead (``done_uncoalesced``) or takes the rollback retries of loop 1026
  (``unstable_uncoalesced``).  Like a re-seed's, its result may be decided in
  any phase: the executor decides a concurrent result only after the inline
  effects of the decisions before it ran, so never between a jump-ahead's
  PCPIs and its export switch;
* refusals (docs/decisions.md, "Refused PCPIs and source outages"): a source
  that cannot be reached or refuses its PCPI of the cycle makes its replicas miss
  the cycle, unchanged, while the other sources' go on; when every source does,
  the cycle ends before any transfer (``source_unavailable``); a refused
  rollback PCPI fails the rollbacks that needed it (1022), a refused
  jump-ahead or new base PCPI sends the replicas in done out of the cycle
  (``jump_ahead_refused``) and the cycle finishes for the rest; a cycle does
  not start without the PCPIs it may need (``pcpi_shortfall``).
"""

# crosshair: on

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import attrs

from coalesce_core.cycle import effects as fx
from coalesce_core.cycle import events as ev
from coalesce_core.cycle import generations as gen
from coalesce_core.cycle import guards
from coalesce_core.cycle.machines import Model, default_model
from coalesce_core.cycle.state import ACTIVE, GENERATION, KEPT, GroupState, Pcpi, Replica, SourcePcpi
from coalesce_core.errors import CoalesceError


@attrs.frozen
class Transition:
    """One logged state change: ``replica`` None means the agent's phase."""

    replica: str | None
    trigger: str
    source: str
    dest: str


@attrs.frozen(hash=False)
class Decision:
    state: GroupState
    effects: tuple = ()
    log: tuple[Transition, ...] = ()


class NotNow(CoalesceError):
    """A request that the agent cannot take in its current phase or state."""

    exit_code = 6


def pcpi_prefix(group: str) -> str:
    """Every PCPI the group takes starts with this."""
    return f"co-{group}-"


def source_prefix(group: str) -> str:
    return f"co-{group}-src-"


def is_group_pcpi(group: str, name: str) -> bool:
    """True for a destination PCPI name this group makes: ``co-<group>-<6 digits>-<role>``, or
    ``co-<group>-<6 digits>-kept-<replica>`` (:func:`kept_name`).

    Exact, so group ``g`` never claims ``co-g-x-000002-base`` of group ``g-x``."""
    return re.fullmatch(rf"co-{re.escape(group)}-\d{{6}}-(?:[a-z_]+|kept-[A-Za-z0-9_.-]+)", name) is not None


#: the longest PCPI name a kept PCPI gets (ZFS snapshot names: 121 characters after the '@')
KEPT_NAME_MAX = 120


def kept_name(group: str, seq: int, replica: str) -> str:
    """The name of a kept PCPI: ``co-<group>-<seq>-kept-<replica>``, the replica's name cut so the
    whole stays within KEPT_NAME_MAX characters (the ledger holds the replica; the name is for people)."""
    head = f"{pcpi_prefix(group)}{seq:06d}-kept-"
    return head + replica[: max(1, KEPT_NAME_MAX - len(head))]


def is_group_source_pcpi(group: str, name: str) -> bool:
    """True for a source PCPI name this group makes: ``co-<group>-src-<6 digits>``."""
    return re.fullmatch(rf"co-{re.escape(group)}-src-\d{{6}}", name) is not None


class _Plan:
    """A local, mutable accumulator used inside one ``decide`` call only."""

    def __init__(self, state: GroupState, model: Model) -> None:
        self.base_state = state
        self.model = model
        self.replicas = dict(state.replicas)
        self.pcpis = dict(state.pcpis)
        self.source_pcpis = dict(state.source_pcpis)
        self.manifests = state.manifests  # never changed in place: set_manifest makes a new mapping
        self.fields: dict[str, Any] = {}
        self.effects: list = []
        self.log: list[Transition] = []

    # -- reading ------------------------------------------------------------
    def get(self, field: str):
        return self.fields.get(field, getattr(self.base_state, field))

    def state(self) -> GroupState:
        """The state so far. Its manifests are those of the PCPIs it holds (one lives as long as its
        PCPI): the same mapping as the base state's while no manifest changed or went, so the
        ledger writes none (a state is rebuilt many times a decision: O(generations) only when
        one went)."""
        manifests = self.manifests
        if not manifests.keys() <= self.pcpis.keys():
            manifests = {n: m for n, m in manifests.items() if n in self.pcpis}
        return attrs.evolve(
            self.base_state,
            replicas=self.replicas,
            pcpis=self.pcpis,
            source_pcpis=self.source_pcpis,
            manifests=manifests,
            **self.fields,
        )

    def replica(self, name: str) -> Replica:
        try:
            return self.replicas[name]
        except KeyError:
            raise NotNow(
                f"group {self.base_state.name!r} has no replica {name!r}",
                hint="`coalesce status` lists the replicas; `coalesce add NAME` adds one",
            ) from None

    def in_state(self, *states: str) -> list[Replica]:
        return [r for r in sorted(self.replicas.values(), key=lambda r: r.name) if r.state in states]

    def role(self, role: str) -> Pcpi | None:
        for p in self.pcpis.values():
            if p.role == role and not p.releasing:
                return p
        return None

    # -- changing -----------------------------------------------------------
    def set_manifest(self, name: str, manifest: gen.Manifest) -> None:
        """Record the manifest of PCPI ``name`` (in a new mapping: the base state's is shared)."""
        self.manifests = {**self.manifests, name: manifest}

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def update(self, r: Replica, **changes: Any) -> Replica:
        new = attrs.evolve(r, **changes)
        self.replicas[r.name] = new
        return new

    def fire(self, r: Replica, trigger: str, **changes: object) -> Replica:
        dest = self.model.replica_next(r.name, r.state, trigger)
        self.log.append(Transition(r.name, trigger, r.state, dest))
        return self.update(r, state=dest, **changes)

    def phase(self, trigger: str) -> None:
        state = self.state()
        dest = self.model.agent_next(state, trigger)
        self.log.append(Transition(None, trigger, state.phase, dest))
        self.set(phase=dest)

    def may(self, trigger: str) -> bool:
        return self.model.agent_may(self.state(), trigger)

    def emit(self, effect: object) -> None:
        self.effects.append(effect)

    def new_name(self, kind: str) -> str:
        seq = self.get("seq") + 1
        self.set(seq=seq)
        if kind == "src":
            return f"{source_prefix(self.base_state.name)}{seq:06d}"
        return f"{pcpi_prefix(self.base_state.name)}{seq:06d}-{kind}"

    def take(self, role: str, owners: Iterable[str] = ()) -> str:
        owners = frozenset(owners)
        if role == KEPT:
            (replica,) = owners
            self.new_name(role)
            name = kept_name(self.base_state.name, self.get("seq"), replica)
        else:
            name = self.new_name(role)
        self.pcpis[name] = Pcpi(name=name, role=role, cycle=self.get("cycle"), owners=owners)
        self.emit(fx.TakePcpi(name=name, role=role))
        return name

    def release(self, name: str) -> None:
        p = self.pcpis.get(name)
        if p is not None and not p.releasing:
            self.pcpis[name] = attrs.evolve(p, releasing=True)
        self.emit(fx.ReleasePcpi(name=name))

    def export(self, jump: bool = False) -> None:
        self.emit(fx.Export(mapping={r.name: r.exported for r in self.replicas.values()}, jump=jump))

    def decision(self) -> Decision:
        return Decision(state=self.state(), effects=tuple(self.effects), log=tuple(self.log))


# ---------------------------------------------------------------------------
# the procedures
# ---------------------------------------------------------------------------
def _advance(p: _Plan) -> None:
    """After a transfer, rollback or removal ended: move the agent on if it can."""
    phase = p.get("phase")
    if phase == "updating":
        state = p.state()
        if not guards.no_transfer_in_flight(state) or _pending_sources(p):
            return
        if guards.some_replica_in_rollback(state):
            p.phase("start_rollback")
            p.take("rollback")  # Fig. 9 step 1120: ONE PCPI for every unstable replica
            return
        _after_flight(p)
    elif phase == "rolling_back" and guards.nothing_in_flight(p.state()):
        if p.may("resume_updates"):
            _resume_updates(p)
        else:
            _after_flight(p)


def _resume_updates(p: _Plan) -> None:
    """Updates a restart interrupted restart from their spools, in the same cycle.

    Every rollback has ended, so the rollback PCPI is released first: a resumed
    update that fails again gets a fresh one (at most 4 cycle PCPIs, I1).
    """
    p.phase("resume_updates")
    for pcpi in list(p.pcpis.values()):
        if pcpi.role == "rollback" and not pcpi.releasing:
            p.release(pcpi.name)
    targets = p.get("cycle_targets")
    for r in p.in_state("done"):
        if r.resume:
            target = targets[r.origin]  # it was updating from its source's PCPI of this cycle
            r = p.fire(r, "resume_update", target=target, resume=False)
            p.emit(
                fx.Transfer(
                    replica=r.name,
                    source_qtree=r.source_qtree,
                    base=r.active_point,
                    target=target,
                    resume=True,
                    origin=r.origin,
                )
            )


def _after_flight(p: _Plan) -> None:
    if p.may("start_jump_ahead"):
        p.phase("start_jump_ahead")
        p.set(purged=False)
        p.take("jump_ahead")
    else:
        p.phase("start_release")
        _release(p)


def _participants(p: _Plan) -> list[Replica]:
    return p.in_state(*sorted(p.model.spec.jump_ahead_sources))


def _jump_to(p: _Plan, new_base: str, now: float) -> None:
    """Branch 1032: every participant exports the new base, in one switch; the new base's manifest
    (coalesce_core/cycle/generations.py) is recorded in the same decision, before the switch."""
    p.set_manifest(new_base, gen.manifest_at_jump(p.state(), new_base, now, _participants(p)))
    for r in _participants(p):
        p.fire(
            r,
            "jump_ahead",
            exported=new_base,
            source_point=r.active_point,
            last_good=None,
            scratch=None,
            retries=0,
            next_retry=0.0,
            resume=False,
            reseed_reason="",
        )
    p.export(jump=True)


def needed_pcpis(state: GroupState) -> dict[str, frozenset[str]]:
    """Destination PCPIs some replica pins, with the replicas that pin them."""
    refs: dict[str, set[str]] = {}
    for r in state.replicas.values():
        for name in r.pinned():
            refs.setdefault(name, set()).add(r.name)
    return {k: frozenset(v) for k, v in refs.items()}


def needed_source_pcpis(state: GroupState) -> frozenset[str]:
    out = {r.source_point for r in state.replicas.values()}
    out |= {r.active_point for r in state.replicas.values()}
    out |= {r.target for r in state.replicas.values()}
    if state.phase != "releasing" and state.phase != "idle":
        out |= set(state.cycle_targets.values())
    out.discard(None)
    return frozenset(out)  # type: ignore[arg-type]


def release_action(role: str, is_base: bool, releasing: bool, pinned: bool, taken: bool) -> str:
    """What the release step (after a jump-ahead or an aborted cycle) does with one PCPI.

    "keep" it (the coalesced base, or a release already under way), make it the
    "individual" PCPI of the replicas that pin it, "release" it, or "forget" a
    record whose PCPI was never taken.  A pinned PCPI is never released.

    post: __return__ in ("keep", "individual", "release", "forget")
    post: implies(pinned, __return__ in ("keep", "individual"))
    post: implies(is_base, __return__ == "keep")
    post: implies(not is_base and not releasing and not pinned and taken, __return__ == "release")
    post: implies(__return__ == "release", taken and not pinned and not is_base)
    """
    if is_base or releasing:
        return "keep"
    if pinned:
        return "individual"
    if taken:
        return "release"
    return "forget"


def reseed_due(failures: int, reseed_after: int) -> bool:
    """True when a replica whose updates failed ``failures`` times in a row is re-seeded
    instead of being updated again (``reseed_after`` 0: never).  ``failures`` leaves out
    the cycles it missed in an outage (``Replica.outages``).

    post: implies(reseed_after <= 0, not __return__)
    post: implies(reseed_after > 0 and failures >= reseed_after, __return__)
    post: implies(failures < reseed_after, not __return__)
    """
    return reseed_after > 0 and failures >= reseed_after


def _leave_for_reseed(p: _Plan, r: Replica, reason: str) -> Replica:
    """``request_reseed``: out of the cycle, the exported image pinned as the last good one.

    The active FS is discarded (the re-seed empties it), so its source point is
    forgotten; the exported image and its source point stay (I3, I5)."""
    return p.fire(
        r,
        "request_reseed",
        last_good=r.last_good or r.exported,
        active_point=None,
        target=None,
        resume=False,
        retries=0,
        next_retry=0.0,
        reseed_reason=reason,
    )


def _release(p: _Plan, source: bool = True) -> None:
    """Keep the coalesced base and every pinned PCPI; release everything else (on the sources
    too, unless ``source`` is False: none could be reached in this cycle); then prune the
    generations the retention policy no longer keeps, with or without a jump-ahead."""
    new_base = p.role("new_base")
    old_base = p.role("base")
    base = new_base or old_base
    if new_base is not None:
        p.pcpis[new_base.name] = attrs.evolve(new_base, role="base")
    refs = needed_pcpis(p.state())
    if new_base is not None and old_base is not None and p.base_state.retention.retains:
        _retain(p, old_base, refs.get(old_base.name, frozenset()), new_base)
    for name, pcpi in sorted(p.pcpis.items()):
        if pcpi.role in (KEPT, GENERATION):
            continue  # the operator releases a kept one (`coalesce release`, I11); _prune the generations
        action = release_action(
            pcpi.role, base is not None and name == base.name, pcpi.releasing, name in refs, pcpi.taken
        )
        if action == "keep":
            continue
        if action == "individual":
            p.pcpis[name] = attrs.evolve(pcpi, role="individual", owners=refs[name])
        elif action == "release":
            p.release(name)
        else:
            del p.pcpis[name]
    src_needed = needed_source_pcpis(p.state())
    for name, sp in sorted(p.source_pcpis.items()):
        if source and name not in src_needed and not sp.releasing:
            p.source_pcpis[name] = attrs.evolve(sp, releasing=True)
            p.emit(fx.ReleaseSourcePcpi(name=name, source=sp.source))
    # the prune: after a jump-ahead at the new image's time (it is now the base); in a cycle that
    # made none (a source outage, a refused PCPI) at the old base's, so an unpin decided during it
    # takes effect when it ends (I1 at rest)
    _prune_at_base(p)
    _maybe_finish(p)


def _retain(p: _Plan, old_base: Pcpi, owners: frozenset[str], new_base: Pcpi) -> None:
    """At the jump-ahead the old coalesced base becomes a generation instead of being released
    (docs/config.md, "Retention"), its manifest kept (one of a base made before manifests were
    recorded: an unknown one, of the time it became a generation)."""
    p.pcpis[old_base.name] = attrs.evolve(old_base, role=GENERATION, owners=owners)
    if old_base.name not in p.manifests:
        p.set_manifest(
            old_base.name, gen.unknown_manifest(old_base.name, old_base.cycle, gen.image_time(p.manifests, new_base))
        )


def _prune(p: _Plan, now: float) -> None:
    """After each jump-ahead: release the generations the retention policy prunes at ``now`` (the
    new image's time), one PCPI release each, marked releasing in this decision (write-ahead: a
    crash re-issues the release, recovery never plans again). A pinned generation is never pruned."""
    for g in gen.prune(p.state(), now).pruned:
        p.release(g.id)


def _prune_at_base(p: _Plan) -> None:
    """:func:`_prune` with the coalesced base's time, the time of the last jump-ahead's own prune
    (so what that prune kept stays kept, whatever the clock says now): at rest after `remove`,
    `unpin` and recovery, and at the release step of a cycle that made no new base. Nothing
    without a base (no image, no generation)."""
    base = p.role("base")
    if base is not None:
        _prune(p, gen.image_time(p.manifests, base))


def _maybe_finish(p: _Plan) -> None:
    if p.get("phase") != "releasing":
        return
    if any(x.releasing for x in p.pcpis.values()) or any(x.releasing for x in p.source_pcpis.values()):
        return
    p.phase("finish_cycle")
    p.set(cycle_targets={}, purged=False, transfers_started=False)


# ---------------------------------------------------------------------------
# event handlers
# ---------------------------------------------------------------------------
#: destination PCPIs a cycle may take besides the coalesced base it holds: rollback, jump-ahead, new base
CYCLE_TAKES = 3


def pcpi_shortfall(destination_room: int | None, source_room: int | None, source: str | None = None) -> str:
    """Why a cycle cannot start for want of PCPIs, or "" when it can.  A cycle takes ONE PCPI of
    each source it updates from and at most CYCLE_TAKES destination PCPIs at once; ``source_room``
    is the least room of those sources, ``source`` the name of the source that has it (the reason
    names it and by how many PCPIs it is short); a room of None is a volume that declares no PCPI limit.

    post: implies(destination_room is None and source_room is None, __return__ == "")
    post: implies(destination_room is not None and destination_room < 3, __return__ != "")
    post: implies(source_room is not None and source_room < 1, __return__ != "")
    post: implies((destination_room is None or destination_room >= 3) and (source_room is None or source_room >= 1), __return__ == "")
    """
    short = []
    if destination_room is not None and destination_room < CYCLE_TAKES:
        short.append(f"the destination can take {max(0, destination_room)} more PCPIs, a cycle needs {CYCLE_TAKES}")
    if source_room is not None and source_room < 1:
        if source is None:
            short.append("the source can take no more PCPIs, a cycle needs 1")
        else:
            short.append(
                f"the source {source!r} can take no more PCPIs, a cycle needs 1 of it "
                f"({1 - source_room} short: it holds {-source_room} past its limit)"
                if source_room < 0
                else f"the source {source!r} can take no more PCPIs, a cycle needs 1 of it (1 short)"
            )
    return "; ".join(short)


#: the replica states a cycle may transfer into (:func:`_in_cycle`)
CYCLE_STATES = ("stable", "uninitialized", "reseed_pending")


def _in_cycle(p: _Plan, now: float, source: str | None = None) -> list[Replica]:
    """The replicas a cycle started at ``now`` transfers into (of the source ``source``, or of every
    source): every stable one (update), uninitialized one (baseline), and one waiting for a re-seed
    whose retry time has come."""
    return [r for r in p.in_state(*CYCLE_STATES) if (source is None or r.origin == source) and _transfers_into(r, now)]


def _transfers_into(r: Replica, now: float) -> bool:
    """Whether a cycle started at ``now`` transfers into ``r`` (given its source's PCPI)."""
    return r.state in CYCLE_STATES and not (r.state == "reseed_pending" and r.next_retry > now)


def _miss_cycle(p: _Plan, error: str, now: float, source: str | None = None) -> int:
    """The cycle's transfers (from ``source``, or from every source) cannot run: every replica it
    would have updated, baselined or re-seeded keeps its state and its image and records the error
    (an outage: it does not count towards reseed_after).  Returns how many replicas missed the cycle."""
    missed = _in_cycle(p, now, source)
    for r in missed:
        p.update(r, last_error=error, consecutive_failures=r.consecutive_failures + 1, outages=r.outages + 1)
    return len(missed)


def cycle_sources(state: GroupState, now: float, due: frozenset[str] | None) -> tuple[list[str], list[str]]:
    """The sources a cycle started at ``now`` takes a PCPI of (those with replicas to transfer into
    that are ``due``; None: every source is) and those it leaves for a later cycle (replicas to
    transfer into, not due: their replicas stay as they are in this cycle, docs/config.md "Sources")."""
    sources = sorted({r.origin for r in state.replicas.values() if _transfers_into(r, now)})
    return [s for s in sources if due is None or s in due], [s for s in sources if due is not None and s not in due]


def _start_cycle(p: _Plan, e: ev.StartCycle) -> None:
    """ONE PCPI of each source that has replicas in the cycle and is due; a source's transfers start
    when its PCPI is taken (:func:`_source_taken`).  A cycle with no transfer to make takes none;
    one whose sources with transfers to make are none of them due does not start (nothing is taken:
    the replicas of a source not due stay as they are, "no update was attempted")."""
    sources, waiting = cycle_sources(p.state(), e.now, e.due)
    if waiting and not sources and p.get("phase") == "idle":
        return
    short = pcpi_shortfall(e.destination_room, e.source_room, e.least_room_source)
    if short and p.get("phase") == "idle":  # refused before it starts: nothing is taken, the agent stays idle
        for source in sources:
            _miss_cycle(p, f"cycle not started: {short}", e.now, source)
        return
    p.phase("start_cycle")
    p.set(cycle=p.get("cycle") + 1, cycle_started=e.now, cycle_failures=0, purged=False, transfers_started=False)
    targets = {}
    for source in sources:
        name = targets[source] = p.new_name("src")
        p.source_pcpis[name] = SourcePcpi(name=name, cycle=p.get("cycle"), source=source)
        p.emit(fx.TakeSourcePcpi(name=name, source=source))
    p.set(cycle_targets=targets)
    _advance(p)  # nothing to take: straight on to the jump-ahead or the release


def _pending_sources(p: _Plan) -> list[str]:
    """The sources whose PCPI of the running cycle is not taken yet (their transfers wait for it)."""
    return [s for s, name in sorted(p.get("cycle_targets").items()) if not p.source_pcpis[name].taken]


def _is_cycle_target(p: _Plan, name: str) -> bool:
    return name in p.get("cycle_targets").values()


def _source_refused(p: _Plan, e: ev.SourcePcpiRefused) -> None:
    """A source PCPI of the cycle was not taken: the replicas of that source miss the cycle (they keep
    their images and record the error); the other sources' transfers go on.  When no source PCPI
    of the cycle is left, the cycle ends before any transfer (``source_unavailable``).

    The record is forgotten: had the source taken it after all (its answer lost), it is a
    group PCPI the ledger does not know, which the next recovery that reaches the source
    releases."""
    sp = p.source_pcpis.get(e.name)
    if sp is None or sp.taken:
        return
    del p.source_pcpis[e.name]
    if p.get("phase") != "updating" or not _is_cycle_target(p, e.name):
        return
    targets = {s: n for s, n in p.get("cycle_targets").items() if n != e.name}
    p.set(cycle_targets=targets)
    missed = _miss_cycle(p, f"source unavailable: {e.error}", p.get("cycle_started"), sp.source)
    p.set(cycle_failures=p.get("cycle_failures") + missed)
    if targets or p.get("transfers_started"):
        _advance(p)
        return
    p.phase("source_unavailable")
    _release(p, source=False)


def _source_not_released(p: _Plan, e: ev.SourcePcpiNotReleased) -> None:
    """A source PCPI could not be released: kept, and released by a later cycle's release step."""
    sp = p.source_pcpis.get(e.name)
    if sp is not None and sp.releasing:
        p.source_pcpis[e.name] = attrs.evolve(sp, releasing=False)
    _maybe_finish(p)


def _source_taken(p: _Plan, e: ev.SourcePcpiTaken) -> None:
    sp = p.source_pcpis.get(e.name)
    if sp is None or sp.taken:
        return
    p.source_pcpis[e.name] = attrs.evolve(sp, taken=True, taken_at=sp.taken_at or e.now)
    if p.get("phase") != "updating" or not _is_cycle_target(p, e.name):
        return
    _mark_taken(p, sp.source)
    _start_transfers(p, sp.source, e.name)
    _advance(p)


def _mark_taken(p: _Plan, source: str) -> None:
    """The PCPI of ``source`` of the running cycle was taken: its ``interval`` counts from the cycle's
    start (not from the take, which comes a little later: a source of 15m in a group of 5m is taken
    every third cycle, not every fourth)."""
    p.set(source_taken={**p.get("source_taken"), source: p.get("cycle_started")})


def _start_transfers(p: _Plan, source: str, target: str) -> None:
    """The cycle start proper for the replicas of ``source``, whose PCPI ``target`` was taken: every
    stable one updates, every uninitialized one baselines, every one waiting for a re-seed whose
    retry time has come is re-seeded."""
    p.set(transfers_started=True)
    for r in _in_cycle(p, p.get("cycle_started"), source):
        kind = {"stable": "start_update", "uninitialized": "start_baseline", "reseed_pending": "start_reseed"}
        base = r.active_point if r.state == "stable" else None
        reseed = r.state == "reseed_pending"
        r = p.fire(r, kind[r.state], target=target)
        p.emit(
            fx.Transfer(
                replica=r.name, source_qtree=r.source_qtree, base=base, target=target, reseed=reseed, origin=source
            )
        )


def _succeeded(e: ev.TransferDone, r: Replica) -> dict[str, object]:
    """What every successful transfer records: its image, and that the failures are over."""
    return dict(
        active_point=r.target,
        target=None,
        records=e.records,
        nbytes=e.nbytes,
        last_error="",
        consecutive_failures=0,
        outages=0,
        last_success=e.now,
    )


def _failed(p: _Plan, r: Replica, kind: str, error: str) -> dict[str, object]:
    """What every failed transfer records (kept until a later transfer succeeds)."""
    p.set(cycle_failures=p.get("cycle_failures") + 1)
    return dict(last_error=f"{kind} failed: {error}", consecutive_failures=r.consecutive_failures + 1)


def _transfer_done(p: _Plan, e: ev.TransferDone) -> None:
    r = p.replica(e.replica)
    if r.state == "update":
        if e.ok:
            p.fire(r, "update_succeeded", **_succeeded(e, r))
        else:
            p.fire(r, "update_failed", target=None, **_failed(p, r, "update", e.error))
    elif r.state == "baseline":
        if e.ok:
            p.fire(r, "baseline_succeeded", **_succeeded(e, r))
        else:
            p.update(r, **_failed(p, r, "baseline", e.error))
            p.emit(fx.RemoveQtree(replica=r.name))
            return
    elif r.state == "reseeding":
        # outside the cycle: the agent does not wait for it (no _advance)
        if e.ok:
            p.fire(r, "reseed_succeeded", retries=0, next_retry=0.0, **_succeeded(e, r))
        else:
            retries = r.retries + 1
            p.fire(
                r,
                "reseed_failed",
                target=None,
                active_point=None,
                retries=retries,
                next_retry=e.now + p.base_state.retry.delay(retries - 1),
                **_failed(p, r, "re-seed", e.error),
            )
        return
    elif r.state == "update_uncoalesced":
        # a straggler, outside the cycle: the agent does not wait for it (no _advance)
        if e.ok:
            p.fire(r, "straggler_succeeded", **_succeeded(e, r))
        else:
            _straggler_failed(p, r, e.now, **_failed(p, r, "update", e.error))
        return
    else:
        return  # a late answer for a transfer recovery already settled
    _advance(p)


def straggler_due(cycle_started: float, straggler_after: float | None, now: float) -> bool:
    """True when an update still in flight at ``now`` leaves the cycle that started at
    ``cycle_started`` (``straggler_after`` None: never, the cycle waits for every update).

    post: implies(straggler_after is None, not __return__)
    post: implies(straggler_after is not None and now >= cycle_started + straggler_after, __return__)
    post: implies(__return__, straggler_after is not None and now >= cycle_started + straggler_after)
    """
    return straggler_after is not None and now >= cycle_started + straggler_after


def _straggler(p: _Plan, e: ev.StragglerDue) -> None:
    """``straggle``: an update still in flight ``straggler_after`` after the cycle started leaves the
    cycle into the fault-tolerant field 1006.  Its exported image (the coalesced base) is pinned as its
    last good image, which the release step turns into its individual PCPI when a jump-ahead replaces
    the base (I2: one PCPI; a later failed transfer's retry adds its scratch, two).  Its transfer goes
    on; the others may now jump ahead without it.  Not due yet, not in update, or not in the updating
    phase: nothing happens (a late or early event)."""
    r = p.replicas.get(e.replica)
    after = p.base_state.straggler_after
    if r is None or r.state != "update" or p.get("phase") != "updating":
        return
    if not straggler_due(p.get("cycle_started"), after, e.now):
        return
    p.fire(
        r,
        "straggle",
        last_good=r.last_good or r.exported,
        resume=False,
        last_error=f"update still in flight {after:g} s after the cycle started (straggler_after): "
        "it left the cycle and rejoins at a later jump-ahead",
    )
    _advance(p)


def _straggler_failed(p: _Plan, r: Replica, now: float, **changes: object) -> None:
    """``straggler_failed``: the straggler's active FS is partial; it exports its last good image and
    the rollback retries of loop 1026 (``Tick``) restore it, the first one at once."""
    p.fire(r, "straggler_failed", target=None, retries=0, next_retry=now, resume=False, **changes)


def _qtree_removed(p: _Plan, e: ev.QtreeRemoved) -> None:
    r = p.replica(e.replica)
    if r.state == "baseline":
        p.fire(r, "baseline_failed", target=None, active_point=None, source_point=None)
        _advance(p)


def _pcpi_taken(p: _Plan, e: ev.PcpiTaken) -> None:
    pcpi = p.pcpis.get(e.name)
    if pcpi is None:
        return
    p.pcpis[e.name] = pcpi = attrs.evolve(pcpi, taken=True)
    phase = p.get("phase")
    if pcpi.role == "rollback" and phase == "rolling_back":
        todo = p.in_state("rollback")
        for r in todo:
            assert r.exported is not None  # a replica in rollback exports its last good image (I2)
            p.emit(fx.Rollback(replica=r.name, from_pcpi=e.name, to_pcpi=r.exported))
        if not todo:
            _advance(p)
    elif pcpi.role == "jump_ahead" and phase == "jump_ahead_1":
        p.emit(fx.PurgePurgatory(qtrees=tuple(r.name for r in _participants(p))))
    elif pcpi.role == "new_base" and phase == "jump_ahead_2":
        p.pcpis[e.name] = attrs.evolve(pcpi, taken_at=e.now)
        _jump_to(p, e.name, e.now)
    elif pcpi.role in ("individual", KEPT):
        if pcpi.role == KEPT:
            p.pcpis[e.name] = attrs.evolve(pcpi, taken_at=e.now)
        for owner in sorted(pcpi.owners):
            o = p.replicas.get(owner)
            if o is None or o.scratch != e.name or o.state != "unstable_uncoalesced":
                continue
            if pcpi.role == KEPT:
                o = p.update(o, keep=False)
            if o.exported == ACTIVE:  # resync: "creating a PCPI and exporting it"
                o = p.update(o, exported=e.name)
                p.export()
            assert o.last_good is not None  # an uncoalesced replica keeps the PCPI it rolls back to
            p.emit(fx.Rollback(replica=o.name, from_pcpi=e.name, to_pcpi=o.last_good, retry=True))


def _rollback_ended(p: _Plan, r: Replica, ok: bool, error: str, now: float) -> None:
    """A rollback of the cycle ended (1020), or failed (1022: also when its PCPI was refused)."""
    if ok:
        r = p.fire(r, "rollback_succeeded", active_point=r.source_point)
    else:
        r = p.fire(
            r,
            "rollback_failed",
            last_good=r.exported,
            retries=0,
            next_retry=now + p.base_state.retry.delay(0),
            last_error=f"rollback failed: {error}",
            resume=False,
        )
    n = p.get("reseed_after")
    failed = r.consecutive_failures - r.outages
    if reseed_due(failed, n):  # it cannot apply its stream: re-seed it
        _leave_for_reseed(p, r, f"{failed} updates failed in a row (reseed_after = {n})")


def _retry_ended(p: _Plan, r: Replica, ok: bool, error: str, now: float) -> None:
    """A retry (or resync) rollback of a replica outside the cycle ended (1028), failed or could
    not start for want of its PCPI (1026): it exports its last good image again."""
    exported_before = r.exported
    if ok:
        r = p.fire(
            r,
            "retry_succeeded",
            exported=r.last_good,
            scratch=None,
            active_point=r.source_point,
            retries=0,
            next_retry=0.0,
        )
    else:
        r = p.fire(
            r,
            "retry_failed",
            exported=r.last_good,
            scratch=None,
            retries=r.retries + 1,
            next_retry=now + p.base_state.retry.delay(r.retries + 1),
            last_error=f"retry failed: {error}",
        )
    if exported_before != r.exported:
        p.export()


def _rollback_done(p: _Plan, e: ev.RollbackDone) -> None:
    r = p.replica(e.replica)
    if r.state == "rollback":
        _rollback_ended(p, r, e.ok, e.error, e.now)
        _advance(p)
    elif r.state == "unstable_uncoalesced" and r.scratch is not None:
        scratch = r.scratch
        _retry_ended(p, r, e.ok, e.error, e.now)
        if p.pcpis.get(scratch, Pcpi(name=scratch, role="individual")).role != KEPT:
            p.release(scratch)


def _pcpi_refused(p: _Plan, e: ev.PcpiRefused) -> None:
    """The destination refused a PCPI: the replicas that needed it leave the cycle (Fig. 8's
    fault field: they export their own image and retry), the cycle goes on for the rest."""
    pcpi = p.pcpis.get(e.name)
    if pcpi is None or pcpi.taken or pcpi.releasing:
        return
    del p.pcpis[e.name]  # never taken: nothing to release
    why = f"the destination refused the {pcpi.role.replace('_', '-')} PCPI: {e.error}"
    phase = p.get("phase")
    if pcpi.role == "rollback" and phase == "rolling_back":
        for r in p.in_state("rollback"):
            _rollback_ended(p, r, False, why, e.now)
        _advance(p)
    elif (pcpi.role, phase) in (("jump_ahead", "jump_ahead_1"), ("new_base", "jump_ahead_2")):
        for r in p.in_state("done"):
            p.fire(r, "jump_ahead_refused", last_good=r.exported, resume=False, last_error=f"jump-ahead failed: {why}")
        p.phase("abandon_jump_ahead")
        _release(p)
    elif pcpi.role in ("individual", KEPT):  # a kept one: the next attempt takes it again (keep)
        for owner in sorted(pcpi.owners):
            o = p.replicas.get(owner)
            if o is not None and o.scratch == e.name and o.state == "unstable_uncoalesced":
                _retry_ended(p, o, False, why, e.now)


def _purged(p: _Plan, _e: ev.PurgatoryPurged) -> None:
    if p.get("phase") != "jump_ahead_1":
        return
    p.set(purged=True)
    p.phase("take_new_base")
    p.take("new_base")


def _exported(p: _Plan, e: ev.Exported) -> None:
    if e.jump and p.get("phase") == "jump_ahead_2":
        p.phase("start_release")
        _release(p)


def _pcpi_released(p: _Plan, e: ev.PcpiReleased) -> None:
    p.pcpis.pop(e.name, None)
    _maybe_finish(p)


def _source_released(p: _Plan, e: ev.SourcePcpiReleased) -> None:
    p.source_pcpis.pop(e.name, None)
    _maybe_finish(p)


def _require_idle(p: _Plan, what: str) -> None:
    if p.get("phase") != "idle":
        raise NotNow(
            f"cannot {what} while the agent of group {p.base_state.name!r} is in phase {p.get('phase')!r}",
            hint="wait until the running cycle finishes (`coalesce status`), then try again",
        )


def _tick(p: _Plan, e: ev.Tick) -> None:
    if p.get("phase") != "idle":
        return
    for r in p.in_state("unstable_uncoalesced"):
        if r.scratch is None and r.next_retry <= e.now and r.last_good is not None:
            # a resync whose kept PCPI was refused or lost in a crash: this attempt keeps the writes
            name = p.take(KEPT if r.keep else "individual", owners=(r.name,))
            p.update(r, scratch=name)


def _break(p: _Plan, e: ev.BreakMirror) -> None:
    """Administrator failover, between cycles; also in a cycle none of whose source PCPIs is taken yet
    (no transfer started, so no replica has left its state); the transfers that start once they are
    taken leave the broken replica out.  Sources that refuse them all end the cycle
    (``source_unavailable``), so with the sources down the failover is taken between the cycles
    that end that way."""
    if not (p.get("phase") == "updating" and not p.get("transfers_started")):
        _require_idle(p, f"break {e.replica!r}")
    r = p.replica(e.replica)
    p.fire(r, "break_mirror", last_good=r.exported, exported=ACTIVE)
    p.export()


def _resync(p: _Plan, e: ev.Resync) -> None:
    """Fence first (docs/decisions.md, "Resync fences first"): the broken replica exports its last
    good image again before the scratch PCPI of its active FS is taken, so no write through the
    export reaches the active FS after that PCPI (a write there would outlive the rollback, which
    undoes only what the scratch PCPI holds); the rollback's result is checked before it counts."""
    _require_idle(p, f"resync {e.replica!r}")
    r = p.replica(e.replica)
    keep = not e.discard and r.state == "broken"
    if keep:
        _may_keep(p, r.name, e.destination_room)
    r = p.fire(r, "resync", retries=0, next_retry=0.0, exported=r.last_good, keep=keep)
    p.export()
    name = p.take(KEPT if keep else "individual", owners=(r.name,))
    p.update(r, scratch=name)


def _may_keep(p: _Plan, replica: str, destination_room: int | None) -> None:
    """A resync keeps the broken replica's writes in one PCPI (I11): refused when the replica already
    keeps some, or when the kept PCPI would leave the destination without room for a cycle."""
    kept = p.state().kept_pcpi(replica)
    discard = f"`coalesce resync {replica} --discard` resyncs without keeping the writes"
    if kept is not None:
        raise NotNow(
            f"cannot resync replica {replica!r} keeping its writes: it already keeps those of an earlier "
            f"break in PCPI {kept.name}",
            hint=f'copy what you need from it (docs/operations.md, "Writes kept at a resync"), then '
            f"`coalesce release {replica}`; or {discard}",
        )
    if destination_room is not None and destination_room < 1 + CYCLE_TAKES:
        raise NotNow(
            f"cannot resync replica {replica!r} keeping its writes: the destination can take "
            f"{max(0, destination_room)} more PCPIs, the kept PCPI and a cycle need {1 + CYCLE_TAKES}",
            hint=f"release PCPIs the volume no longer needs (`coalesce release` of other kept writes, other "
            f"tools' snapshots); or {discard}",
        )


def _release_kept(p: _Plan, e: ev.ReleaseKept) -> None:
    """`coalesce release NAME`: the kept PCPI of replica NAME (a removed one too) is deleted; in any
    phase, never asking the source."""
    kept = p.state().kept_pcpi(e.replica)
    if kept is None:
        raise NotNow(
            f"group {p.base_state.name!r} keeps no writes of replica {e.replica!r}",
            hint="`coalesce status` lists the kept PCPIs; a resync keeps a broken replica's writes unless --discard",
        )
    if any(r.scratch == kept.name for r in p.replicas.values()):
        raise NotNow(
            f"cannot release {kept.name} yet: the resync of replica {e.replica!r} is rolling back from it",
            hint="wait until the resync attempt ends (`coalesce status`), then try again",
        )
    p.release(kept.name)


def _pin(p: _Plan, e: ev.PinGeneration) -> None:
    """`coalesce pin GEN` / `unpin GEN`: the generation is exempt from pruning (or no longer), in any
    phase. An unpin at rest prunes at once (with the coalesced base's time, as `remove` does): the
    group would otherwise hold more unpinned generations than the policy keeps until the next
    jump-ahead (I1 at rest); mid-cycle the cycle's release step prunes, with a jump-ahead
    or without one (a source outage, a refused PCPI). NotFound for what is not a
    retained generation."""
    from coalesce_core.cycle import refs

    g = refs.resolve(p.state(), e.generation)
    p.pcpis[g.name] = attrs.evolve(g, pinned=e.pinned)
    if not e.pinned and p.get("phase") == "idle":
        _prune_at_base(p)


#: what `Reseed` does in each state: re-seed it, nothing (a re-seed is already under way), or refuse
_RESEED_FROM = ("stable", "stable_uncoalesced", "unstable_uncoalesced")
_RESEEDING = ("reseed_pending", "reseeding", "reseeded")


def _reseed(p: _Plan, e: ev.Reseed) -> None:
    """`coalesce reseed NAME`, the background verification: leave the cycle to be re-seeded."""
    _require_idle(p, f"re-seed {e.replica!r}")
    r = p.replica(e.replica)
    if r.state in _RESEEDING:
        return  # already being re-seeded: one re-seed serves every request
    if r.state in _RESEED_FROM and r.scratch is None:
        _leave_for_reseed(p, r, e.reason or "requested")
        return
    why = {
        "uninitialized": ("has no image yet", "its baseline runs in the next cycle (`coalesce run --once`)"),
        "broken": (
            "is broken (writable, exporting its active FS)",
            "`coalesce resync NAME` brings it back; re-seed it once it has left the broken state",
        ),
        "done_uncoalesced": (
            "waits for the next jump-ahead (the destination refused a PCPI of the last one)",
            "re-seed it after the next cycle (`coalesce run --once`)",
        ),
        "update_uncoalesced": (
            "is a straggler whose update is still running",
            "wait until its update ends (`coalesce status`), then try again",
        ),
    }.get(r.state, (f"is in state {r.state!r}", "wait until the running transfer or retry ends, then try again"))
    raise NotNow(f"cannot re-seed replica {e.replica!r}: it {why[0]}", hint=why[1])


def _add(p: _Plan, e: ev.AddReplica) -> None:
    existing = p.replicas.get(e.name)
    if existing is not None:
        if existing.source_qtree != e.source_qtree:
            raise NotNow(
                f"replica {e.name!r} already exists with source {existing.source_qtree!r}",
                hint="choose another name; a replica's source cannot change",
            )
        return
    p.replicas[e.name] = Replica(name=e.name, source_qtree=e.source_qtree, origin=e.origin)


def _remove(p: _Plan, e: ev.RemoveReplica) -> None:
    """`coalesce remove NAME`: the replica leaves the group, between cycles (docs/decisions.md,
    "Removing a replica").  Its export ends in one switch of the whole table, then the PCPIs only it
    needed are released; the coalesced base stays.  Like break, it never asks the source (which may
    be out of reach): the source PCPIs only it needed go at the next cycle's release step.  Its
    qtree is not touched."""
    _require_idle(p, f"remove {e.replica!r}")
    r = p.replica(e.replica)
    if r.scratch is not None:
        raise NotNow(
            f"cannot remove replica {e.replica!r}: a rollback retry of it is running",
            hint="wait until the retry ends (`coalesce status`), then try again",
        )
    if r.state == "update_uncoalesced":
        raise NotNow(
            f"cannot remove replica {e.replica!r}: its update is still running (a straggler)",
            hint="wait until its update ends (`coalesce status`), then try again",
        )
    p.fire(r, "remove")
    del p.replicas[r.name]
    p.export()  # its export ends before anything it pinned is released
    refs = needed_pcpis(p.state())
    base = p.role("base")
    for name, pcpi in sorted(p.pcpis.items()):
        if pcpi.role == KEPT:
            continue  # its writes stay until `coalesce release NAME` (docs/decisions.md)
        if r.name in pcpi.owners:
            pcpi = p.pcpis[name] = attrs.evolve(pcpi, owners=pcpi.owners - {r.name})
        if name in r.pinned() and name not in refs and not (base is not None and name == base.name):
            if pcpi.role != GENERATION:  # a generation stays until the retention policy prunes it
                p.release(name)
    _prune_at_base(p)  # a generation only it pinned may now be past the policy (I1 at rest)


def recover_replica(state: str, has_scratch: bool) -> str:
    """What recovery does with a replica found in ``state`` after a crash (DESIGN §2).

    update -> "rollback" (update_failed), baseline -> "remove" (partial data removed,
    then baseline_failed), an interrupted retry/resync -> "abandon_retry" (its scratch
    PCPI is released, it exports its last good image again), an interrupted re-seed ->
    "reseed_again" (reseed_failed: it waits for the next cycle, still exporting its last
    good image; the next re-seed empties the qtree first), an interrupted straggler ->
    "abandon_straggler" (straggler_failed: it exports its last good image and loop 1026 rolls
    its active FS back); every other state is kept.

    post: implies(state == "update", __return__ == "rollback")
    post: implies(state == "update_uncoalesced", __return__ == "abandon_straggler")
    post: implies(state == "baseline", __return__ == "remove")
    post: implies(state == "reseeding", __return__ == "reseed_again")
    post: implies(state == "unstable_uncoalesced" and has_scratch, __return__ == "abandon_retry")
    post: implies(state in ("stable", "done", "rollback", "stable_uncoalesced", "broken", "uninitialized", "reseed_pending", "reseeded", "done_uncoalesced"), __return__ == "keep")
    """
    if state == "update":
        return "rollback"
    if state == "baseline":
        return "remove"
    if state == "reseeding":
        return "reseed_again"
    if state == "update_uncoalesced":
        return "abandon_straggler"
    if state == "unstable_uncoalesced" and has_scratch:
        return "abandon_retry"
    return "keep"


def recover_phase(phase: str, has_pcpi: bool, rollbacks_left: bool) -> str:
    """What recovery does for the agent phase it finds persisted (DESIGN §2 Recovery).

    ``has_pcpi``: the phase's own PCPI (rollback, jump_ahead, new_base) is recorded and
    not being released.  An unfinished jump-ahead is always rolled FORWARD.

    post: implies(phase == "idle", __return__ == "nothing")
    post: implies(phase == "updating", __return__ == "advance")
    post: implies(phase == "rolling_back" and rollbacks_left, __return__ == "retake_rollback")
    post: implies(phase == "rolling_back" and not rollbacks_left, __return__ == "advance")
    post: implies(phase == "jump_ahead_1", __return__ == ("purge" if has_pcpi else "take_jump_ahead"))
    post: implies(phase == "jump_ahead_2", __return__ == ("roll_forward" if has_pcpi else "take_new_base"))
    post: implies(phase == "releasing", __return__ == "release")
    """
    if phase == "updating":
        return "advance"
    if phase == "rolling_back":
        return "retake_rollback" if rollbacks_left else "advance"
    if phase == "jump_ahead_1":
        return "purge" if has_pcpi else "take_jump_ahead"
    if phase == "jump_ahead_2":
        return "roll_forward" if has_pcpi else "take_new_base"
    if phase == "releasing":
        return "release"
    return "nothing"


def _recover(p: _Plan, e: ev.Recover) -> None:
    """Restart after a crash, and every start of the agent (DESIGN §2 Recovery), in five steps.

    Effects are ordered so that the export table is re-applied before any
    PCPI is released: an exported image never disappears under its readers.
    """
    group = p.base_state.name
    releases: list = []
    # 1. reconcile the ledger's PCPIs with what the volumes hold
    for name, pcpi in sorted(p.pcpis.items()):
        if not pcpi.taken:
            if name in e.destination_pcpis:
                p.pcpis[name] = attrs.evolve(
                    pcpi, taken=True, taken_at=e.now if pcpi.role in (KEPT, "new_base") else 0.0
                )
                for r in list(p.replicas.values()):
                    if pcpi.role == KEPT and r.scratch == name:  # taken after the fence: it holds the writes
                        p.update(r, keep=False)
            else:
                del p.pcpis[name]
                for r in list(p.replicas.values()):
                    if r.scratch == name:  # an abandoned retry/resync: export the last good image
                        p.update(r, scratch=None, exported=r.last_good)
        elif pcpi.releasing:
            releases.append(fx.ReleasePcpi(name=name))
    for name in sorted(e.destination_pcpis):
        if is_group_pcpi(group, name) and name not in p.pcpis:
            releases.append(fx.ReleasePcpi(name=name))  # taken but never recorded: nobody exports it
    #    and each source's (a source that could not be reached: its records are kept as they are;
    #    its untaken source PCPI of the cycle is asked for again, and a refusal makes its replicas
    #    miss that cycle)
    for name, sp in sorted(p.source_pcpis.items()):
        held = e.source_pcpis.get(sp.source)
        if not sp.taken:
            if held is not None and name in held:
                p.source_pcpis[name] = attrs.evolve(sp, taken=True, taken_at=sp.taken_at or e.now)
                if _is_cycle_target(p, name) and p.get("phase") == "updating":
                    _mark_taken(p, sp.source)
            elif _is_cycle_target(p, name) and p.get("phase") == "updating":
                releases.append(fx.TakeSourcePcpi(name=name, source=sp.source))
            elif held is not None:
                del p.source_pcpis[name]
        elif sp.releasing:
            releases.append(fx.ReleaseSourcePcpi(name=name, source=sp.source))
    for source, held in sorted(e.source_pcpis.items()):
        for name in sorted(held):
            if is_group_source_pcpi(group, name) and name not in p.source_pcpis:
                releases.append(fx.ReleaseSourcePcpi(name=name, source=source))
    # 2. replicas: update -> rollback, baseline -> remove partial data, retries abandoned,
    #    re-seeds wait for the next cycle, stragglers take the rollback retries.  A restart is not the replica's failure: it is
    #    recorded in last_error but does not count towards reseed_after.
    scratches = []
    for r in p.in_state("update", "baseline", "unstable_uncoalesced", "reseeding", "update_uncoalesced"):
        action = recover_replica(r.state, r.scratch is not None)
        if action == "rollback":
            p.fire(
                r,
                "update_failed",
                target=None,
                last_error="update interrupted by a restart",
                resume=r.name in e.spooled,
            )
            p.set(cycle_failures=p.get("cycle_failures") + 1)
        elif action == "remove":
            p.update(r, last_error="baseline interrupted by a restart")
            p.emit(fx.RemoveQtree(replica=r.name))
        elif action == "reseed_again":
            p.fire(
                r,
                "reseed_failed",
                target=None,
                active_point=None,
                next_retry=0.0,
                last_error="re-seed interrupted by a restart",
            )
        elif action == "abandon_straggler":
            _straggler_failed(p, r, e.now, last_error="update interrupted by a restart (a straggler)")
        elif action == "abandon_retry":
            scratches.append(r.scratch)
            p.update(r, scratch=None, exported=r.last_good)
    # 3. the export table is re-applied (idempotent) so an interrupted switch is healed,
    #    and only then is anything released
    p.effects.insert(0, fx.Export(mapping={r.name: r.exported for r in p.replicas.values()}))
    p.effects.extend(releases)
    for scratch in scratches:
        if scratch in p.pcpis and p.pcpis[scratch].role != KEPT:
            p.release(scratch)
    # 4. finish or undo what the agent was doing
    phase = p.get("phase")
    own = {"rolling_back": "rollback", "jump_ahead_1": "jump_ahead", "jump_ahead_2": "new_base"}.get(phase)
    action = recover_phase(phase, own is not None and p.role(own) is not None, bool(p.in_state("rollback")))
    if phase == "updating":
        started = p.get("transfers_started")
        for source, target in sorted(p.get("cycle_targets").items()):
            current, before = p.source_pcpis.get(target), p.base_state.source_pcpis.get(target)
            if current is not None and current.taken and not (started and before is not None and before.taken):
                _start_transfers(p, source, target)  # its PCPI was taken, but the crash came before its transfers began
        _advance(p)
    elif phase == "rolling_back":
        for pcpi in list(p.pcpis.values()):
            if pcpi.role == "rollback" and not pcpi.releasing:
                p.release(pcpi.name)  # the active FS may be half rolled back: take a fresh one
        if action == "retake_rollback":
            p.take("rollback")
        else:
            _advance(p)
    elif action == "take_jump_ahead":
        p.take("jump_ahead")
    elif action == "purge":
        p.emit(fx.PurgePurgatory(qtrees=tuple(r.name for r in _participants(p))))
    elif action == "take_new_base":
        p.take("new_base")
    elif action == "roll_forward":
        new_base = p.role("new_base")
        assert new_base is not None  # recovery rolls forward only when the new base PCPI exists
        _jump_to(p, new_base.name, new_base.taken_at or e.now)  # roll the unfinished jump-ahead forward
    elif action == "release":
        _release(p)
    # 5. at rest, what the retention policy no longer keeps goes now: a [retention] tightened since
    #    the last jump-ahead takes effect when the agent starts (I1 at rest); a cycle recovery goes on
    #    with prunes at its release step
    if p.get("phase") == "idle":
        _prune_at_base(p)


_HANDLERS: dict[type, Callable[[_Plan, Any], None]] = {
    ev.StartCycle: _start_cycle,
    ev.SourcePcpiTaken: _source_taken,
    ev.SourcePcpiRefused: _source_refused,
    ev.SourcePcpiNotReleased: _source_not_released,
    ev.PcpiRefused: _pcpi_refused,
    ev.TransferDone: _transfer_done,
    ev.QtreeRemoved: _qtree_removed,
    ev.PcpiTaken: _pcpi_taken,
    ev.RollbackDone: _rollback_done,
    ev.PurgatoryPurged: _purged,
    ev.Exported: _exported,
    ev.PcpiReleased: _pcpi_released,
    ev.SourcePcpiReleased: _source_released,
    ev.Tick: _tick,
    ev.BreakMirror: _break,
    ev.Resync: _resync,
    ev.ReleaseKept: _release_kept,
    ev.PinGeneration: _pin,
    ev.Reseed: _reseed,
    ev.AddReplica: _add,
    ev.RemoveReplica: _remove,
    ev.Recover: _recover,
    ev.StragglerDue: _straggler,
}


def decide(state: GroupState, event: object, model: Model | None = None) -> Decision:
    """The one decision function: new state, effects to run, transitions made.

    Pure: the same (state, event) always gives the same decision.  Raises
    IllegalTransition or NotNow (and changes nothing) for an illegal request.
    """
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"not an event: {event!r}")
    plan = _Plan(state, model or default_model())
    handler(plan, event)
    return plan.decision()
