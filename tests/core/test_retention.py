"""coalesce_core.retention: which retained coalesced generations a policy keeps, and why.

Example plans at fixed UTC times, then the properties the module's docstring promises, checked by
hypothesis over random generations and policies.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalesce_core.errors import ConfigError
from coalesce_core.retention import (
    WORKING_PCPIS,
    Generation,
    Keep,
    Policy,
    check_capacity,
    limit,
    parse_keep,
    plan,
)

HOUR, DAY = 3600.0, 86400.0


def at(text: str) -> float:
    """Epoch seconds of a UTC time written ``2026-12-07T12:30``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def gen(id: str, when: str, **kw) -> Generation:
    return Generation(id, at(when), **kw)


def kept_ids(p) -> list[str]:
    return [g.id for g in p.kept]


# --- parse_keep and the policy's values ------------------------------------------------------


def test_parse_keep_reads_counts_and_units_shortest_unit_first():
    assert parse_keep("24h 14d 8w 12m 2y") == (Keep("h", 24), Keep("d", 14), Keep("w", 8), Keep("m", 12), Keep("y", 2))
    assert parse_keep("  2y\t7d ") == (Keep("d", 7), Keep("y", 2))
    assert parse_keep("") == ()
    assert str(Keep("m", 12)) == "12m"


@pytest.mark.parametrize(
    "text, words",
    [
        ("14x", ["'14x'", "unknown unit 'x'"]),
        ("14D", ["unknown unit 'D'"]),
        ("14min", ["unknown unit 'min'"]),
        ("14", ["no unit"]),
        ("0d", ["at least 1"]),
        ("-3d", ["at least 1"]),
        ("7d 24h 3d", ["'3d'", "twice", "'7d'"]),
        ("d", ["not a count and a unit"]),
        ("1.5d", ["not a count and a unit"]),
        ("all", ["not a count and a unit"]),
    ],
)
def test_parse_keep_says_what_is_wrong(text, words):
    with pytest.raises(ValueError) as info:
        parse_keep(text)
    for word in words:
        assert word in str(info.value)


def test_policy_takes_the_keep_text_or_its_buckets():
    assert Policy(keep="14d 2y") == Policy(keep=(Keep("d", 14), Keep("y", 2)))
    assert Policy(keep="2y 14d").keep == (Keep("d", 14), Keep("y", 2))
    assert not Policy().retains and Policy(keep_min=60).retains and Policy(keep="1d").retains


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"keep_min": -1}, "keep_min"),
        ({"keep_min": float("inf")}, "keep_min"),
        ({"keep": "1d", "max": 0}, "max"),
        ({"keep": "1d", "max": True}, "max"),
        ({"max": 5}, "alone it keeps nothing"),
        ({"keep": "0d"}, "at least 1"),
    ],
)
def test_policy_refuses_bad_values(kw, words):
    with pytest.raises(ValueError, match=words):
        Policy(**kw)


def test_limit():
    assert limit(Policy()) == 0
    assert limit(Policy(keep="24h 14d 8w 12m 2y")) == 24 + 14 + 8 + 12 + 2 + 1  # one a period, and the newest
    assert limit(Policy(keep="24h 14d", max=10)) == 10
    assert limit(Policy(keep="3d", max=10)) == 4
    assert limit(Policy(keep_min=DAY)) is None  # every generation of the last day: unbounded
    assert limit(Policy(keep_min=DAY, keep="7d", max=30)) == 30


def test_check_capacity():
    check_capacity(Policy(keep="24h 14d"), None)  # the destination declares no limit
    check_capacity(Policy(), 4)
    check_capacity(Policy(keep="24h 14d"), 39 + WORKING_PCPIS)
    with pytest.raises(ConfigError) as info:
        check_capacity(Policy(keep="24h 14d"), 38 + WORKING_PCPIS)
    assert "up to 39" in str(info.value) and "[retention]" in str(info.value) and info.value.exit_code == 2
    assert info.value.hint == "set `max = 38` (or less) in [retention]"
    with pytest.raises(ConfigError, match="unbounded") as info:
        check_capacity(Policy(keep_min=DAY), 255)
    assert "max = 251" in info.value.hint
    check_capacity(Policy(keep_min=DAY, max=251), 255)
    with pytest.raises(ConfigError, match="working PCPIs fill") as info:
        check_capacity(Policy(keep="1d"), 4)
    assert "remove [retention]" in info.value.hint


# --- example plans ------------------------------------------------------------------------------

#: the worked example of docs/config.md, "Retention"
NOW = at("2026-12-07T12:30")  # a Monday
EXAMPLE = [
    gen("2025-01-03", "2025-01-03T00:00"),
    gen("12-05a", "2026-12-05T01:00", fresh=2),
    gen("12-05b", "2026-12-05T13:00", fresh=3),
    gen("12-06", "2026-12-06T10:00"),
    gen("12-07a", "2026-12-07T11:00"),
    gen("12-07b", "2026-12-07T12:00"),
]


def test_the_worked_example_of_the_docs():
    p = plan(EXAMPLE, NOW, Policy(keep="24h 14d 8w 12m 2y"))
    assert kept_ids(p) == ["2025-01-03", "12-05a", "12-06", "12-07a", "12-07b"]
    assert p.decision("2025-01-03").reasons == ("first of year 2025 (2 of 2)",)
    assert p.decision("12-05a").reasons == (
        "first of day 2026-12-05 (3 of 14)",
        "first of week 2026-W49 (2 of 8)",
        "first of month 2026-12 (1 of 12)",
        "first of year 2026 (1 of 2)",
    )
    assert p.decision("12-05b").reasons == (
        "hour 2026-12-05 13:00 is older than the last 24 kept",
        "day 2026-12-05 keeps 12-05a",
        "week 2026-W49 keeps 12-05a",
        "month 2026-12 keeps 12-05a",
        "year 2026 keeps 12-05a",
    )
    assert p.decision("12-07a").reasons == (
        "first of hour 2026-12-07 11:00 (2 of 24)",
        "first of day 2026-12-07 (1 of 14)",
        "first of week 2026-W50 (1 of 8)",
    )
    assert p.decision("12-07b").reasons == ("first of hour 2026-12-07 12:00 (1 of 24)", "newest generation")
    assert [d.generation.id for d in p.decisions] == [g.id for g in EXAMPLE]  # oldest first


def test_the_plan_does_not_depend_on_the_order_given():
    shuffled = EXAMPLE[:]
    random.Random(7).shuffle(shuffled)
    policy = Policy(keep="24h 14d 8w 12m 2y")
    assert plan(shuffled, NOW, policy) == plan(EXAMPLE, NOW, policy)


def test_the_default_policy_keeps_nothing_but_protected_generations():
    gens = [gen("a", "2026-12-07T10:00"), gen("b", "2026-12-07T11:00", pinned=True), gen("c", "2026-12-07T12:00")]
    p = plan(gens, NOW, Policy())
    assert kept_ids(p) == ["b"]
    assert p.decision("c").reasons == ("no retention: the policy keeps no generation",)
    assert p.decision("b").reasons == ("pinned",)
    assert plan([], NOW, Policy(keep="1d")).decisions == ()


def test_keep_min_keeps_what_is_younger_and_nothing_as_old():
    gens = [gen("old", "2026-12-06T12:30"), gen("young", "2026-12-06T12:31"), gen("new", "2026-12-07T12:00")]
    p = plan(gens, NOW, Policy(keep_min=DAY))
    assert kept_ids(p) == ["young", "new"]
    assert p.decision("old").reasons == ("older than keep_min 1d",)  # exactly one day old is not younger
    assert p.decision("young").reasons == ("younger than keep_min 1d",)


def test_weeks_start_on_monday():
    sunday, monday = gen("sun", "2026-12-06T23:00"), gen("mon", "2026-12-07T00:00")
    p = plan([gen("sat", "2026-12-05T00:00"), sunday, monday, gen("mon2", "2026-12-07T09:00")], NOW, Policy(keep="2w"))
    assert kept_ids(p) == ["sat", "mon", "mon2"]  # mon2: the newest
    assert p.decision("sun").reasons == ("week 2026-W49 keeps sat",)
    assert p.decision("mon").reasons == ("first of week 2026-W50 (1 of 2)",)


def test_periods_are_utc_whatever_the_local_time_zone(monkeypatch):
    gens = [gen("late", "2026-12-05T23:30"), gen("early", "2026-12-06T00:30"), gen("new", "2026-12-07T12:00")]
    expected = plan(gens, NOW, Policy(keep="3d"))
    assert kept_ids(expected) == ["late", "early", "new"]
    for zone in ("Pacific/Kiritimati", "America/Los_Angeles"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert plan(gens, NOW, Policy(keep="3d")) == expected
    monkeypatch.delenv("TZ")
    time.tzset()
    assert os.environ.get("TZ") is None


def test_months_and_years_count_back_across_the_new_year():
    gens = [gen("nov", "2025-11-30T23:59"), gen("dec", "2025-12-01T00:00"), gen("jan", "2026-01-15T00:00")]
    p = plan(gens, at("2026-01-20T00:00"), Policy(keep="2m"))
    assert kept_ids(p) == ["dec", "jan"]
    assert p.decision("nov").reasons == ("month 2025-11 is older than the last 2 kept",)
    assert p.decision("dec").reasons == ("first of month 2025-12 (2 of 2)",)
    p = plan(gens, at("2026-01-20T00:00"), Policy(keep="2y"))
    assert kept_ids(p) == ["nov", "jan"]
    assert p.decision("nov").reasons == ("first of year 2025 (2 of 2)",)


def test_prefer_complete_keeps_the_most_fresh_and_the_oldest_of_a_tie():
    gens = [
        gen("a", "2026-12-05T01:00", fresh=2),
        gen("b", "2026-12-05T02:00", fresh=5),
        gen("c", "2026-12-05T03:00", fresh=5),
        gen("d", "2026-12-06T01:00", fresh=1),
        gen("e", "2026-12-07T12:00", fresh=0),
    ]
    p = plan(gens, NOW, Policy(keep="3d", prefer_complete=True))
    assert kept_ids(p) == ["b", "d", "e"]
    assert p.decision("b").reasons == ("most complete (5 fresh) of day 2026-12-05 (3 of 3)",)
    assert p.decision("a").reasons == p.decision("c").reasons == ("day 2026-12-05 keeps b",)
    assert kept_ids(plan(gens, NOW, Policy(keep="3d"))) == ["a", "d", "e"]


def test_max_prunes_the_oldest_unprotected_first():
    gens = [gen(f"d{day}", f"2026-12-0{day}T06:00") for day in range(1, 8)]
    p = plan(gens, NOW, Policy(keep="14d", max=3))
    assert kept_ids(p) == ["d5", "d6", "d7"]
    assert p.decision("d4").reasons == ("first of day 2026-12-04 (4 of 14)", "over max 3: the oldest are pruned first")
    pinned = [attrs.evolve(g, pinned=True) if g.id == "d1" else g for g in gens]
    p = plan(pinned, NOW, Policy(keep="14d", max=3))
    assert kept_ids(p) == ["d1", "d6", "d7"]  # the pinned one counts against max
    assert p.decision("d1").reasons == ("pinned", "first of day 2026-12-01 (7 of 14)")


def test_protected_generations_and_the_newest_stay_past_max():
    gens = [
        gen("p", "2026-12-01T00:00", pinned=True),
        gen("x", "2026-12-02T00:00", exported=True),
        gen("q", "2026-12-03T00:00"),
        gen("n", "2026-12-07T00:00"),
    ]
    p = plan(gens, NOW, Policy(keep="14d", max=1))
    assert kept_ids(p) == ["p", "x", "n"]
    assert p.decision("p").reasons[-1] == "past max 1, yet never pruned"
    assert p.decision("x").reasons == (
        "exported by an uncoalesced replica",
        "first of day 2026-12-02 (6 of 14)",
        "past max 1, yet never pruned",
    )
    assert p.decision("n").reasons[-1] == "past max 1, yet the newest is always kept"
    assert p.decision("q").reasons[-1] == "over max 1: the oldest are pruned first"


def test_a_generation_stamped_after_now_anchors_the_count():
    """A clock stepped back: the count starts at the newest generation's period, so a bucket never keeps
    more than its count."""
    gens = [gen("a", "2026-12-07T00:00"), gen("b", "2026-12-08T00:00"), gen("c", "2026-12-09T00:00")]
    p = plan(gens, NOW, Policy(keep="2d"))
    assert kept_ids(p) == ["b", "c"]
    assert p.decision("b").reasons == ("first of day 2026-12-08 (2 of 2)",)


def test_max_is_not_monotonic():
    """The module's docstring: a generation max pruned comes back into the plan once a short bucket lets a
    newer one go (so the agent must prune what a plan prunes, not re-plan the full set later)."""
    gens = [gen("jan", "2026-01-01T00:00"), gen("h10", "2026-12-07T10:05"), gen("h11", "2026-12-07T11:05")]
    policy = Policy(keep="2h 1y", max=2)
    assert kept_ids(plan(gens, at("2026-12-07T11:10"), policy)) == ["h10", "h11"]
    assert kept_ids(plan(gens, at("2026-12-07T13:00"), policy)) == ["jan", "h11"]


def test_duplicate_ids_and_bad_times_are_refused():
    with pytest.raises(ValueError, match="share an id"):
        plan([gen("a", "2026-12-01T00:00"), gen("a", "2026-12-02T00:00")], NOW, Policy(keep="1d"))
    with pytest.raises(ValueError, match="finite"):
        Generation("a", float("nan"))


# --- properties ---------------------------------------------------------------------------------

T0 = at("2026-06-15T00:00")
SPAN = 3 * 366 * DAY  # generations up to three years old
AHEAD = T0 + 2 * DAY  # and some stamped after now: a clock stepped back


@st.composite
def generations(
    draw, *, latest: float, earliest: float = T0 - SPAN, prefix: str = "g", first_seq: int = 0
) -> list[Generation]:
    """Generations between ``earliest`` and ``latest``: spread out, or crowded into a few days so that
    periods hold several; made in the order of their stamps, or (a clock that jumps) in any order,
    their sequences counting from ``first_seq``."""
    n = draw(st.integers(0, 25))
    crowd = draw(st.booleans())
    low = max(earliest, latest - 4 * DAY) if crowd else earliest
    times = draw(st.lists(st.integers(int(low), int(latest)), min_size=n, max_size=n))
    made = list(range(first_seq, first_seq + n))
    if draw(st.booleans()):
        times.sort()  # a steady clock: made in the order of their stamps
    return [
        Generation(
            f"{prefix}{i}",
            t,
            fresh=draw(st.integers(0, 4)),
            pinned=draw(st.booleans()) if i % 7 == 3 else False,
            exported=draw(st.booleans()) if i % 5 == 4 else False,
            seq=made[i],
        )
        for i, t in enumerate(times)
    ]


@st.composite
def policies(draw, *, with_max: bool | None = None) -> Policy:
    keep_min = draw(st.sampled_from([0.0, 0.0, HOUR, DAY, 10 * DAY]))
    units = draw(st.lists(st.sampled_from("hdwmy"), unique=True, max_size=5))
    keep = tuple(Keep(u, draw(st.integers(1, 6))) for u in units)
    retains = keep_min > 0 or bool(keep)
    choice = {None: st.none() | st.integers(1, 8), True: st.integers(1, 8), False: st.none()}[with_max]
    most = draw(choice) if retains else None
    return Policy(keep_min=keep_min, keep=keep, max=most, prefer_complete=draw(st.booleans()))


@given(generations(latest=AHEAD), policies())
def test_planning_again_over_the_kept_prunes_nothing_more(gens, policy):
    first = plan(gens, T0, policy)
    again = plan(first.kept, T0, policy)
    assert again.pruned == ()


@given(generations(latest=AHEAD), policies(), st.randoms(use_true_random=False))
def test_the_plan_is_a_function_of_the_set(gens, policy, rnd):
    shuffled = gens[:]
    rnd.shuffle(shuffled)
    assert plan(shuffled, T0, policy) == plan(gens, T0, policy)


@given(generations(latest=AHEAD), policies())
def test_what_is_never_pruned_and_every_reason(gens, policy):
    p = plan(gens, T0, policy)
    assert len(p.decisions) == len(gens)
    for d in p.decisions:
        assert d.reasons, d
        if d.generation.protected:
            assert d.keep, d
    if gens and policy.retains:
        assert max(gens, key=lambda g: g.seq) in p.kept  # the last image made, whatever its stamp


@given(generations(latest=AHEAD), policies())
def test_the_policy_keeps_at_most_its_limit(gens, policy):
    p = plan(gens, T0, policy)
    unprotected = [g for g in p.kept if not g.protected]
    most = limit(policy)
    if most is not None:
        assert len(unprotected) <= most
    if policy.max is not None:
        protected = sum(g.protected for g in gens)
        assert len(p.kept) <= max(policy.max, protected + 1)
    if not policy.retains:
        assert unprotected == []


@given(st.data(), policies(with_max=False), st.floats(0, 400 * DAY))
def test_without_max_what_is_pruned_stays_pruned(data, policy, later):
    gens = data.draw(generations(latest=T0))
    newer = data.draw(generations(earliest=T0 + 1, latest=T0 + 1 + later, prefix="n", first_seq=len(gens)))
    pruned = set(plan(gens, T0, policy).pruned)
    assert pruned <= set(plan(gens + newer, T0 + 1 + later, policy).pruned)


@given(st.data(), policies(with_max=False), st.floats(0, 400 * DAY))
def test_without_max_what_is_pruned_stays_pruned_when_newer_images_are_stamped_early(data, policy, later):
    """A clock stepped back: images made after the first plan carry any stamp up to the later present,
    even one older than the generations already planned; what was pruned stays pruned."""
    gens = data.draw(generations(latest=T0))
    now = T0 + 1 + later
    newer = data.draw(generations(earliest=T0 - SPAN, latest=now, prefix="n", first_seq=len(gens)))
    pruned = set(plan(gens, T0, policy).pruned)
    assert pruned <= set(plan(gens + newer, now, policy).pruned)


@given(st.data(), policies(with_max=True), st.floats(0, 400 * DAY))
def test_with_max_what_the_rules_prune_stays_pruned(data, policy, later):
    gens = data.draw(generations(latest=T0))
    newer = data.draw(generations(earliest=T0 + 1, latest=T0 + 1 + later, prefix="n", first_seq=len(gens)))
    by_rules = set(plan(gens, T0, attrs.evolve(policy, max=None)).pruned)
    assert by_rules <= set(plan(gens + newer, T0 + 1 + later, policy).pruned)


# --- the calendar's edges ------------------------------------------------------------------------


@pytest.fixture
def berlin(monkeypatch):
    """The host's local time zone is Europe/Berlin (CET/CEST, with DST)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    assert time.localtime(at("2026-07-01T12:00")).tm_isdst == 1  # the zone took: summer time
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"])
def test_a_dst_day_in_berlin_is_24_utc_hours_each_kept_once(berlin, day):
    """Periods are UTC: a local hour that repeats (2026-10-25 02:00-03:00 CEST, then CET) gives two
    hours, each keeping its own generation, and one that does not exist (2026-03-29 02:00 local) is no
    gap: every UTC hour of the day keeps exactly one generation, and the day keeps one."""
    start = at(f"{day}T00:00")
    gens = [Generation(f"h{i:02d}", start + i * HOUR + 60, seq=i) for i in range(24)]
    local = [time.strftime("%Y-%m-%d %H", time.localtime(g.time)) for g in gens]
    if day.endswith("03-29"):  # spring forward: local 02:00 does not exist
        assert f"{day} 02" not in local and len(set(local)) == 24
    else:  # fall back: local 02:00 happens twice, a local hour would hold two generations
        assert local.count(f"{day} 02") == 2 and len(set(local)) == 23
    now = start + 23.5 * HOUR  # 23:30 UTC of that day
    p = plan(gens, now, Policy(keep="24h"))
    assert kept_ids(p) == [g.id for g in gens]
    assert [d.reasons[0] for d in p.decisions] == [
        f"first of hour {day} {i:02d}:00 ({24 - i} of 24)" for i in range(24)
    ]
    p = plan(gens, now, Policy(keep="2d"))
    assert kept_ids(p) == ["h00", "h23"]  # the first of the UTC day, and the newest
    assert p.decision("h00").reasons == (f"first of day {day} (1 of 2)",)


def test_a_day_is_utc_midnight_to_midnight_not_local(berlin):
    """00:30 in Berlin on 2026-12-06 is 23:30 UTC on 2026-12-05: it counts in the UTC day before."""
    gens = [gen("sat-late", "2026-12-05T23:30"), gen("sun-early", "2026-12-06T00:30"), gen("new", "2026-12-07T12:00")]
    assert time.strftime("%Y-%m-%d", time.localtime(gens[0].time)) == "2026-12-06"  # local: Sunday already
    p = plan(gens, NOW, Policy(keep="3d"))
    assert p.decision("sat-late").reasons == ("first of day 2026-12-05 (3 of 3)",)
    assert p.decision("sun-early").reasons == ("first of day 2026-12-06 (2 of 3)",)


# --- a local time zone (`timezone`) ------------------------------------------------------------


def test_a_local_time_zone_s_day_runs_from_local_midnight():
    """timezone = "Europe/Berlin": 00:30 local on 2026-12-06 (23:30 UTC the day before) counts in the
    local 2026-12-06, whatever the host's own zone (the default UTC puts it in 2026-12-05: above)."""
    gens = [gen("sat-late", "2026-12-05T22:30"), gen("sun-early", "2026-12-05T23:30"), gen("new", "2026-12-07T12:00")]
    p = plan(gens, NOW, Policy(keep="3d", zone="Europe/Berlin"))
    assert p.decision("sat-late").reasons == ("first of day 2026-12-05 (3 of 3)",)
    assert p.decision("sun-early").reasons == ("first of day 2026-12-06 (2 of 3)",)
    assert plan(gens, NOW, Policy(keep="3d")).decision("sun-early").reasons == ("day 2026-12-05 keeps sat-late",)


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"])
def test_a_local_time_zone_s_dst_edges_one_period_for_the_repeated_hour_none_for_the_missing(day):
    """In Europe/Berlin the hour 02:00 local happens twice on 2026-10-25 (CEST, then CET): one hour
    period keeps the first of the two UTC hours' generations; on 2026-03-29 it does not exist: no
    period, no gap in the others. The day (local midnight to midnight) keeps one."""
    local_midnight = at(f"{day}T00:00") - (2 if day.endswith("10-25") else 1) * HOUR
    hours = 25 if day.endswith("10-25") else 23  # the local day's length
    gens = [Generation(f"h{i:02d}", local_midnight + i * HOUR + 60, seq=i) for i in range(hours)]
    now = local_midnight + (hours - 0.5) * HOUR
    p = plan(gens, now, Policy(keep="48h", zone="Europe/Berlin"))
    labels = [d.reasons[0] for d in p.decisions]
    if day.endswith("10-25"):
        assert [g.id for g in p.pruned] == ["h03"]  # the second 02:00 (CET), after h02 (CEST)
        assert p.decision("h03").reasons == (f"hour {day} 02:00 keeps h02",)
        assert labels[2].startswith(f"first of hour {day} 02:00")
    else:
        assert p.pruned == () and not any(f"{day} 02:00" in r for r in labels)
        assert labels[2].startswith(f"first of hour {day} 03:00")
    p = plan(gens, now, Policy(keep="2d", zone="Europe/Berlin"))
    assert kept_ids(p) == ["h00", gens[-1].id]  # the first of the local day, and the newest
    assert p.decision("h00").reasons == (f"first of day {day} (1 of 2)",)


def test_an_unknown_time_zone_is_refused():
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        Policy(keep="1d", zone="Mars/Olympus")
    from coalesce_core.config import parse_config

    text = '[group]\nname = "g"\nsource = "mem://s"\ndestination = "mem://d"\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text + '[retention]\nkeep = "1d"\ntimezone = "Mars/Olympus"\n')
    e = info.value
    assert parse_config(text + '[retention]\nkeep = "1d"\ntimezone = "Asia/Kathmandu"\n').retention.zone == (
        "Asia/Kathmandu"
    )
    assert "`timezone` must name an IANA time zone" in str(e) and "Europe/Berlin" in e.hint


def test_iso_weeks_keep_the_first_generation_of_each_week_across_the_new_year():
    """ISO weeks run Monday to Sunday across a year's end: 2026-12-28 (Monday) to 2027-01-03 is
    2026-W53, 2027-01-04 starts 2027-W01; 2025-12-29 starts 2026-W01."""
    gens = [
        gen("w52-sun", "2025-12-28T23:00"),
        gen("w01-mon", "2025-12-29T00:00"),
        gen("w01-jan", "2026-01-01T00:00"),
        gen("w53-mon", "2026-12-28T00:00"),
        gen("w53-jan", "2027-01-03T23:59"),
        gen("w01-new", "2027-01-04T00:00"),
    ]
    p = plan(gens, at("2027-01-04T01:00"), Policy(keep="60w"))
    assert kept_ids(p) == ["w52-sun", "w01-mon", "w53-mon", "w01-new"]
    assert p.decision("w01-mon").reasons == ("first of week 2026-W01 (54 of 60)",)
    assert p.decision("w01-jan").reasons == ("week 2026-W01 keeps w01-mon",)
    assert p.decision("w53-mon").reasons == ("first of week 2026-W53 (2 of 60)",)
    assert p.decision("w53-jan").reasons == ("week 2026-W53 keeps w53-mon",)
    assert p.decision("w52-sun").reasons == ("first of week 2025-W52 (55 of 60)",)


def test_month_ends_and_the_leap_day():
    """The 31st and the 1st are two months; 2028-02-29 is February's last day and 2028-03-01 March's
    first; a month bucket counts calendar months, not 30 days."""
    gens = [
        gen("jan31", "2028-01-31T23:59"),
        gen("feb01", "2028-02-01T00:00"),
        gen("leap", "2028-02-29T12:00"),
        gen("mar01", "2028-03-01T00:00"),
        gen("mar31", "2028-03-31T23:00"),
    ]
    p = plan(gens, at("2028-03-31T23:30"), Policy(keep="3m"))
    assert kept_ids(p) == ["jan31", "feb01", "mar01", "mar31"]
    assert p.decision("leap").reasons == ("month 2028-02 keeps feb01",)
    p = plan(gens, at("2028-03-31T23:30"), Policy(keep="2d"))
    assert p.decision("leap").reasons == ("day 2028-02-29 is older than the last 2 kept",)
    p = plan(gens[:3], at("2028-02-29T23:59"), Policy(keep="2d"))
    assert kept_ids(p) == ["leap"]  # 2028-02-29 is 1 of 2, 02-28 (none) 2 of 2
    assert p.decision("leap").reasons == ("first of day 2028-02-29 (1 of 2)", "newest generation")


def test_a_year_ends_at_utc_midnight():
    gens = [gen("eve", "2026-12-31T23:59:59"), gen("new", "2027-01-01T00:00")]
    p = plan(gens, at("2027-01-01T00:30"), Policy(keep="1y"))
    assert kept_ids(p) == ["new"]
    assert p.decision("eve").reasons == ("year 2026 is older than the last 1 kept",)
    p = plan(gens, at("2027-01-01T00:30"), Policy(keep="2y 1h"))
    assert p.decision("eve").reasons == ("first of year 2026 (2 of 2)",)


# --- a clock that jumps backwards: the order is the ledger's sequence ------------------------------


def test_a_clock_stepped_back_keeps_the_newest_by_sequence_not_by_time():
    """Generation 2 was made after generation 1, but the clock stepped back between them: 2 is stamped
    earlier. The newest (always kept) is 2, the last image made; ``max`` prunes 1, the oldest made."""
    first = Generation("1", at("2026-12-07T10:50"), seq=1)
    second = Generation("2", at("2026-12-07T10:20"), seq=2)
    p = plan([first, second], at("2026-12-07T10:21"), Policy(keep="24h", max=1))
    assert kept_ids(p) == ["2"]
    assert p.decision("2").reasons == ("newest generation",)  # its hour keeps 1, the first made in it
    assert p.decision("1").reasons == (
        "first of hour 2026-12-07 10:00 (1 of 24)",
        "over max 1: the oldest are pruned first",
    )
    assert [d.generation.id for d in p.decisions] == ["1", "2"]  # oldest first: by sequence


def test_a_period_keeps_the_first_generation_made_in_it_whatever_the_stamps():
    """Within a period the first made (lowest sequence) is kept, so a newer image stamped earlier by a
    clock stepped back never displaces the one a period already keeps."""
    a = Generation("a", at("2026-12-07T09:40"), seq=1)
    b = Generation("b", at("2026-12-07T09:10"), seq=2)  # made after a, stamped before it
    c = Generation("c", at("2026-12-07T11:00"), seq=3)
    p = plan([a, b, c], at("2026-12-07T11:05"), Policy(keep="24h"))
    assert kept_ids(p) == ["a", "c"]
    assert p.decision("b").reasons == ("hour 2026-12-07 09:00 keeps a",)


# --- a year of hourly cycles ---------------------------------------------------------------------

YEAR_POLICY = Policy(keep_min=DAY, keep="24h 14d 8w 12m 2y")
#: the hours (since the first generation) a person pinned
YEAR_PINS = (5, 1000, 6000)


def _expected_after_a_year(times: list[float], now: float) -> set[int]:
    """What ``YEAR_POLICY`` keeps of hourly generations at ``times`` at ``now``, worked out from the
    calendar by ``datetime`` (not by the code under test): younger than a day, the first of each of the
    last 24 hours, 14 days, 8 ISO weeks, 12 months and 2 years counted back from now's, the newest, the
    pinned."""
    when = [datetime.fromtimestamp(t, UTC) for t in times]
    today = datetime.fromtimestamp(now, UTC)
    this_hour = today.replace(minute=0, second=0, microsecond=0)
    monday = today.date() - timedelta(days=today.weekday())
    periods: dict[str, tuple[set[Any], Callable[[datetime], Any]]] = {
        "h": ({this_hour - timedelta(hours=k) for k in range(24)}, lambda w: w.replace(minute=0, second=0)),
        "d": ({today.date() - timedelta(days=k) for k in range(14)}, lambda w: w.date()),
        "w": ({monday - timedelta(weeks=k) for k in range(8)}, lambda w: w.date() - timedelta(days=w.weekday())),
        "m": (
            {((today.year * 12 + today.month - 1 - k) // 12, (today.month - 1 - k) % 12 + 1) for k in range(12)},
            lambda w: (w.year, w.month),
        ),
        "y": ({today.year - k for k in range(2)}, lambda w: w.year),
    }
    keep = {i for i, t in enumerate(times) if now - t < DAY} | {len(times) - 1} | set(YEAR_PINS)
    for wanted, key in periods.values():
        first: dict[object, int] = {}
        for i, w in enumerate(when):
            first.setdefault(key(w), i)
        keep |= {i for p, i in first.items() if p in wanted}
    return keep


def test_a_year_of_hourly_cycles_keeps_what_the_calendar_says():
    """8,760 hourly jump-aheads (from 2027-06-15 on: a new year and the leap day), each turning the
    old base into a generation and pruning what the plan prunes, as the agent does. At every step at
    most 24 (keep_min: one a cycle) + one a bucket period + the newest + the pinned are kept, the
    newest and the pinned among them; after the year exactly what the calendar implies."""
    start = at("2027-06-15T00:07")
    hours = 365 * 24  # 2027-06-15 00:07 to 2028-06-14 00:07 (the leap day is one of them)
    bound = 24 + sum(k.count for k in YEAR_POLICY.keep) + 1 + len(YEAR_PINS)
    retained: list[Generation] = []
    for i in range(hours):
        retained.append(Generation(str(i), start + i * HOUR, pinned=i in YEAR_PINS, seq=i))
        now = start + (i + 1) * HOUR  # the new base's time, at which the jump-ahead prunes
        p = plan(retained, now, YEAR_POLICY)
        retained = list(p.kept)
        assert len(retained) <= bound, (i, len(retained))
        assert retained[-1].seq == i  # the newest
        assert {g.seq for g in retained} >= {h for h in YEAR_PINS if h <= i}
    times = [start + i * HOUR for i in range(hours)]
    assert {g.seq for g in retained} == _expected_after_a_year(times, now)
    assert datetime.fromtimestamp(now, UTC).isoformat() == "2028-06-14T00:07:00+00:00"
