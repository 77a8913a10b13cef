"""Requests handed to a running agent: the pure part (docs/operations.md, "Changing a group while it runs").

A verb that changes the group (``break``, ``resync``, ``release``, ``reseed``, ``add``, ``remove``, ``pin``,
``unpin``) and finds a
running ``coalesce run`` holding the group's lock (coalesce_core.grouplock) appends a request to the
queue in the ledger (coalesce_core.ledger: durable before the verb waits for it).  The agent takes the
pending requests, oldest first, at its safe points: between cycles, and in the wait after a failed
cycle.  It decides each one as the event it names (:func:`event_for`, coalesce_core.cycle.events) and
answers it in the same transaction that commits the decision, so a crash never takes a request twice
nor loses one; a request the planner refuses is answered with the error.  The verb waits for the
answer and prints it (or leaves at once with ``--no-wait``); a request the agent has not taken when
the verb stops waiting is withdrawn, so a verb that said it failed never takes effect later.

Mid-cycle requests are not taken: a request waits for the end of the cycle under way.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from coalesce_core.cycle import events as ev
from coalesce_core.cycle.state import DEFAULT_SOURCE
from coalesce_core.errors import CoalesceError

#: the verbs whose requests a running agent takes, and the arguments each one carries
VERBS: Mapping[str, tuple[str, ...]] = {
    "break": ("replica",),
    "resync": ("replica", "discard"),
    "release": ("replica",),
    "reseed": ("replica", "reason"),
    "add": ("replica", "source", "from"),
    "remove": ("replica",),
    "pin": ("generation",),
    "unpin": ("generation",),
}

PENDING = "pending"
DONE = "done"
REFUSED = "refused"
WITHDRAWN = "withdrawn"
#: a request in one of these states is answered and never changes again
ANSWERED = frozenset({DONE, REFUSED, WITHDRAWN})
STATUSES = (PENDING, *sorted(ANSWERED))


def _args(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(value)


@attrs.frozen
class Request:
    """One request of the queue.

    ``asked``: when the verb queued it; ``answered``: when the agent decided it, or when it was
    withdrawn (0 while pending); ``message``/``hint``/``exit_code``: the refusal (the verb's error
    and exit code), or what was done."""

    id: int
    verb: str = attrs.field(validator=attrs.validators.in_(tuple(VERBS)))
    args: Mapping[str, str] = attrs.field(converter=_args)
    status: str = attrs.field(default=PENDING, validator=attrs.validators.in_(STATUSES))
    asked: float = 0.0
    pid: int = 0
    answered: float = 0.0
    message: str = ""
    hint: str = ""
    exit_code: int = 0

    @property
    def replica(self) -> str:
        return self.args.get("replica", "")

    def describe(self) -> str:
        """The request as a person reads it: ``request 7 (break A)``, ``request 8 (pin 12)``."""
        return f"request {self.id} ({self.verb} {self.replica or self.args.get('generation', '')})"

    def data(self) -> dict[str, Any]:
        """The request in `status --json` (docs/schemas/status.schema.json)."""
        return {
            "id": self.id,
            "verb": self.verb,
            "replica": self.replica,
            "status": self.status,
            "asked": self.asked,
            "answered": self.answered or None,
            "message": self.message,
        }


def make_args(verb: str, **given: str | None) -> dict[str, str]:
    """The arguments of a ``verb`` request: the ones :data:`VERBS` names, given ones only."""
    return {k: v for k in VERBS[verb] if (v := given.get(k)) is not None}


def event_for(request: Request) -> object:
    """The event of the pure cycle that ``request`` asks for."""
    a = request.args
    if request.verb in ("pin", "unpin"):
        return ev.PinGeneration(generation=a["generation"], pinned=request.verb == "pin")
    name = a["replica"]
    if request.verb == "break":
        return ev.BreakMirror(replica=name)
    if request.verb == "resync":
        return ev.Resync(replica=name, discard=a.get("discard") == "yes")
    if request.verb == "release":
        return ev.ReleaseKept(replica=name)
    if request.verb == "reseed":
        return ev.Reseed(replica=name, reason=a.get("reason") or "requested by the operator (coalesce reseed)")
    if request.verb == "add":
        # the source: ``from`` when the verb named one, else the agent's choice (Agent._origin)
        return ev.AddReplica(name=name, source_qtree=a.get("source") or name, origin=a.get("from") or DEFAULT_SOURCE)
    return ev.RemoveReplica(replica=name)


def outcome(request: Request, replicas: Mapping[str, Any]) -> str:
    """What a request that was taken did, from the replicas after its decision."""
    if request.verb in ("pin", "unpin"):
        return f"generation {request.args.get('generation', '')} {request.verb}ned"
    name = request.replica
    r = replicas.get(name)
    if request.verb == "release":
        return f"the kept writes of replica {name} released"
    if request.verb == "remove" or r is None:
        return f"replica {name} removed"
    if request.verb == "add":
        return f"replica {name} added (source qtree {r.source_qtree}), {r.state}"
    return f"replica {name} is {r.state}"


def done(request: Request, now: float, replicas: Mapping[str, Any]) -> Request:
    """``request`` answered: taken, with what it did (:func:`outcome`)."""
    return attrs.evolve(request, status=DONE, answered=now, message=outcome(request, replicas), hint="", exit_code=0)


def refused(request: Request, now: float, exc: CoalesceError) -> Request:
    """``request`` answered: refused with ``exc`` (its message, hint and exit code)."""
    return attrs.evolve(
        request, status=REFUSED, answered=now, message=exc.message, hint=exc.hint or "", exit_code=exc.exit_code
    )
