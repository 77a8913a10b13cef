"""The ledger: the group's persisted state in SQLite (I6 durability).

Round trips, write-ahead commits of only the changed rows, WAL +
synchronous=FULL, the transitions log and the cycles table, and every way a
metadata file can be missing, damaged or foreign: each is a MetadataError
with a hint, and the file is left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.cycle import events as ev
from coalesce_core.cycle.planner import Transition, decide
from coalesce_core.cycle.state import GroupState, Pcpi, Replica, RetryPolicy, SourcePcpi
from coalesce_core.errors import MetadataError
from coalesce_core.ledger import SCHEMA_VERSION, Ledger, iter_log_edges


def sample_state(n: int = 5) -> GroupState:
    replicas = {
        f"r{i}": Replica(
            name=f"r{i}",
            source_qtree=f"q{i}",
            state="stable",
            exported="co-g-000002-base",
            source_point="co-g-src-000001",
            active_point="co-g-src-000001",
            records=i,
            nbytes=i * 10,
        )
        for i in range(n)
    }
    replicas["u"] = Replica(
        name="u",
        source_qtree="u",
        state="unstable_uncoalesced",
        exported="co-g-000001-individual",
        last_good="co-g-000001-individual",
        scratch="co-g-000003-individual",
        retries=3,
        next_retry=123.5,
        last_error="boom: it broke",
        consecutive_failures=2,
        last_success=99.5,
        reseed_reason="",
    )
    replicas["k"] = Replica(name="k", source_qtree="k", state="broken", exported=ACTIVE, last_good="co-g-000002-base")
    pcpis = {
        "co-g-000002-base": Pcpi(name="co-g-000002-base", role="base", cycle=1, taken=True),
        "co-g-000001-individual": Pcpi(
            name="co-g-000001-individual", role="individual", cycle=1, taken=True, owners=frozenset({"u", "k"})
        ),
        "co-g-000003-individual": Pcpi(
            name="co-g-000003-individual",
            role="individual",
            cycle=1,
            taken=False,
            releasing=False,
            owners=frozenset({"u"}),
        ),
    }
    replicas["p"] = Replica(
        name="p",
        source_qtree="p",
        state="reseed_pending",
        exported="co-g-000002-base",
        last_good="co-g-000002-base",
        source_point="co-g-src-000001",
        consecutive_failures=3,
        last_error="update failed: ENOSPC",
        reseed_reason="3 updates failed in a row",
    )
    sps = {
        "co-g-src-000001": SourcePcpi(name="co-g-src-000001", cycle=1, taken=True, taken_at=16.5),
        "co-g-src-000000": SourcePcpi(name="co-g-src-000000", cycle=0, taken=True, releasing=True),
    }
    return GroupState(
        name="g",
        phase="updating",
        cycle=7,
        seq=42,
        replicas=replicas,
        pcpis=pcpis,
        source_pcpis=sps,
        cycle_targets={"default": "co-g-src-000001"},
        purged=True,
        retry=RetryPolicy(initial=5.0, factor=3.0, maximum=99.0),
        cycle_started=17.25,
        cycle_failures=2,
        reseed_after=5,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "meta" / "g.sqlite"
    Ledger.create(path, sample_state()).close()
    return path


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------
def test_create_open_load_round_trip_I6(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    loaded = led.load()
    led.close()
    assert loaded == sample_state()
    assert loaded.pcpis["co-g-000001-individual"].owners == frozenset({"u", "k"})
    assert isinstance(loaded.pcpis["co-g-000001-individual"].owners, frozenset)
    assert loaded.retry == RetryPolicy(initial=5.0, factor=3.0, maximum=99.0)
    assert loaded.replicas["k"].exported == ACTIVE


def test_failure_fields_round_trip_and_rows_of_older_ledgers_load(ledger_file):
    """last_error, consecutive_failures, last_success, reseed_reason, the source PCPI's time and
    reseed_after survive a reopen; a replica row written before last_error (key ``error``) loads."""
    led = Ledger.open(ledger_file, group="g")
    loaded = led.load()
    u, p = loaded.replicas["u"], loaded.replicas["p"]
    assert (u.last_error, u.consecutive_failures, u.last_success) == ("boom: it broke", 2, 99.5)
    assert (p.state, p.reseed_reason) == ("reseed_pending", "3 updates failed in a row")
    assert loaded.source_pcpis["co-g-src-000001"].taken_at == 16.5 and loaded.reseed_after == 5
    with led._tx():
        led.conn.execute(
            "UPDATE replicas SET data = ? WHERE name = 'k'",
            (
                json.dumps(
                    {"name": "k", "source_qtree": "k", "state": "broken", "exported": ACTIVE, "error": "old text"}
                ),
            ),
        )
        led.conn.execute("DELETE FROM meta WHERE key = 'reseed_after'")
    old = led.load()
    led.close()
    assert old.replicas["k"].last_error == "old text" and old.replicas["k"].consecutive_failures == 0
    assert old.reseed_after == 3  # the default when an older ledger has none


#: the statements of the schema a ledger was created with before sources had names (its rows hold
#: no replica ``origin`` nor source PCPI ``source``, its meta the one ``cycle_target``)
_NAMELESS_SOURCE_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE replicas (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE pcpis (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE source_pcpis (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, cycle INTEGER NOT NULL,
    replica TEXT, trigger TEXT NOT NULL, source TEXT NOT NULL, dest TEXT NOT NULL);
CREATE TABLE cycles (
    cycle INTEGER PRIMARY KEY, started REAL, ended REAL, report TEXT NOT NULL);
"""


def _nameless_source_ledger(path: Path, cycle_target: str | None) -> None:
    """A ledger as a version before named sources wrote it: a cycle of one replica under way."""
    conn = sqlite3.connect(str(path))
    conn.executescript(_NAMELESS_SOURCE_SCHEMA)
    meta = {
        "schema_version": "1",
        "group": "g",
        "retry": json.dumps({"initial": 30.0, "factor": 2.0, "maximum": 3600.0}),
        "phase": json.dumps("updating" if cycle_target else "idle"),
        "cycle": "2",
        "seq": "3",
        "cycle_target": json.dumps(cycle_target),
        "transfers_started": "true",
        "purged": "false",
        "cycle_started": "5.0",
        "cycle_failures": "0",
        "reseed_after": "3",
    }
    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
    replica = {"name": "a", "source_qtree": "qa", "state": "update", "exported": "co-g-000002-base"}
    replica |= {"source_point": "co-g-src-000001", "active_point": "co-g-src-000001", "target": "co-g-src-000003"}
    conn.execute("INSERT INTO replicas VALUES (?, ?)", ("a", json.dumps(replica)))
    for name, cycle in (("co-g-src-000001", 1), ("co-g-src-000003", 2)):
        row = {"name": name, "cycle": cycle, "taken": True, "releasing": False, "taken_at": 4.0}
        conn.execute("INSERT INTO source_pcpis VALUES (?, ?)", (name, json.dumps(row)))
    conn.commit()
    conn.close()


def test_a_ledger_written_before_sources_had_names_reads_as_of_the_default_source(tmp_path):
    """Its replicas and source PCPIs are of the source ``default`` (what ``[group] source`` is named),
    its cycle's source PCPI the cycle target of that source; the first commit that changes the cycle
    targets replaces the old key, and the state reads back the same."""
    path = tmp_path / "g.sqlite"
    _nameless_source_ledger(path, "co-g-src-000003")
    led = Ledger.open(path, group="g")
    st = led.load()
    assert st.replicas["a"].origin == "default" and st.replicas["a"].target == "co-g-src-000003"
    assert {n: sp.source for n, sp in st.source_pcpis.items()} == {
        "co-g-src-000001": "default",
        "co-g-src-000003": "default",
    }
    assert st.cycle_targets == {"default": "co-g-src-000003"} and st.phase == "updating"
    ended = attrs.evolve(st, phase="idle", cycle_targets={})
    led.commit(st, ended)
    led.close()
    led = Ledger.open(path, group="g")
    assert led.load() == ended
    keys = {k for (k,) in led.conn.execute("SELECT key FROM meta")}
    led.close()
    assert "cycle_target" not in keys and "cycle_targets" in keys


def test_a_ledger_written_before_sources_had_names_between_cycles_has_no_cycle_target(tmp_path):
    path = tmp_path / "g.sqlite"
    _nameless_source_ledger(path, None)
    led = Ledger.open(path, group="g")
    st = led.load()
    led.close()
    assert st.cycle_targets == {} and st.phase == "idle"
    assert st.source_taken == {}  # written before sources had intervals: every source is due


def test_when_each_source_last_took_a_pcpi_round_trips(tmp_path):
    st = GroupState(name="g", source_taken={"lab": 1000.5, "office": 900.0})
    Ledger.create(tmp_path / "g.sqlite", GroupState(name="g")).close()
    led = Ledger.open(tmp_path / "g.sqlite", group="g")
    led.commit(GroupState(name="g"), st)
    led.close()
    led = Ledger.open(tmp_path / "g.sqlite", group="g")
    back = led.load()
    led.close()
    assert back == st and back.source_taken == {"lab": 1000.5, "office": 900.0}


def test_sources_of_replicas_and_source_pcpis_round_trip(tmp_path):
    st = GroupState(
        name="g",
        phase="updating",
        replicas={"a": Replica(name="a", source_qtree="qa", origin="lab")},
        source_pcpis={"co-g-src-000001": SourcePcpi(name="co-g-src-000001", source="office")},
        cycle_targets={"office": "co-g-src-000001", "lab": "co-g-src-000002"},
    )
    Ledger.create(tmp_path / "g.sqlite", st).close()
    led = Ledger.open(tmp_path / "g.sqlite", group="g")
    back = led.load()
    led.close()
    assert back == st and back.replicas["a"].origin == "lab"
    assert back.source_pcpis["co-g-src-000001"].source == "office"


def test_a_manifest_row_written_before_manifests_named_sources_reads_as_of_the_default_source(tmp_path):
    """A manifest entry without ``origin`` (an earlier version's row) is of the source ``default``; one
    with it keeps it, and both read back the same after a commit that leaves them alone."""
    from coalesce_core.cycle import generations as gen

    base = "co-g-000002-base"
    named = gen.Manifest(base, 1, 5.0, (gen.Entry("a", gen.UPDATED, "co-g-src-000001", 4.0, origin="lab"),))
    st = GroupState(name="g", pcpis={base: Pcpi(base, "base", taken=True)}, manifests={base: named})
    Ledger.create(tmp_path / "g.sqlite", st).close()
    led = Ledger.open(tmp_path / "g.sqlite", group="g")
    assert led.load().manifests[base].entries[0].origin == "lab"
    old = named.to_json()
    del old["entries"][0]["origin"]
    led.conn.execute("UPDATE manifests SET data = ? WHERE name = ?", (json.dumps(old), base))
    led.conn.commit()
    back = led.load()
    assert back.manifests[base].entries == (gen.Entry("a", gen.UPDATED, "co-g-src-000001", 4.0, origin="default"),)
    led.commit(back, attrs.evolve(back, cycle=2))
    led.close()
    led = Ledger.open(tmp_path / "g.sqlite", group="g")
    assert led.load().manifests == back.manifests
    led.close()


def test_open_without_group_check(ledger_file):
    led = Ledger.open(ledger_file)
    assert led.load().name == "g"
    led.close()


def test_empty_group_round_trip(tmp_path):
    st = GroupState(name="empty")
    Ledger.create(tmp_path / "e.sqlite", st).close()
    led = Ledger.open(tmp_path / "e.sqlite", group="empty")
    assert led.load() == st
    led.close()


def test_commit_then_reopen_sees_the_new_state(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    new = old.with_replica(attrs.evolve(old.replicas["r1"], state="update", target="co-g-src-000009"))
    new = attrs.evolve(new, seq=43, phase="rolling_back").without_pcpi("co-g-000003-individual")
    new = new.with_pcpi(Pcpi(name="co-g-000043-rollback", role="rollback", cycle=7))
    new = new.without_source_pcpi("co-g-src-000000")
    led.commit(old, new, [Transition("r1", "start_update", "stable", "update")], now=5.0)
    led.close()
    led = Ledger.open(ledger_file, group="g")
    assert led.load() == new
    led.close()


# ---------------------------------------------------------------------------
# write-ahead: only what changed is written, in one transaction
# ---------------------------------------------------------------------------
def _rowids(conn: sqlite3.Connection, table: str) -> dict[str, int]:
    return dict(conn.execute(f"SELECT name, rowid FROM {table}").fetchall())


def test_commit_writes_only_changed_rows(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    before = {t: _rowids(led.conn, t) for t in ("replicas", "pcpis", "source_pcpis")}
    new = old.with_replica(attrs.evolve(old.replicas["r3"], state="update"))
    changes = led.conn.total_changes
    led.commit(old, new)
    assert led.conn.total_changes - changes == 1  # one replica row, no meta, no other table
    after = {t: _rowids(led.conn, t) for t in ("replicas", "pcpis", "source_pcpis")}
    assert after["pcpis"] == before["pcpis"] and after["source_pcpis"] == before["source_pcpis"]
    moved = {n for n in before["replicas"] if before["replicas"][n] != after["replicas"][n]}
    assert moved == {"r3"}
    assert led.commits == 1
    led.close()


def test_commit_of_identical_state_writes_nothing(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    changes = led.conn.total_changes
    led.commit(old, old)
    assert led.conn.total_changes == changes
    led.close()


def test_commit_writes_changed_group_fields_and_deletions(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    new = attrs.evolve(old.without_pcpi("co-g-000003-individual"), seq=50)
    changes = led.conn.total_changes
    led.commit(old, new)
    assert led.conn.total_changes - changes == 2  # meta 'seq' + one deleted PCPI row
    assert json.loads(led.conn.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]) == 50
    assert led.conn.execute("SELECT count(*) FROM pcpis").fetchone()[0] == 2
    led.close()


def test_commit_through_decide_rewrites_only_the_replicas_the_decision_touched(tmp_path):
    reps = {
        n: Replica(
            name=n,
            source_qtree=n,
            state="update",
            exported="co-g-000002-base",
            source_point="co-g-src-000001",
            active_point="co-g-src-000001",
            target="co-g-src-000003",
        )
        for n in ("A", "B", "C", "D")
    }
    st = GroupState(
        name="g",
        phase="updating",
        cycle=2,
        seq=3,
        replicas=reps,
        cycle_targets={"default": "co-g-src-000003"},
        pcpis={"co-g-000002-base": Pcpi("co-g-000002-base", "base", 1, True)},
        source_pcpis={"co-g-src-000003": SourcePcpi("co-g-src-000003", 2, True)},
    )
    led = Ledger.create(tmp_path / "g.sqlite", st)
    before = _rowids(led.conn, "replicas")
    d = decide(st, ev.TransferDone(replica="B", ok=True))
    led.commit(st, d.state, d.log)
    after = _rowids(led.conn, "replicas")
    assert {n for n in before if before[n] != after[n]} == {"B"}
    assert _rowids(led.conn, "pcpis") == {"co-g-000002-base": 1}
    led.close()


def test_a_failed_commit_is_rolled_back_entirely(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    new = attrs.evolve(old.with_replica(attrs.evolve(old.replicas["r0"], state="update")), seq=99)
    with pytest.raises(AttributeError):
        led.commit(old, new, [object()])  # the log insert fails after the state rows were written
    assert led.load() == old
    assert led.transitions() == []
    assert led.commits == 0
    led.close()


def test_commit_is_durable_across_sigkill_I6(ledger_file):
    """A commit that returned survives the process being SIGKILLed right after."""
    code = textwrap.dedent(f"""
        import os, signal, attrs
        from coalesce_core.ledger import Ledger
        led = Ledger.open({str(ledger_file)!r}, group="g")
        old = led.load()
        led.commit(old, attrs.evolve(old, seq=777, phase="releasing"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    led = Ledger.open(ledger_file, group="g")
    st = led.load()
    assert (st.seq, st.phase) == (777, "releasing")
    led.close()


def test_wal_and_synchronous_full(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    led.close()
    # the mode is persistent in the file: a fresh plain connection sees WAL too
    conn = sqlite3.connect(ledger_file)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# ---------------------------------------------------------------------------
# transitions log and cycles
# ---------------------------------------------------------------------------
def test_transitions_log_in_order_with_limit(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    new = attrs.evolve(old, cycle=8)
    log = [Transition(None, "start_cycle", "idle", "updating"), Transition("r0", "start_update", "stable", "update")]
    led.commit(old, new, log, now=100.0)
    led.commit(new, new, [Transition("r0", "update_failed", "update", "rollback")], now=101.0)
    rows = led.transitions()
    assert rows == [
        {"ts": 100.0, "cycle": 8, "replica": None, "trigger": "start_cycle", "source": "idle", "dest": "updating"},
        {"ts": 100.0, "cycle": 8, "replica": "r0", "trigger": "start_update", "source": "stable", "dest": "update"},
        {"ts": 101.0, "cycle": 8, "replica": "r0", "trigger": "update_failed", "source": "update", "dest": "rollback"},
    ]
    assert led.transitions(limit=1) == rows[-1:]
    assert list(iter_log_edges(rows)) == [
        (None, "start_cycle", "idle", "updating"),
        ("r0", "start_update", "stable", "update"),
        ("r0", "update_failed", "update", "rollback"),
    ]
    led.close()


def test_cycles_table(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    assert led.cycles() == []
    led.record_cycle({"cycle": 2, "started": 1.0, "ended": 2.0, "failures": 0})
    led.record_cycle({"cycle": 1, "started": 0.0, "ended": 0.5, "failures": 1})
    led.record_cycle({"cycle": 2, "started": 1.0, "ended": 3.0, "failures": 4})  # replaced, not duplicated
    assert [c["cycle"] for c in led.cycles()] == [1, 2]
    assert led.cycles()[1]["failures"] == 4
    led.close()


def test_last_cycle_is_the_newest_row_whatever_the_order_written(ledger_file):
    """What the agent reads after each cycle: the newest row alone, not the whole history."""
    led = Ledger.open(ledger_file, group="g")
    assert led.last_cycle() is None
    led.record_cycle({"cycle": 3, "started": 2.0, "ended": 2.5, "failures": 0})
    led.record_cycle({"cycle": 1, "started": 0.0, "ended": 0.5, "failures": 1})
    assert led.last_cycle() == {"cycle": 3, "started": 2.0, "ended": 2.5, "failures": 0} == led.cycles()[-1]
    led.close()


# ---------------------------------------------------------------------------
# missing, damaged, foreign files: MetadataError with a hint, nothing changed
# ---------------------------------------------------------------------------
def _assert_refused(path: Path, group: str | None = "g", match: str | None = None) -> MetadataError:
    before = digest(path) if path.exists() else None
    size = path.stat().st_size if path.exists() else None
    with pytest.raises(MetadataError, match=match) as ei:
        Ledger.open(path, group=group)
    assert ei.value.hint, "a MetadataError must say what to do"
    assert str(path) in str(ei.value)
    if before is not None:
        assert path.stat().st_size == size and digest(path) == before, "the damaged file was changed"
    assert ei.value.exit_code == 5
    return ei.value


def test_missing_file(tmp_path):
    err = _assert_refused(tmp_path / "nope.sqlite", match="no metadata file")
    assert "coalesce init" in err.hint
    assert not (tmp_path / "nope.sqlite").exists()  # opening never creates one


def test_garbage_file(tmp_path):
    path = tmp_path / "g.sqlite"
    path.write_bytes(os.urandom(1) + b"this is not a database" * 500)
    err = _assert_refused(path, match="damaged")
    assert "backup" in err.hint


@pytest.mark.parametrize("keep", [100, 4096, 0.5, -4096])
def test_truncated_copy_of_a_real_ledger(tmp_path, keep):
    path = tmp_path / "full.sqlite"
    big = sample_state(300)
    Ledger.create(path, big).close()
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[:n])
    _assert_refused(cut, match="damaged")


def test_ledger_of_another_group(ledger_file):
    err = _assert_refused(ledger_file, group="other", match="belongs to group 'g'")
    assert "[group] name" in err.hint


def test_wrong_schema_version(ledger_file):
    conn = sqlite3.connect(ledger_file)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    _assert_refused(ledger_file, match=f"schema {SCHEMA_VERSION + 1}")


def _foreign_sqlite(tmp_path: Path) -> Path:
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)  # rollback-journal mode, like most SQLite files
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    return path


def test_sqlite_file_that_is_not_a_ledger_is_refused(tmp_path):
    with pytest.raises(MetadataError, match="damaged") as ei:
        Ledger.open(_foreign_sqlite(tmp_path), group="g")
    assert ei.value.hint


def test_sqlite_file_that_is_not_a_ledger_is_left_unchanged(tmp_path):
    _assert_refused(_foreign_sqlite(tmp_path))


def test_unreadable_content_on_load_is_a_metadata_error(ledger_file):
    conn = sqlite3.connect(ledger_file)
    conn.execute("UPDATE replicas SET data='{not json' WHERE name='r0'")
    conn.commit()
    conn.close()
    led = Ledger.open(ledger_file, group="g")
    with pytest.raises(MetadataError, match="unreadable") as ei:
        led.load()
    assert ei.value.hint
    led.close()


def test_empty_file_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "g.sqlite"
    path.write_bytes(b"")
    _assert_refused(path)


def test_ledger_without_group_row(ledger_file):
    conn = sqlite3.connect(ledger_file)
    conn.execute("DELETE FROM meta WHERE key='group'")
    conn.commit()
    conn.close()
    _assert_refused(ledger_file)


def test_non_numeric_schema_version(ledger_file):
    conn = sqlite3.connect(ledger_file)
    conn.execute("UPDATE meta SET value='one' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    _assert_refused(ledger_file)


def test_create_refuses_to_overwrite(ledger_file):
    before = digest(ledger_file)
    with pytest.raises(MetadataError, match="already exists") as ei:
        Ledger.create(ledger_file, GroupState(name="g"))
    assert ei.value.hint
    assert digest(ledger_file) == before
    led = Ledger.open(ledger_file, group="g")
    assert led.load() == sample_state()
    led.close()


def test_create_refuses_to_overwrite_any_file(tmp_path):
    path = tmp_path / "x.sqlite"
    path.write_bytes(b"precious")
    with pytest.raises(MetadataError):
        Ledger.create(path, GroupState(name="g"))
    assert path.read_bytes() == b"precious"


def test_commit_persists_a_changed_retry_policy(ledger_file):
    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    new = attrs.evolve(old, retry=RetryPolicy(initial=1.0, factor=4.0, maximum=7.0))
    led.commit(old, new)
    led.close()
    led = Ledger.open(ledger_file, group="g")
    assert led.load().retry == RetryPolicy(initial=1.0, factor=4.0, maximum=7.0)
    led.close()


def test_commit_persists_a_retention_policy_with_its_time_zone(ledger_file):
    from coalesce_core.retention import Policy

    led = Ledger.open(ledger_file, group="g")
    old = led.load()
    for policy in (Policy(keep="24h 7d", max=9, zone="Europe/Berlin"), Policy(keep_min=60.0)):
        new = attrs.evolve(old, retention=policy)
        led.commit(old, new)
        led.close()
        led = Ledger.open(ledger_file, group="g")
        assert led.load().retention == policy
        old = led.load()
    led.close()


def test_notes_beside_the_state(tmp_path):
    """Advisory notes (I5 marks, last full verifications): JSON under a known key, replaced in one
    durable transaction, never mixed with the state; an unknown key is refused, an unreadable note
    reads as absent."""
    led = Ledger.create(tmp_path / "m.db", sample_state())
    assert led.note("i5_marks") is None
    led.update_note("i5_marks", lambda old: {"r1": "co-g-src-000001", "seen": old})
    led.update_note("verified", lambda old: {"r2": {"at": 5.0, "ok": True}})
    led.close()
    led = Ledger.open(tmp_path / "m.db")
    assert led.note("i5_marks") == {"r1": "co-g-src-000001", "seen": None}
    assert led.note("verified") == {"r2": {"at": 5.0, "ok": True}}
    assert led.load() == sample_state()
    with pytest.raises(ValueError, match="not a ledger note"):
        led.note("group")
    with pytest.raises(ValueError, match="not a ledger note"):
        led.update_note("retry", lambda old: 1)

    def fail(old):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        led.update_note("verified", fail)
    assert led.note("verified") == {"r2": {"at": 5.0, "ok": True}}  # rolled back whole
    led.conn.execute("UPDATE meta SET value = 'not json' WHERE key = 'verified'")
    assert led.note("verified") is None


def test_a_refused_write_is_named_as_such_and_the_committed_state_stands(tmp_path):
    """A read-only, full or failing file system is not damage: the error says the write was refused and
    never sends the operator to a backup; the last committed state is what the next open reads."""
    import attrs

    from coalesce_core.errors import MetadataError
    from coalesce_core.ledger import Ledger

    path = tmp_path / "g.sqlite"
    state = GroupState(name="g")
    Ledger.create(path, state).close()
    led = Ledger.open(path, group="g")
    led.conn.execute("PRAGMA query_only=ON")  # SQLite refuses every write, as on a read-only mount
    with pytest.raises(MetadataError) as ei:
        led.commit(state, attrs.evolve(state, cycle=state.cycle + 1))
    assert "could not be written" in str(ei.value) and "backup" not in ei.value.hint
    assert ei.value.exit_code == 5
    led.close()
    again = Ledger.open(path, group="g")
    try:
        assert again.load() == state
    finally:
        again.close()


def test_a_file_that_cannot_be_read_is_not_called_damaged(tmp_path):
    from coalesce_core.errors import MetadataError
    from coalesce_core.ledger import Ledger

    path = tmp_path / "g.sqlite"
    path.mkdir()  # not readable as a database at all: an operator's slip, not a damaged ledger
    with pytest.raises(MetadataError) as ei:
        Ledger.open(path, group="g")
    assert "cannot be read" in str(ei.value) and "do not restore it from a backup" in ei.value.hint


def test_the_group_identity_is_kept_once_and_never_replaced(tmp_path):
    """coalesce_core/ownership.py ties the ledger to its volumes by this identity."""
    with_id = Ledger.create(tmp_path / "a.sqlite", GroupState(name="g"), identity="id-1")
    assert with_id.identity() == "id-1"
    with_id.set_identity("id-2")
    assert with_id.identity() == "id-1"
    with_id.close()
    older = Ledger.create(tmp_path / "b.sqlite", GroupState(name="g"))
    assert older.identity() is None
    older.set_identity("id-3")
    older.close()
    assert Ledger.open(tmp_path / "b.sqlite", group="g").identity() == "id-3"
