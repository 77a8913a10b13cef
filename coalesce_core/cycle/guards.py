"""Named guards of the agent machine: pure predicates over the group state.

spec/coalescing.toml names them in ``conditions``; coalesce_core.cycle.machines
checks at build time that every name has a function here.
"""

# crosshair: on

from __future__ import annotations

from coalesce_core.cycle.spec import load_spec
from coalesce_core.cycle.state import GroupState


def _in_flight() -> frozenset[str]:
    return load_spec().in_flight_states


def no_transfer_in_flight(state: GroupState) -> bool:
    """No replica is in update or baseline."""
    return not any(r.state in ("update", "baseline") for r in state.replicas.values())


def flight_free(states: tuple[str, ...]) -> bool:
    """No state of ``states`` is in flight (update, rollback, baseline): jump-ahead may happen.

    post: implies(__return__, all(s not in ("update", "rollback", "baseline") for s in states))
    post: implies(not __return__, any(s in ("update", "rollback", "baseline") for s in states))
    """
    flight = _in_flight()
    return not any(s in flight for s in states)


def nothing_in_flight(state: GroupState) -> bool:
    """No replica is in update, rollback or baseline (the jump-ahead guard, I8)."""
    return flight_free(tuple(r.state for r in state.replicas.values()))


def some_replica_in_rollback(state: GroupState) -> bool:
    return any(r.state == "rollback" for r in state.replicas.values())


def some_replica_resumable(state: GroupState) -> bool:
    """A rolled-back replica (done) has a spooled update that a restart interrupted."""
    return any(r.resume and r.state == "done" for r in state.replicas.values())


def some_participant(state: GroupState) -> bool:
    """Some replica would take part in a jump-ahead (the sources of `jump_ahead` in the spec)."""
    sources = load_spec().jump_ahead_sources
    return any(r.state in sources for r in state.replicas.values())


def purgatory_purged(state: GroupState) -> bool:
    return state.purged


GUARDS = {
    "no_transfer_in_flight": no_transfer_in_flight,
    "nothing_in_flight": nothing_in_flight,
    "some_replica_in_rollback": some_replica_in_rollback,
    "some_replica_resumable": some_replica_resumable,
    "some_participant": some_participant,
    "purgatory_purged": purgatory_purged,
}
