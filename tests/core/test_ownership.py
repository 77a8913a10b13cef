"""One owner per volume (coalesce_core/ownership.py, docs/operations.md "One owner per volume"): a
destination belongs to one group, a source serves one group of a name, and a ledger belongs to the
group its destination records; on mem and sim volumes."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from coalesce_core.agent import Agent
from coalesce_core.backend.faults import source_outage
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import MetadataError, VolumeInUse
from coalesce_core.ownership import DESTINATION, read, source_key
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill


@pytest.fixture(params=["mem", "sim"])
def urls(request, tmp_path, monkeypatch):
    """Volume URLs by name: ``urls("d")`` is the same volume every time within a test."""
    if request.param == "sim":
        monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
        return lambda name: f"sim://{tmp_path}/{name}"
    return lambda name: f"mem://{name}-{tmp_path.name}"


def group(group_config, urls, name, src, dst, replicas=("A",)):
    return group_config(replicas=replicas, name=name, source_url=urls(src), dest_url=urls(dst))


def running(config) -> Harness:
    h = Harness(config)
    fill(h.writer, [r.source for r in config.replicas])
    h.cycle()
    return h


def test_a_second_group_on_a_destination_is_refused_and_the_first_keeps_its_exports(group_config, urls):
    a = running(group(group_config, urls, "a", "s1", "d", ("A",)))
    exported = a.agent.dest.exported()
    b = group(group_config, urls, "b", "s2", "d", ("B",))
    with pytest.raises(VolumeInUse) as ei:
        Agent.init(b)
    assert ei.value.exit_code == 2
    assert "belongs to group 'a'" in ei.value.message and "export table" in ei.value.message
    assert "destination volume of its own" in ei.value.hint
    assert not b.ledger_path(None).exists()  # nothing was made for b
    assert a.agent.dest.exported() == exported
    a.writer.write("A", "more", b"m")
    a.cycle()
    assert a.agent.dest.exported() == {"A": a.agent.state.replicas["A"].exported} != exported
    assert set(a.states().values()) == {"stable"}
    a.assert_invariants()


def test_two_groups_named_alike_on_one_source_are_refused(group_config, urls):
    first = running(group(group_config, urls, "g", "s", "d1"))
    second = group(group_config, urls, "g", "s", "d2")
    with pytest.raises(VolumeInUse) as ei:
        Agent.init(second)
    assert ei.value.exit_code == 2
    assert f"destination {urls('d1')}" in ei.value.message and "co-g-src-" in ei.value.message
    assert "another [group] name" in ei.value.hint
    held = first.agent.source.snapshot_list()
    first.restart()  # its recovery still finds every source PCPI it holds as its own
    assert first.agent.source.snapshot_list() == held
    first.assert_invariants()


def test_groups_of_other_names_share_a_source(group_config, urls):
    a = running(group(group_config, urls, "a", "s", "d1"))
    b = running(group(group_config, urls, "b", "s", "d2"))
    a.restart()
    b.restart()
    for h in (a, b):
        h.writer.write("A", "more", b"m")
        h.cycle()
        assert set(h.states().values()) == {"stable"}
        h.assert_invariants()


def test_the_ledger_of_another_group_of_the_same_name_is_refused_and_nothing_changes(group_config, urls):
    """A copied ledger of a same-named group was accepted and started over."""
    mine = running(group(group_config, urls, "g", "s1", "d1"))
    other = running(group(group_config, urls, "g", "s2", "d2"))
    mine.agent.close()
    other.agent.close()
    dest = Volume.open(plugin_manager(), urls("d1"))
    before = (dest.exported(), dest.snapshot_list())
    mine_ledger = mine.config.ledger_path(None)
    backup = sqlite3.connect(other.config.ledger_path(None))
    into = sqlite3.connect(mine_ledger)
    backup.backup(into)  # the other group's ledger in place of this one's
    backup.close()
    into.close()
    for readonly in (False, True):
        with pytest.raises(MetadataError) as ei:
            Agent.open(mine.config, readonly=readonly)
        assert ei.value.exit_code == 5
        assert "not the ledger of the group that owns destination" in ei.value.message
        assert "own ledger back" in ei.value.hint
    assert (dest.exported(), dest.snapshot_list()) == before


def test_a_ledger_from_before_owner_records_is_recorded_at_its_first_open(group_config, urls):
    h = running(group(group_config, urls, "g", "s", "d"))
    _forget_records(h)
    h.restart()
    identity = h.agent.ledger.identity()
    assert identity and read(h.agent.dest, DESTINATION).id == identity
    assert read(h.agent.source, source_key("g")).id == identity
    with pytest.raises(VolumeInUse):
        Agent.init(group(group_config, urls, "other", "s9", "d"))
    h.cycle()
    h.assert_invariants()


def _forget_records(h: Harness) -> None:
    """The group as it was before owner records existed: none on its volumes, no identity in its ledger.
    Its volumes stay open: the test's writer reads the source through them."""
    h.agent.ledger.close()
    conn = sqlite3.connect(h.config.ledger_path(None))
    conn.execute("DELETE FROM meta WHERE key = 'group_id'")
    conn.commit()
    conn.close()
    for vol in (h.agent.source, h.agent.dest):
        handle = vol.handle
        if hasattr(handle, "owner_records"):
            handle.owner_records.clear()
        md = vol.metadata_dir()
        if md is not None:
            shutil.rmtree(f"{md}/owners", ignore_errors=True)


def test_a_group_from_before_owner_records_is_not_shut_out_by_a_newcomer(group_config, urls):
    """Its volumes hold no records yet, but its PCPIs say whose they are."""
    old = running(group(group_config, urls, "home", "s", "d"))
    _forget_records(old)
    with pytest.raises(VolumeInUse) as ei:
        Agent.init(group(group_config, urls, "work", "s2", "d"))
    assert "holds the PCPIs of group 'home'" in ei.value.message
    with pytest.raises(VolumeInUse) as ei:
        Agent.init(group(group_config, urls, "home", "s", "d2"))
    assert "holds source PCPIs of a group named 'home'" in ei.value.message
    old.restart()  # recorded now
    assert read(old.agent.dest, DESTINATION).group == "home"
    old.writer.write("A", "more", b"m")
    old.cycle()
    assert set(old.states().values()) == {"stable"}
    old.assert_invariants()


def test_init_again_without_the_ledger_is_refused_and_names_the_record(group_config, urls):
    config = group(group_config, urls, "g", "s", "d")
    Agent.init(config).close()
    config.ledger_path(None).unlink()
    with pytest.raises(VolumeInUse) as ei:
        Agent.init(config)
    assert "whose ledger is not at" in ei.value.message
    assert "restore that group's ledger" in ei.value.hint and "owner record" in ei.value.hint


def test_a_source_that_serves_a_same_named_group_is_refused_at_the_first_cycle(group_config, urls):
    """Group g's config is changed to name the source of another group g: the record there is checked
    when the agent first opens the source, for the cycle's transfers.  Each cycle ends before any
    transfer, as in a source outage, with the record's error and hint (exit 2), every replica keeping
    its image; the other verbs work; neither recovery nor the cycles touch the other group's source
    PCPIs (released as unknown, they would have been lost)."""
    first = running(group(group_config, urls, "g", "s", "d1"))
    moved = running(group(group_config, urls, "g", "s2", "d2"))
    exported = moved.agent.dest.exported()
    moved.agent.close()
    config = moved.config.with_source(urls("s"))
    held = first.writer.volume.snapshot_list()
    assert held and read(first.writer.volume, source_key("g")).destination == urls("d1")
    agent = Agent.open(config)
    try:
        assert agent.source_if_open() is None  # recovery could not use it: its record is the other group's
        for n in (1, 2):
            report = agent.run_once()
            s = agent.state
            assert s.phase == "idle" and report["failed"].keys() == {"A"}
            (refusal,) = agent.refusals
            assert isinstance(refusal, VolumeInUse) and refusal.exit_code == 2
            assert "already serves another group named 'g'" in refusal.message
            assert "another [group] name" in refusal.hint
            a = s.replicas["A"]
            assert a.state == "stable" and "already serves another group" in a.last_error
            assert a.consecutive_failures == a.outages == n
            assert agent.dest.exported() == exported and agent.source_if_open() is None
        agent.break_mirror("A")  # the destination alone
        assert agent.state.replicas["A"].exported == ACTIVE
    finally:
        agent.close()
    reader = Agent.open(config, readonly=True)  # status
    try:
        assert reader.state.replicas["A"].outages == 2
    finally:
        reader.close()
    assert first.writer.volume.snapshot_list() == held
    first.restart()
    first.writer.write("A", "more", b"m")
    first.cycle()
    assert set(first.states().values()) == {"stable"}
    first.assert_invariants()


def test_the_source_record_waits_for_a_cycle_that_reaches_the_source(group_config, urls):
    """A group from before owner records whose source is down: it opens, recovers and breaks without it,
    writing only the destination's record; the first cycle that reaches the source records the group."""
    h = running(group(group_config, urls, "g", "s", "d"))
    _forget_records(h)
    for rule in source_outage(h.config.source):
        h.faults.add(rule)
    h.restart()
    identity = h.agent.ledger.identity()
    assert identity and read(h.agent.dest, DESTINATION).id == identity
    assert read(h.writer.volume, source_key("g")) is None
    h.agent.break_mirror("A")
    h.agent.resync("A")
    h.cycle()  # the source still down: the cycle ends before any transfer
    assert h.agent.source_if_open() is None and read(h.writer.volume, source_key("g")) is None
    h.faults.clear()
    h.cycle()
    assert read(h.writer.volume, source_key("g")).id == identity
    h.cycle()
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()
