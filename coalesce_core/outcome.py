"""What a cycle came to for each source of a fan-in group (pure): which sources it completed for,
which failed, and whether anything failed that is no source's (docs/cli.md, "Exit codes": a
`run --once` whose cycle completed for some sources and failed for others only exits 10)."""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs

#: the failures (agent.Agent.failures' triggers) that a replica's source answers for: a transfer
#: that failed, a cycle the replica missed because its source was out of reach or refused its PCPI
SOURCE_FAILURES = frozenset({"update_failed", "baseline_failed", "reseed_failed", "straggler_failed", "missed_cycle"})


@attrs.frozen
class SourceOutcome:
    #: the sources whose PCPI of the cycle was taken and none of whose replicas failed
    completed: tuple[str, ...] = ()
    #: the sources that refused or could not be reached, or one of whose replicas failed
    failed: tuple[str, ...] = ()
    #: something failed that is no source's (the destination refused a PCPI, a rollback failed, a
    #: source serves another group of this name: a configuration to fix)
    other: bool = False

    @property
    def partial(self) -> bool:
        """The cycle completed for some sources and failed for others only."""
        return bool(self.completed) and bool(self.failed) and not self.other


def source_outcome(
    taken: Mapping[str, bool],
    origins: Mapping[str, str],
    failures: Iterable[Mapping[str, str]],
    refused: Iterable[str],
    other_refusals: int,
) -> SourceOutcome:
    """``taken``: each source whose PCPI the cycle asked for, True when it was taken; ``origins``:
    each replica's source; ``failures``: the run's failures (``{"replica", "trigger"}``);
    ``refused``: the sources that refused a PCPI (to take or release) or could not be reached;
    ``other_refusals``: the refusals that are no source's."""
    failed = {s for s, ok in taken.items() if not ok} | set(refused)
    other = other_refusals > 0
    for f in failures:
        origin = origins.get(f["replica"])
        if f["trigger"] in SOURCE_FAILURES and origin is not None:
            failed.add(origin)
        else:
            other = True
    completed = sorted(s for s, ok in taken.items() if ok and s not in failed)
    return SourceOutcome(completed=tuple(completed), failed=tuple(sorted(failed)), other=other)
