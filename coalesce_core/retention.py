"""Which retained coalesced generations to keep: the retention policy (docs/config.md, "Retention").

At a jump-ahead the old coalesced base may be kept as a *generation* instead of released, so G
retained points in time cost G destination PCPIs whatever the number of replicas. This module only
decides: it reads no clock (``now`` is an argument), touches no volume and keeps no state. A
:class:`Policy` keeps

* every generation younger than ``keep_min`` seconds;
* for each ``keep`` bucket ``N<unit>`` (``h`` hour, ``d`` day, ``w`` week, ``m`` month, ``y`` year;
  btrbk's preserve rule): the first (oldest) generation of each of the last N calendar periods of
  that unit, counting back from the period of ``now`` (1 of N) or, when a generation is stamped
  after ``now`` (a clock stepped back), from that generation's period, so that a bucket never keeps
  more than N. Periods are those of ``zone`` (an IANA time zone, UTC by default: a day from local
  midnight, an hour of local time, so the local hour that repeats when clocks go back is one period
  and the one that does not exist is none); weeks start on Monday (ISO 8601). With ``prefer_complete`` the
  generation of a period in which most replicas were fresh is kept instead of the first (the
  oldest of those on a tie);
* the newest generation, whenever the policy keeps anything at all;
* every generation that is ``pinned`` or ``exported`` by an uncoalesced replica: never pruned;

and then, with ``max``, prunes the oldest unprotected kept generations until at most ``max`` are
kept (pinned and exported ones count, are never pruned, and say so when they stand past ``max``;
the newest stays even then). The default ``Policy()`` keeps nothing: no history besides the PCPIs
the cycle itself keeps.

Oldest, newest and first mean the order the images were made, the ledger's sequence
(:attr:`Generation.seq`), then the time, then the id: a clock stepped back between two images
stamps the newer one earlier, and the time only says which period each counts in. So the newest
kept is the last image made, ``max`` prunes the first made first, and a newer image stamped early
never displaces the generation its period already keeps.

Properties (tests/core/test_retention.py): a plan is deterministic and idempotent (planning again
over what it keeps, at the same ``now``, prunes nothing more); pinned and exported generations and
the newest are kept; at most ``max`` unprotected ones are kept; every generation has a reason.
Without ``max`` a plan is monotonic: a generation pruned at ``t`` is pruned by the plan at any
``t' > t`` over the same generations plus newer ones (made later: a higher sequence, whatever
their stamps; a period's window only moves forward in time and adding newer generations never
makes an older one the first, or the most complete, of its period). ``max`` cannot keep that promise: it counts what the rules keep *now*, and when a short
bucket lets a newer generation go (its hour leaves ``24h``), room opens under ``max`` for an older
one that a long bucket still keeps (the first of the year), which ``max`` had pruned before. What
holds with ``max``: a generation pruned at ``t`` for any reason but ``max`` stays pruned.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from coalesce_core.durations import format_duration
from coalesce_core.errors import ConfigError

#: the bucket units, shortest period first: unit -> its name in reasons
UNITS: dict[str, str] = {"h": "hour", "d": "day", "w": "week", "m": "month", "y": "year"}

#: the PCPIs a cycle works with besides retained generations (base, rollback, jump-ahead, new base)
WORKING_PCPIS = 4

_TOKEN = re.compile(r"^([+-]?\d+)([A-Za-z]*)$")


@attrs.frozen
class Keep:
    """One calendar bucket: the first generation of each of the last ``count`` periods of ``unit``."""

    unit: str
    count: int

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


def parse_keep(text: str) -> tuple[Keep, ...]:
    """The buckets of ``text`` (``"24h 14d 8w 12m 2y"``: whitespace-separated counts and units h, d,
    w, m (month, not minute), y), shortest unit first whatever the order written; ``""`` is none.
    ValueError, naming the word, for an unknown unit, a count below 1 or a unit given twice."""
    if not isinstance(text, str):
        raise ValueError(f'keep must be a text like "24h 14d 8w 12m 2y", not {text!r}')
    seen: dict[str, tuple[str, int]] = {}
    for word in text.split():
        m = _TOKEN.match(word)
        if m is None:
            raise ValueError(f"{word!r} is not a count and a unit (write e.g. 14d)")
        number, unit = m.groups()
        if unit not in UNITS:
            raise ValueError(
                f"{word!r}: unknown unit {unit!r} (units: h hours, d days, w weeks, m months, y years)"
                if unit
                else f"{word!r} has no unit (units: h hours, d days, w weeks, m months, y years)"
            )
        if int(number) < 1:
            raise ValueError(f"{word!r}: the count must be at least 1 (leave the unit out to keep none)")
        if unit in seen:
            raise ValueError(f"{word!r}: unit {unit!r} appears twice (also {seen[unit][0]!r})")
        seen[unit] = (word, int(number))
    return tuple(Keep(unit, seen[unit][1]) for unit in UNITS if unit in seen)


def _keep(value: Any) -> tuple[Keep, ...]:
    return parse_keep(value) if isinstance(value, str) else tuple(value)


def _check_keep_min(_: Any, __: Any, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"keep_min must be a finite number of seconds >= 0, not {value!r}")


def known_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone of the system's database (or tzdata's)."""
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _check_zone(_: Any, __: Any, value: str) -> None:
    if not known_zone(value):
        raise ValueError(f"unknown time zone {value!r}")


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _check_max(_: Any, __: Any, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max must be a whole number >= 1, not {value!r}")


@attrs.frozen
class Policy:
    """What to keep of the retained generations (the module's docstring); ``Policy()`` keeps none.

    ``keep`` takes the text of :func:`parse_keep` or its result. ValueError for a negative
    ``keep_min``, a ``max`` below 1, and a ``max`` with nothing for it to bound."""

    keep_min: float = attrs.field(default=0.0, converter=float, validator=_check_keep_min)
    keep: tuple[Keep, ...] = attrs.field(default=(), converter=_keep)
    max: int | None = attrs.field(default=None, validator=_check_max)
    prefer_complete: bool = False
    #: the IANA time zone of the calendar periods (the module's docstring)
    zone: str = attrs.field(default="UTC", validator=_check_zone)

    def __attrs_post_init__(self) -> None:
        if self.max is not None and not self.retains:
            raise ValueError("max bounds what keep_min and keep keep: alone it keeps nothing")

    @property
    def retains(self) -> bool:
        """Whether the policy keeps any generation (the default keeps none)."""
        return self.keep_min > 0 or bool(self.keep)


def limit(policy: Policy) -> int | None:
    """The most unprotected generations ``policy`` can keep: ``max``, else None when ``keep_min``
    keeps every recent one (unbounded), else one per bucket period plus the newest."""
    bound = None if policy.keep_min > 0 else (sum(k.count for k in policy.keep) + 1 if policy.keep else 0)
    if policy.max is None:
        return bound
    return policy.max if bound is None else min(bound, policy.max)


def check_capacity(policy: Policy, pcpi_limit: int | None) -> None:
    """ConfigError when the generations ``policy`` can keep, with the cycle's
    :data:`WORKING_PCPIS`, could exceed ``pcpi_limit`` PCPIs of the destination (None: the
    destination declares no limit, and nothing is checked)."""
    if pcpi_limit is None:
        return
    room = pcpi_limit - WORKING_PCPIS
    most = limit(policy)
    if most is not None and most <= room:
        return
    if room < 1:
        raise ConfigError(
            f"[retention] keeps generations, but the destination holds at most {pcpi_limit} PCPIs, "
            f"which the cycle's {WORKING_PCPIS} working PCPIs fill",
            hint="remove [retention]: this destination has no room for history",
        )
    can = "an unbounded number of" if most is None else f"up to {most}"
    raise ConfigError(
        f"[retention] can keep {can} generations, but the destination holds at most {pcpi_limit} PCPIs "
        f"({room} besides the cycle's {WORKING_PCPIS} working PCPIs)",
        hint=f"set `max = {room}` (or less) in [retention]",
    )


@attrs.frozen
class Generation:
    """A retained coalesced generation as the policy sees it: ``time`` in epoch seconds, ``fresh``
    the replicas fresh in it (a fact of the generation whatever the policy; only ``prefer_complete``
    decides by it), ``pinned`` by a person, ``exported`` by an uncoalesced replica, ``seq``
    its place in the order the images were made (higher: made later, whatever the clock said)."""

    id: str
    time: float = attrs.field(converter=float)
    fresh: int = 0
    pinned: bool = False
    exported: bool = False
    seq: int = 0

    @time.validator
    def _finite(self, _: Any, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"generation {self.id!r}: time must be finite, not {value!r}")

    @property
    def protected(self) -> bool:
        """Never pruned: pinned, or exported by an uncoalesced replica."""
        return self.pinned or self.exported


@attrs.frozen
class Decision:
    """Keep or prune one generation, and why (every decision has at least one reason)."""

    generation: Generation
    keep: bool
    reasons: tuple[str, ...]


@attrs.frozen
class Plan:
    """The decisions over a set of generations, oldest first."""

    now: float
    policy: Policy
    decisions: tuple[Decision, ...]

    @property
    def kept(self) -> tuple[Generation, ...]:
        return tuple(d.generation for d in self.decisions if d.keep)

    @property
    def pruned(self) -> tuple[Generation, ...]:
        return tuple(d.generation for d in self.decisions if not d.keep)

    def decision(self, id: str) -> Decision:
        """The decision about generation ``id`` (KeyError if the plan has none)."""
        for d in self.decisions:
            if d.generation.id == id:
                return d
        raise KeyError(id)


def _local(t: float, zone: str) -> float:
    """Epoch second ``t`` moved by ``zone``'s UTC offset at ``t``: the UTC arithmetic of
    :func:`_period` on it gives ``zone``'s calendar periods."""
    if zone == "UTC":
        return t
    offset = _offset(zone, math.floor(t / 900))
    return t + (offset if offset is not None else _offset_at(zone, t))


@functools.lru_cache(maxsize=65536)
def _offset(zone: str, quarter: int) -> float | None:
    """``zone``'s UTC offset in seconds throughout quarter-hour ``quarter`` since the epoch, None
    when it changes within it (cached: a plan asks for the same times again and again)."""
    first, last = _offset_at(zone, quarter * 900), _offset_at(zone, quarter * 900 + 899.999999)
    return first if first == last else None


def _offset_at(zone: str, t: float) -> float:
    offset = datetime.fromtimestamp(t, _zone(zone)).utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def _period(unit: str, t: float) -> int:
    """The index of the UTC period of ``unit`` holding epoch second ``t`` (consecutive periods:
    consecutive indexes); :func:`_local` first for another zone's periods."""
    if unit == "h":
        return math.floor(t / 3600)
    day = math.floor(t / 86400)
    if unit == "d":
        return day
    if unit == "w":
        return (day + 3) // 7  # 1970-01-01 is a Thursday: weeks from Monday 1969-12-29
    year, month = _month(day)
    return year * 12 + month - 1 if unit == "m" else year


@functools.lru_cache(maxsize=4096)
def _month(day: int) -> tuple[int, int]:
    """The year and month of UTC day ``day`` (days since 1970-01-01); cached: a plan asks for the
    same days again and again, and a datetime is what a plan at each jump-ahead spends most on."""
    when = datetime.fromtimestamp(day * 86400, UTC)
    return when.year, when.month


@functools.lru_cache(maxsize=4096)
def _label(unit: str, period: int) -> str:
    """Period ``period`` of ``unit`` (an index of :func:`_period`) as reasons name it."""
    if unit == "h":
        return datetime.fromtimestamp(period * 3600, UTC).strftime("%Y-%m-%d %H:00")
    if unit == "d":
        return datetime.fromtimestamp(period * 86400, UTC).strftime("%Y-%m-%d")
    if unit == "w":
        year, week, _ = datetime.fromtimestamp((period * 7 - 3) * 86400, UTC).isocalendar()
        return f"{year}-W{week:02d}"
    return f"{period // 12:04d}-{period % 12 + 1:02d}" if unit == "m" else f"{period:04d}"


def _order(g: Generation) -> tuple[int, float, str]:
    """Oldest first: the order the images were made, then their stamps (the module's docstring)."""
    return (g.seq, g.time, g.id)


def plan(generations: Iterable[Generation], now: float, policy: Policy) -> Plan:
    """Keep or prune each of ``generations`` at epoch second ``now`` under ``policy`` (the module's
    docstring). A kept generation's reasons say what keeps it; a pruned one's what does not (or,
    pruned by ``max``, what kept it and ``max``). Deterministic: the same generations in any order
    give the same plan. ValueError when two generations share an id."""
    gens = sorted(generations, key=_order)
    if len({g.id for g in gens}) != len(gens):
        raise ValueError("two generations share an id")
    why: dict[str, list[str]] = {g.id: [] for g in gens}  # what keeps it
    why_not: dict[str, list[str]] = {g.id: [] for g in gens}  # what does not
    for g in gens:
        if g.pinned:
            why[g.id].append("pinned")
        if g.exported:
            why[g.id].append("exported by an uncoalesced replica")
    if not policy.retains:
        for g in gens:
            why_not[g.id].append("no retention: the policy keeps no generation")
    if policy.keep_min > 0:
        span = format_duration(policy.keep_min)
        for g in gens:
            if now - g.time < policy.keep_min:
                why[g.id].append(f"younger than keep_min {span}")
            else:
                why_not[g.id].append(f"older than keep_min {span}")
    for bucket in policy.keep:
        _bucket(bucket, gens, now, policy.prefer_complete, why, why_not, policy.zone)
    if gens and policy.retains:
        why[gens[-1].id].append("newest generation")
    keep = {g.id for g in gens if why[g.id]}
    if policy.max is not None:
        kept = [g for g in gens if g.id in keep]
        excess = len(kept) - policy.max
        for g in kept:
            if excess <= 0:
                break
            if not g.protected and g is not gens[-1]:
                keep.discard(g.id)
                why[g.id].append(f"over max {policy.max}: the oldest are pruned first")
                excess -= 1
        if excess > 0:
            for g in kept:
                if g.protected:
                    why[g.id].append(f"past max {policy.max}, yet never pruned")
                elif g is gens[-1]:
                    why[g.id].append(f"past max {policy.max}, yet the newest is always kept")
    return Plan(
        now=now,
        policy=policy,
        decisions=tuple(Decision(g, g.id in keep, tuple(why[g.id] if why[g.id] else why_not[g.id])) for g in gens),
    )


def _bucket(
    bucket: Keep,
    gens: list[Generation],
    now: float,
    prefer_complete: bool,
    why: dict[str, list[str]],
    why_not: dict[str, list[str]],
    zone: str = "UTC",
) -> None:
    """Add the reasons of ``bucket`` to ``why`` and ``why_not`` (``gens``: oldest first)."""
    name = UNITS[bucket.unit]
    periods: dict[int, list[Generation]] = {}
    for g in gens:
        periods.setdefault(_period(bucket.unit, _local(g.time, zone)), []).append(g)
    anchor = max([_period(bucket.unit, _local(now, zone)), *periods])
    for p, members in periods.items():
        back = anchor - p
        label = _label(bucket.unit, p)
        if back >= bucket.count:
            older = f"{name} {label} is older than the last {bucket.count} kept"
            for g in members:
                why_not[g.id].append(older)
            continue
        if prefer_complete:
            best = min(members, key=lambda g: (-g.fresh, *_order(g)))
            what = f"most complete ({best.fresh} fresh) of {name}"
        else:
            best, what = members[0], f"first of {name}"
        why[best.id].append(f"{what} {label} ({back + 1} of {bucket.count})")
        other = f"{name} {label} keeps {best.id}"
        for g in members:
            if g is not best:
                why_not[g.id].append(other)
