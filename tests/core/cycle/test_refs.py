"""REPLICA[@GEN] parsing and GEN resolution (coalesce_core/cycle/refs.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from coalesce_core.cycle import refs
from coalesce_core.cycle.generations import Manifest
from coalesce_core.cycle.state import GENERATION, GroupState, Pcpi, Replica
from coalesce_core.errors import NotFound


def _t(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _state(base: bool = True) -> GroupState:
    gens = {
        "co-g-000003-new_base": "2026-12-01T01:00",
        "co-g-000007-new_base": "2026-12-01T02:00",
        "co-g-000011-new_base": "2026-12-01T03:00",
    }
    pcpis = {n: Pcpi(n, GENERATION, taken=True) for n in gens}
    pcpis["co-g-000009-new_base"] = Pcpi("co-g-000009-new_base", GENERATION, taken=True, releasing=True)
    if base:
        pcpis["co-g-000015-new_base"] = Pcpi("co-g-000015-new_base", "base", taken=True)
    manifests = {n: Manifest(n, 1, _t(t)) for n, t in gens.items()}
    return GroupState(name="g", replicas={"A": Replica("A", "A")}, pcpis=pcpis, manifests=manifests)


def test_split_names_a_replica_and_maybe_a_generation():
    assert refs.split("A@12") == ("A", "12")
    assert refs.split("A") == ("A", None)
    assert refs.split("A@2026-12-01T03:00") == ("A", "2026-12-01T03:00")
    for bad in ("", "@3", "A@"):
        with pytest.raises(NotFound):
            refs.split(bad)


@pytest.mark.parametrize(
    "gen, pcpi",
    [
        (None, "co-g-000015-new_base"),
        ("latest", "co-g-000011-new_base"),
        ("7", "co-g-000007-new_base"),
        ("2026-12-01T03:00", "co-g-000011-new_base"),  # at: that one
        ("2026-12-01T02:59", "co-g-000007-new_base"),  # the newest before it
        ("2026-12-01T04:00+02:00", "co-g-000007-new_base"),  # a zone: 02:00 UTC
        ("2026-12-02", "co-g-000011-new_base"),  # a date alone: its midnight
    ],
)
def test_resolve_finds_the_image(gen, pcpi):
    assert refs.resolve(_state(), gen).name == pcpi


@pytest.mark.parametrize(
    "gen, says",
    [
        ("9", "no generation 9"),  # being released: gone
        ("2026-12-01T00:59", "at or before"),
        ("soon", "not a generation id"),
    ],
)
def test_resolve_refuses_what_is_not_there_with_the_ids_in_the_hint(gen, says):
    with pytest.raises(NotFound) as exc:
        refs.resolve(_state(), gen)
    assert says in exc.value.message and "3, 7, 11" in exc.value.hint


def test_no_base_and_no_generations_are_errors():
    with pytest.raises(NotFound, match="no coalesced base"):
        refs.resolve(_state(base=False), None)
    with pytest.raises(NotFound, match="keeps no generations"):
        refs.resolve(GroupState(name="g"), "latest")


def test_replica_must_be_in_the_group():
    assert refs.replica(_state(), "A") == "A"
    with pytest.raises(NotFound, match="no replica 'B'") as exc:
        refs.replica(_state(), "B")
    assert "A" in exc.value.hint


def test_the_time_generations_shows_for_an_image_names_that_image():
    """A time to the microsecond, as `generations --json` gives it and an ISO time writes it, is at
    or after the image even when the image's float time lies a fraction of a microsecond past it."""
    t = 1765130000.1234565
    shown = datetime.fromtimestamp(t, UTC).isoformat()
    assert datetime.fromisoformat(shown).timestamp() < t  # the float rounding the test is about
    name = "co-g-000003-new_base"
    state = GroupState(
        name="g",
        replicas={"A": Replica("A", "A")},
        pcpis={name: Pcpi(name, GENERATION, taken=True)},
        manifests={name: Manifest(name, 1, t)},
    )
    assert refs.resolve(state, shown).name == name


def test_latest_is_the_last_generation_made_when_the_clock_stepped_back():
    """Generation 11 was made after 7 but stamped before it (the clock stepped back): ``latest`` is 11,
    the newest as the retention policy counts (the ledger's sequence), and a time at or after both
    stamps names 11 too; a time between the stamps names the one stamped at or before it."""
    state = _state()
    state = GroupState(
        name="g",
        replicas=state.replicas,
        pcpis=state.pcpis,
        manifests={
            **state.manifests,
            "co-g-000011-new_base": Manifest("co-g-000011-new_base", 1, _t("2026-12-01T01:30")),
        },
    )
    assert refs.resolve(state, "latest").name == "co-g-000011-new_base"
    assert refs.resolve(state, "2026-12-01T02:00").name == "co-g-000011-new_base"
    assert refs.resolve(state, "2026-12-01T01:45").name == "co-g-000011-new_base"
    assert refs.resolve(state, "2026-12-01T01:15").name == "co-g-000003-new_base"


def test_an_image_that_holds_no_source_point_of_the_replica_is_refused_naming_those_that_do():
    """A straggler's entry `outside` (docs/config.md, "Retention"): the image holds its update under
    way, so ls, diff and restore of REPLICA@GEN refuse it; the hint names the generations holding it."""
    from coalesce_core.cycle.generations import Entry

    s = _state()
    entries = {
        "co-g-000003-new_base": ("updated", "stale"),
        "co-g-000007-new_base": ("updated", "outside"),
        "co-g-000011-new_base": ("unchanged", "updated"),
    }
    manifests = {
        n: Manifest(n, 1, m.time, (Entry("A", entries[n][0], "p"), Entry("B", entries[n][1])))
        for n, m in s.manifests.items()
    }
    s = GroupState(
        name="g", replicas={"A": Replica("A", "A"), "B": Replica("B", "B")}, pcpis=s.pcpis, manifests=manifests
    )
    for gen in ("3", "11", "latest", None):
        refs.holding(s, "B", refs.resolve(s, gen))  # a stale or updated entry, or no manifest: not refused
    refs.holding(s, "A", refs.resolve(s, "7"))
    with pytest.raises(NotFound) as exc:
        refs.holding(s, "B", refs.resolve(s, "7"))
    assert "holds no source point of replica 'B'" in exc.value.message
    assert "generations that hold it: 3, 11" in exc.value.hint
