"""Which image a history verb reads: ``REPLICA[@GEN]`` parsed, GEN resolved, and an image that holds no
source point of the replica refused (docs/cli.md, `ls`).

GEN is a generation's id as `coalesce generations` prints it (the sequence number in its PCPI's
name), an ISO time (``2026-12-01T03:00``, UTC unless it names its zone) meaning the newest
generation taken at or before it, or ``latest`` (the newest generation); no GEN is the current
coalesced base. Newest means made last, in the ledger's sequence (``state.generations()`` order), as
the retention policy counts it: a clock stepped back between two images stamps the newer one
earlier, and a time names the newest made of those stamped at or before it. Pure: no clock, no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime

from coalesce_core.cycle.generations import OUTSIDE, image_time
from coalesce_core.cycle.invariants import seq_of
from coalesce_core.cycle.state import GroupState, Pcpi
from coalesce_core.errors import NotFound

LATEST = "latest"


def split(ref: str) -> tuple[str, str | None]:
    """``"A@12"`` -> ``("A", "12")``; ``"A"`` -> ``("A", None)``. NotFound for an empty part."""
    name, at, gen = ref.partition("@")
    if not name or (at and not gen):
        raise NotFound(
            f"{ref!r} names no replica and generation",
            hint="write REPLICA or REPLICA@GEN (GEN: an id of `coalesce generations`, an ISO time, or latest)",
        )
    return name, (gen if at else None)


def _when(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _at(seconds: float) -> datetime:
    """An image's time as an ISO time names it (to the microsecond), so that the time `generations`
    shows for an image is at or after that image, never a float's rounding before it."""
    return datetime.fromtimestamp(seconds, UTC)


def resolve(state: GroupState, gen: str | None) -> Pcpi:
    """The PCPI of coalesced image ``gen`` (the module's docstring) in ``state``; NotFound, with
    the generations there are, when none matches."""
    gens = state.generations()
    ids = ", ".join(str(seq_of(p.name)) for p in gens) or "none"
    hint = f"generations: {ids} (`coalesce generations` lists them)"
    if gen is None:
        base = state.base()
        if base is None or not base.taken:
            raise NotFound(
                f"group {state.name!r} has no coalesced base yet", hint="run a cycle first (`coalesce run --once`)"
            )
        return base
    if gen == LATEST:
        if not gens:
            raise NotFound(
                f"group {state.name!r} keeps no generations",
                hint='add [retention] to the config (docs/config.md, "Retention")',
            )
        return gens[-1]
    if gen.isdigit():
        for p in gens:
            if seq_of(p.name) == int(gen):
                return p
        raise NotFound(f"group {state.name!r} has no generation {gen}", hint=hint)
    when = _when(gen)
    if when is None:
        raise NotFound(
            f"{gen!r} is not a generation id, an ISO time or {LATEST!r}",
            hint=f"e.g. @12, @2026-12-01T03:00 or @latest; {hint}",
        )
    before = [p for p in gens if _at(image_time(state.manifests, p)) <= when]
    if not before:
        raise NotFound(f"group {state.name!r} has no generation taken at or before {gen}", hint=hint)
    return before[-1]


def replica(state: GroupState, name: str) -> str:
    """The destination qtree of replica ``name`` (its name); NotFound for an unknown one."""
    if name not in state.replicas:
        raise NotFound(
            f"no replica {name!r} in group {state.name!r}",
            hint=f"replicas: {', '.join(sorted(state.replicas)) or 'none'}",
        )
    return name


def holding(state: GroupState, name: str, image: Pcpi) -> None:
    """NotFound when coalesced image ``image`` holds no source point of replica ``name``: its manifest
    says the replica was outside the cycle (uncoalesced, straggling, broken), so the image holds its
    active file system as it was then, perhaps an update half-applied; its readers saw its own image.
    An image without a manifest, or without an entry for it, is not refused."""
    manifest = state.manifests.get(image.name)
    entry = next((e for e in manifest.entries if e.replica == name), None) if manifest is not None else None
    if entry is None or entry.status != OUTSIDE:
        return
    usable = [
        str(seq_of(p.name))
        for p in state.generations()
        if (m := state.manifests.get(p.name)) is not None
        and any(e.replica == name and e.status != OUTSIDE for e in m.entries)
    ]
    raise NotFound(
        f"coalesced image {seq_of(image.name)} holds no source point of replica {name!r}: it was outside "
        "the cycle then (its update under way, or its image its own PCPI), so its files there may be a "
        "partial update",
        hint=f"generations that hold it: {', '.join(usable) or 'none'} (`coalesce generations` shows each "
        "replica's status)",
    )
