"""coalesce_core.readahead: an iterator read ahead in a helper thread (the verifier's source walk, the
source service's diffs and descriptions)."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from coalesce_core.readahead import read_ahead


def test_every_item_arrives_in_order_through_a_small_queue():
    assert list(read_ahead(iter(range(1000)), 3, name="t-order")) == list(range(1000))


def test_an_error_of_the_producer_is_raised_after_the_items_before_it():
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("walk failed")

    got = []
    with pytest.raises(ValueError, match="walk failed"):
        for x in read_ahead(items(), 8, name="t-error"):
            got.append(x)
    assert got == [1, 2]


def test_idle_yields_none_while_the_producer_is_slow():
    def slow() -> Iterator[str]:
        time.sleep(0.5)
        yield "late"

    got = list(read_ahead(slow(), 4, name="t-idle", idle=0.05))
    assert got[-1] == "late"
    assert got[:-1] and set(got[:-1]) == {None}


def test_without_idle_no_none_is_yielded():
    def slow() -> Iterator[str]:
        time.sleep(0.3)
        yield "late"

    assert list(read_ahead(slow(), 4, name="t-no-idle")) == ["late"]


def test_closing_early_stops_the_helper_and_closes_the_items():
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    it = read_ahead(endless(), 2, name="t-close")
    assert [next(it), next(it)] == [0, 1]
    it.close()  # waits for the helper (wait=True)
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "t-close"]


def test_without_wait_closing_returns_while_the_helper_is_in_a_slow_next():
    release = threading.Event()
    closed = threading.Event()

    def stuck() -> Iterator[int]:
        try:
            yield 0
            release.wait(10)
            yield 1
        finally:
            closed.set()

    it = read_ahead(stuck(), 4, name="t-nowait", wait=False)
    assert next(it) == 0
    it.close()  # the helper is still in release.wait: close does not wait for it
    assert not closed.is_set()
    release.set()
    assert closed.wait(5)  # the helper ends on its own and closes the items
