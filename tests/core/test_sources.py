"""coalesce_core/sources.py: the last cycle's record of each source and its health (docs/cli.md,
"status --json", ``sources``)."""

from __future__ import annotations

from coalesce_core.cycle.state import GroupState, Replica, SourcePcpi
from coalesce_core.sources import Seen, seen_from_note, seen_to_note, source_health


def test_a_damaged_note_is_no_record_never_an_error():
    assert seen_from_note(None) == {} and seen_from_note("junk") == {} and seen_from_note([1]) == {}
    raw = {
        "ok": {"at": 5, "reachable": False, "error": "gone"},
        "no_at": {"reachable": True},
        "bad_reach": {"at": 1.0, "reachable": "yes"},
        "bad_error": {"at": 1.0, "reachable": True, "error": 3},
        "bool_at": {"at": True, "reachable": True},
        "not_a_dict": 7,
    }
    assert seen_from_note(raw) == {"ok": Seen(at=5.0, reachable=False, error="gone")}


def test_a_cycles_records_replace_only_those_of_the_sources_it_asked():
    old = {"a": {"at": 1.0, "reachable": False, "error": "down"}, "b": {"at": 1.0, "reachable": True, "error": None}}
    note = seen_to_note(old, {"a": Seen(at=2.0, reachable=True)})
    assert note == {
        "a": {"at": 2.0, "reachable": True, "error": None},
        "b": {"at": 1.0, "reachable": True, "error": None},
    }
    assert seen_from_note(note) == {"a": Seen(2.0, True), "b": Seen(1.0, True)}
    assert seen_to_note("damaged", {"c": Seen(3.0, False, "x")}) == {"c": {"at": 3.0, "reachable": False, "error": "x"}}


def _state() -> GroupState:
    sps = {
        "co-g-src-000001": SourcePcpi(name="co-g-src-000001", taken=True, taken_at=100.0, source="a"),
        "co-g-src-000002": SourcePcpi(name="co-g-src-000002", taken=True, taken_at=160.0, source="a"),
        "co-g-src-000003": SourcePcpi(name="co-g-src-000003", taken=True, taken_at=150.0, source="b"),
    }
    replicas = {
        "A1": Replica(name="A1", source_qtree="A1", origin="a", state="stable", source_point="co-g-src-000001"),
        "A2": Replica(name="A2", source_qtree="A2", origin="a", state="stable", source_point="co-g-src-000002"),
        "B1": Replica(name="B1", source_qtree="B1", origin="b", state="stable", source_point="co-g-src-000003"),
        "X1": Replica(name="X1", source_qtree="X1", origin="gone", state="uninitialized"),
    }
    return GroupState(name="g", replicas=replicas, source_pcpis=sps, source_taken={"a": 150.0, "b": 140.0})


def test_each_sources_health_in_the_configs_order_then_the_sources_only_replicas_name():
    seen = {"b": Seen(at=190.0, reachable=False, error="b down")}
    out = source_health(_state(), {"b": 60.0, "a": None}, seen, now=200.0)
    assert [h.name for h in out] == ["b", "a", "gone"]
    b, a, gone = out
    assert (b.replicas, b.last_pcpi, b.last_pcpi_time) == (("B1",), "co-g-src-000003", 150.0)
    assert (b.interval, b.next_due, b.due) == (60.0, 200.0, True)
    assert (b.reachable, b.last_error, b.seen_at, b.lag_seconds) == (False, "b down", 190.0, 50.0)
    assert (a.replicas, a.last_pcpi, a.due, a.next_due) == (("A1", "A2"), "co-g-src-000002", True, None)
    assert (a.reachable, a.last_error, a.seen_at) == (None, None, None)  # no record yet
    assert a.lag_seconds == 100.0  # the oldest image its replicas export: A1's
    assert (gone.replicas, gone.last_pcpi, gone.lag_seconds) == (("X1",), None, None)
    assert source_health(_state(), {"b": 60.0}, seen, now=199.0)[0].due is False
    assert source_health(_state(), {"b": 60.0}, seen)[0].due is None  # no time given: not known
    assert b.data()["replicas"] == ["B1"] and set(b.data()) >= {"reachable", "due", "last_error", "lag_seconds"}
