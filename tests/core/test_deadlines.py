"""A transfer's deadlines (coalesce_core/deadlines.py): which one passes when, what it says, and
that a bounded volume's calls and iterators see the deadline from any thread."""

from __future__ import annotations

import threading

import pytest

from coalesce_core import deadlines as D


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_stall_deadline_counts_from_the_last_progress_and_the_total_from_the_start():
    clock = Clock()
    d = D.Deadline(D.TransferLimits(stall=10.0, total=25.0), clock=clock)
    assert d.left() == 10.0
    clock.now += 9
    d.check()
    d.asking()
    d.arrived()
    clock.now += 9  # 18 s in, 9 s since the last record
    assert d.left() == 1.0
    d.asking()
    d.arrived()
    clock.now += 6  # 24 s in: the total is nearer than the stall now
    assert d.left() == 1.0
    clock.now += 1.5
    with pytest.raises(D.DeadlineExceeded, match=r"took longer than 25s, its deadline `transfer_timeout` \(2 records"):
        d.check()
    assert "raise `transfer_timeout` in [group]" in d.error().hint


def test_the_stall_error_names_the_key_the_duration_and_the_phase():
    clock = Clock()
    d = D.Deadline(D.TransferLimits(stall=120.0, total=None), clock=clock)
    clock.now += 121
    with pytest.raises(D.DeadlineExceeded, match=r"no change record from the source for 2m, past the stall deadline"):
        d.check()
    d.start_check()  # the stream ended: the check before done counts from now, by descriptions
    assert d.left() == 120.0
    clock.now += 120
    e = d.error()
    assert str(e).startswith("no description in the check before done from the source for 2m")
    assert "`transfer_stall`" in str(e) and "raise `transfer_stall` in [group]" in e.hint
    d.check(stall=False)  # the total alone: none set, so it never passes


def test_without_limits_nothing_passes():
    clock = Clock()
    d = D.Deadline(D.TransferLimits(stall=None, total=None), clock=clock)
    clock.now += 1e9
    assert d.left() is None
    d.check()


def test_a_bounded_volume_s_calls_and_iterators_see_the_deadline_in_any_thread():
    d = D.Deadline(D.TransferLimits())

    class Vol:
        name = "v"

        def seen(self):
            return D.current()

        def stream(self):
            while True:
                yield D.current()

    v = D.Bounded(Vol(), d)
    assert v.name == "v" and D.current() is None
    assert v.seen() is d and D.current() is None
    it = v.stream()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend([next(it), v.seen()]))
    t.start()
    t.join()
    assert got == [d, d] and next(it) is d
    it.close()
    with D.bound(d):
        assert D.current() is d
    assert D.current() is None
