"""spill.SortedRows: the same rows in the same order in memory and on disk; no room fails with a hint."""

from __future__ import annotations

import sqlite3

import pytest

from coalesce_core.errors import BackendError
from coalesce_sim import spill

PATHS = ["b", "a/z", "a", "a\udcff", "a/\udc80x", "a\ue000", "a b", "é/x", "a/b/c", ""]


def _rows(monkeypatch, bound: int) -> tuple[list, list]:
    monkeypatch.setattr(spill, "SPILL_ROWS", bound)
    monkeypatch.setattr(spill, "PAGE", 3)
    rows = spill.SortedRows()
    try:
        for i, p in enumerate(PATHS):
            rows.add(spill.path_key(p), p, i, 100 + i)
        rows.add(spill.path_key("a"), "a", 99, 0)  # an equal key: after the first, in arrival order
        return list(rows), [rows.ino_at(p) for p in (*PATHS, "missing")]
    finally:
        rows.close()


def test_spilled_rows_come_back_in_the_order_of_the_rows_in_memory(monkeypatch):
    in_memory = _rows(monkeypatch, 1 << 20)
    on_disk = _rows(monkeypatch, 0)
    assert on_disk == in_memory
    order = [p for p, _i, _d in in_memory[0]]
    assert order == sorted(PATHS + ["a"], key=lambda p: p.replace("/", "\x00"))
    assert [i for p, i, _d in in_memory[0] if p == "a"] == [2, 99]


def test_a_spill_that_finds_no_room_fails_with_a_hint(monkeypatch):
    def no_room(*_a, **_k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(spill, "SPILL_ROWS", 1)
    monkeypatch.setattr(spill.sqlite3, "connect", no_room)
    rows = spill.SortedRows()
    rows.add(b"a", "a", 1)
    with pytest.raises(BackendError, match="disk is full") as err:
        rows.add(b"b", "b", 2)
    assert "SQLITE_TMPDIR" in (err.value.hint or "")
