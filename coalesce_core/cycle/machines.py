"""The ``transitions`` machines, built from spec/coalescing.toml and nothing else.

Following the transitions README's warning (a callback that raises after the
state change leaves the new state in place), the machines carry no callbacks
with side effects: they only decide legality.  The planner asks them for the
destination of (state, trigger) and raises IllegalTransition when there is
none, so I8 (every state change is a transition of the spec) holds by
construction.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from transitions import Machine, MachineError

from coalesce_core.cycle import guards
from coalesce_core.cycle.spec import MachineSpec, Spec, load_spec
from coalesce_core.cycle.state import GroupState
from coalesce_core.errors import ConfigError, IllegalTransition


class _Probe:
    """The model the machine moves for each question (set to the state asked about first), and the
    planner reads ``state``: one per machine, added once (adding a model binds a method per trigger
    and a callback per state, which costs far more than the question itself)."""

    #: set by the machine (transitions adds the state attribute and one method per trigger)
    state: str
    trigger: Callable[..., bool]

    def __init__(self, group: GroupState | None = None) -> None:
        self.group = group


def _build(ms: MachineSpec, with_conditions: bool) -> Machine:
    transitions = []
    for t in ms.transitions:
        d: dict[str, Any] = {"trigger": t.trigger, "source": list(t.source), "dest": t.dest}
        if with_conditions and t.conditions:
            missing = [c for c in t.conditions if c not in guards.GUARDS]
            if missing:
                raise ConfigError(
                    f"spec names unknown guard(s) {missing} on {t.trigger!r}",
                    hint="add them to coalesce_core/cycle/guards.py or fix the spec",
                )
            d["conditions"] = [functools.partial(_guard, c) for c in t.conditions]
        transitions.append(d)
    return Machine(
        model=None,
        states=list(ms.state_names),
        transitions=transitions,
        initial=ms.initial,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        send_event=True,
        queued=False,
        name=ms.name,
    )


def machine_edges(machine: Machine) -> set[tuple[str, str, str | None]]:
    """(trigger, source, dest) of every transition a built machine holds (dest None: an internal
    transition, which the spec has none of): what the tests compare with ``MachineSpec.edges()``."""
    return {
        (trigger, source, t.dest)
        for trigger, event in machine.events.items()
        for source, transitions in event.transitions.items()
        for t in transitions
    }


def _guard(name: str, event: Any) -> bool:
    return guards.GUARDS[name](event.model.group)


class Model:
    """Both machines of the spec, as legality oracles for the planner."""

    def __init__(self, spec: Spec | None = None) -> None:
        self.spec = spec or load_spec()
        self.replica_machine = _build(self.spec.replica, with_conditions=False)
        self.agent_machine = _build(self.spec.agent, with_conditions=True)
        self._replica_cache: dict[tuple[str, str], str | None] = {}
        self._probes = {id(m): _Probe() for m in (self.replica_machine, self.agent_machine)}
        for m in (self.replica_machine, self.agent_machine):
            m.add_model(self._probes[id(m)])
        self._lock = threading.Lock()  # one probe per machine: one question at a time

    def _fire(self, machine: Machine, state: str, trigger: str, group: GroupState | None) -> str | None:
        probe = self._probes[id(machine)]
        with self._lock:
            machine.set_state(state, model=probe)
            probe.group = group
            try:
                ok = probe.trigger(trigger)
            except (MachineError, AttributeError):
                return None
            finally:
                probe.group = None
            return probe.state if ok else None

    def replica_next(self, replica: str, state: str, trigger: str) -> str:
        """Destination of ``trigger`` for a replica in ``state``; IllegalTransition if none."""
        key = (state, trigger)
        if key not in self._replica_cache:  # the replica machine has no guards: memoise
            self._replica_cache[key] = self._fire(self.replica_machine, state, trigger, None)
        dest = self._replica_cache[key]
        if dest is None:
            raise IllegalTransition(replica, state, trigger, self.spec.replica.allowed_triggers(state))
        return dest

    def agent_next(self, group: GroupState, trigger: str) -> str:
        """Destination of an agent-phase trigger whose guards hold; IllegalTransition otherwise."""
        dest = self._fire(self.agent_machine, group.phase, trigger, group)
        if dest is None:
            raise IllegalTransition(
                f"agent of group {group.name}", group.phase, trigger, self.spec.agent.allowed_triggers(group.phase)
            )
        return dest

    def agent_may(self, group: GroupState, trigger: str) -> bool:
        return self._fire(self.agent_machine, group.phase, trigger, group) is not None


@functools.cache
def default_model() -> Model:
    return Model()
