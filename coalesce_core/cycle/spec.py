"""Load ``spec/coalescing.toml`` into frozen records.

The spec file is the single source of the replica and agent state machines;
this module only parses and validates it.  Nothing else in the package names a
state or a transition table of its own.
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from coalesce_core.errors import ConfigError

_FIELDS = ("cycle", "outside")


@attrs.frozen
class StateSpec:
    """One state of a machine, with the per-state attributes of DESIGN §2."""

    name: str
    doc: str = ""
    ref: str = ""
    field: str = ""
    active_fs: str = ""
    exports: str = ""
    stable: bool = False
    in_flight: bool = False


@attrs.frozen
class TransitionSpec:
    """One transition: ``trigger`` moves any of ``source`` to ``dest``."""

    trigger: str
    source: tuple[str, ...]
    dest: str
    ref: str = ""
    doc: str = ""
    conditions: tuple[str, ...] = ()


@attrs.frozen
class MachineSpec:
    """A whole machine: states (in file order), initial state, transitions."""

    name: str
    initial: str
    states: tuple[StateSpec, ...]
    transitions: tuple[TransitionSpec, ...]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def triggers(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.transitions:
            seen.setdefault(t.trigger, None)
        return tuple(seen)

    def state(self, name: str) -> StateSpec:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def edges(self) -> frozenset[tuple[str, str, str]]:
        """Every (trigger, source, dest) triple; used by conformance checks."""
        return frozenset((t.trigger, s, t.dest) for t in self.transitions for s in t.source)

    def next_state(self, state: str, trigger: str) -> str | None:
        for t in self.transitions:
            if t.trigger == trigger and state in t.source:
                return t.dest
        return None

    def allowed_triggers(self, state: str) -> list[str]:
        return [t.trigger for t in self.transitions if state in t.source]


@attrs.frozen
class Spec:
    """The parsed spec: the replica machine, the agent machine, PCPI roles."""

    replica: MachineSpec
    agent: MachineSpec
    cycle_roles: tuple[str, ...]
    individual_role: str
    version: int
    source: str
    #: a resync's writes of a broken replica, kept outside the cycle's and I2's budgets (I11)
    kept_role: str = "kept"
    #: an old coalesced base kept by the retention policy, outside the cycle's budget (I1)
    generation_role: str = "generation"

    def states_in_field(self, field: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.replica.states if s.field == field)

    @property
    def in_flight_states(self) -> frozenset[str]:
        return frozenset(s.name for s in self.replica.states if s.in_flight)

    @property
    def stable_states(self) -> frozenset[str]:
        return frozenset(s.name for s in self.replica.states if s.stable)

    @property
    def jump_ahead_sources(self) -> frozenset[str]:
        return frozenset(s for (trig, s, _d) in self.replica.edges() if trig == "jump_ahead")


def _machine(name: str, table: dict[str, Any], where: str) -> MachineSpec:
    try:
        initial = table["initial"]
        raw_states = table["states"]
        raw_transitions = table["transitions"]
    except KeyError as exc:
        raise ConfigError(f"{where}: [{name}] lacks {exc.args[0]!r}") from None
    allowed = {a.name for a in attrs.fields(StateSpec)} - {"name"}
    for k, v in raw_states.items():
        if not isinstance(v, dict) or set(v) - allowed:
            bad = sorted(set(v) - allowed) if isinstance(v, dict) else v
            raise ConfigError(
                f"{where}: [{name}.states.{k}] has unknown key(s) {bad}", hint=f"known keys: {sorted(allowed)}"
            )
    states = tuple(StateSpec(name=k, **v) for k, v in raw_states.items())
    names = {s.name for s in states}
    if initial not in names:
        raise ConfigError(f"{where}: [{name}] initial state {initial!r} is not a state")
    transitions = []
    for i, t in enumerate(raw_transitions):
        missing = [k for k in ("trigger", "source", "dest") if k not in t]
        if missing:
            raise ConfigError(f"{where}: [{name}] transition #{i} lacks {missing}")
        src = t["source"]
        src = (src,) if isinstance(src, str) else tuple(src)
        tr = TransitionSpec(
            trigger=t["trigger"],
            source=src,
            dest=t["dest"],
            ref=t.get("ref", ""),
            doc=t.get("doc", ""),
            conditions=tuple(t.get("conditions", ())),
        )
        for s in (*tr.source, tr.dest):
            if s not in names:
                raise ConfigError(f"{where}: [{name}] transition #{i} {tr.trigger!r} names unknown state {s!r}")
        transitions.append(tr)
    for st in states:
        if st.field and st.field not in _FIELDS:
            raise ConfigError(f"{where}: state {st.name!r} has field {st.field!r}, expected one of {_FIELDS}")
    return MachineSpec(name=name, initial=initial, states=states, transitions=tuple(transitions))


def parse_spec(text: str, where: str = "<spec>") -> Spec:
    """Parse and validate spec text; raises ConfigError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    meta = data.get("meta", {})
    return Spec(
        replica=_machine("replica", data.get("replica", {}), where),
        agent=_machine("agent", data.get("agent", {}), where),
        cycle_roles=tuple(meta.get("cycle_pcpi_roles", ())),
        individual_role=meta.get("individual_pcpi_role", "individual"),
        version=int(meta.get("version", 0)),
        source=where,
        kept_role=meta.get("kept_pcpi_role", "kept"),
        generation_role=meta.get("generation_pcpi_role", "generation"),
    )


def spec_path() -> Path:
    """Where the spec is read from: the repository's spec/ when present, else the installed copy."""
    repo = Path(__file__).resolve().parents[2] / "spec" / "coalescing.toml"
    if repo.is_file():
        return repo
    return Path(str(resources.files("coalesce_core.cycle") / "coalescing.toml"))


@functools.cache
def load_spec() -> Spec:
    """The spec of this installation (cached; the file is read once)."""
    path = spec_path()
    return parse_spec(path.read_text(encoding="utf-8"), str(path))
