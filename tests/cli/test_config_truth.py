"""The config is the truth (docs/operations.md, "Changing a group while it runs"): a replica removed from or changed
in the config is refused until `coalesce remove`/`coalesce add` reconcile it, and the verbs that change a
group are handed to a running `coalesce run`, which takes them at its next safe point; the verb reports
what they did, or why they were refused. Never silently ignored, never silently undone."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from backends import on_backend
from groups import at_rest, cli_group, run_cli, start_cli, status, wait_until

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill


@pytest.fixture
def sim_group(tmp_path: Path) -> Path:
    """An initialised two-replica group (A, B) on sim volumes, through one cycle; its config's path."""
    cfg, writer = cli_group(tmp_path, "truth")
    writer.volume.close()
    first = run_cli(cfg, "run", "--once", "--quiet")
    assert first.returncode == 0, first.stderr
    return cfg


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs")])
def any_group(request, tmp_path: Path) -> Path:
    """As ``sim_group``, on sim or on real btrfs volumes."""
    if request.param == "sim":
        cfg, writer = cli_group(tmp_path, "truth")
    else:
        urls = request.getfixturevalue("btrfs_urls")
        cfg, writer = cli_group(tmp_path, "truth", urls("src"), urls("dst"))
    writer.volume.close()
    first = run_cli(cfg, "run", "--once", "--quiet")
    assert first.returncode == 0, first.stderr
    return cfg


def _drop_replica(cfg: Path, name: str) -> None:
    text = cfg.read_text()
    block = f'[[replica]]\nname = "{name}"\n'
    assert block in text
    cfg.write_text(text.replace(block, ""))


def _states(cfg: Path) -> dict[str, str]:
    return {r["name"]: r["state"] for r in status(cfg)["replicas"]}


def test_a_replica_removed_from_the_config_is_refused_until_coalesce_remove(sim_group: Path):
    cfg = sim_group
    _drop_replica(cfg, "B")
    refused = run_cli(cfg, "run", "--once")
    assert refused.returncode == 2, refused.stderr
    assert "error: replica 'B' is in the ledger but not in" in refused.stderr
    assert "hint:" in refused.stderr and "coalesce remove B" in refused.stderr
    assert _states(cfg) == {"A": "stable", "B": "stable"}  # nothing changed
    removed = run_cli(cfg, "remove", "B")
    assert removed.returncode == 0, removed.stderr
    assert "removed replica B" in removed.stdout and "its data stay" in removed.stdout
    assert _states(cfg) == {"A": "stable"}
    again = run_cli(cfg, "run", "--once")
    assert again.returncode == 0, again.stderr
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_retention_policy_the_destination_has_no_room_for_is_refused_by_run(sim_group: Path):
    """sim holds at most 255 PCPIs: an unbounded [retention] (keep_min alone) is a ConfigError naming
    the max that fits, before anything changes; with that max the run keeps the old base as a generation."""
    cfg = sim_group
    before = status(cfg)
    plain = cfg.read_text()
    cfg.write_text(plain + '\n[retention]\nkeep_min = "30d"\n')
    refused = run_cli(cfg, "run", "--once")
    assert refused.returncode == 2, refused.stderr
    assert "[retention] can keep an unbounded number of generations" in refused.stderr
    assert "hint: set `max = 251` (or less) in [retention]" in refused.stderr
    points = lambda st: [(r["name"], r["exported_pcpi"], r["source_point"]) for r in st["replicas"]]  # noqa: E731
    assert points(status(cfg)) == points(before)
    cfg.write_text(plain + '\n[retention]\nkeep_min = "30d"\nmax = 251\n')
    ran = run_cli(cfg, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    roles = {p["name"]: p["role"] for p in status(cfg)["pcpis"]}
    assert sorted(roles.values()) == ["base", "generation"]


def test_a_changed_source_is_refused_naming_remove_and_add(sim_group: Path):
    cfg = sim_group
    text = cfg.read_text()
    cfg.write_text(text.replace('[[replica]]\nname = "A"\n', '[[replica]]\nname = "A"\nsource = "B"\n'))
    refused = run_cli(cfg, "run", "--once")
    assert refused.returncode == 2, refused.stderr
    assert "error: replica 'A' has source qtree 'A' in the ledger, 'B' in" in refused.stderr
    assert "coalesce remove A" in refused.stderr and "coalesce add A --source B" in refused.stderr
    cfg.write_text(text)
    assert run_cli(cfg, "run", "--once").returncode == 0


def test_remove_releases_the_pins_and_keeps_the_data(sim_group: Path, tmp_path: Path):
    """`coalesce remove` of a broken replica: its last good image (an individual PCPI) is released, its
    config block is gone, its destination qtree stays; a replica of that name can be added again."""
    cfg = sim_group
    assert run_cli(cfg, "break", "B").returncode == 0
    assert run_cli(cfg, "run", "--once", "--quiet").returncode == 3  # B outside the cycle
    pcpis = status(cfg)["pcpis"]  # B's last good image: the old base, now its individual PCPI
    assert any(p["role"] == "individual" for p in pcpis), pcpis
    removed = run_cli(cfg, "remove", "B")
    assert removed.returncode == 0, removed.stderr
    assert 'name = "B"' not in cfg.read_text()
    st = status(cfg)
    assert [r["name"] for r in st["replicas"]] == ["A"]
    assert not any(p["role"] == "individual" for p in st["pcpis"]), st["pcpis"]
    dst = Volume.open(plugin_manager(), f"sim://{tmp_path}/dst")
    try:
        assert "B" in dst.qtree_list()  # the data stay until the operator deletes them
    finally:
        dst.close()
    unknown = run_cli(cfg, "remove", "B")
    assert unknown.returncode == 6 and "no replica 'B'" in unknown.stderr
    assert run_cli(cfg, "add", "B").returncode == 0
    assert run_cli(cfg, "run", "--once", "--quiet").returncode == 0
    assert _states(cfg) == {"A": "stable", "B": "stable"}


def test_verbs_beside_a_running_agent_are_handed_to_it_and_never_undone(any_group: Path):
    """break, resync, add and remove beside `coalesce run` (a cycle every second): each is taken at the
    agent's next safe point, the verb says so, and later cycles keep what it did (sim and btrfs)."""
    cfg = any_group
    with start_cli(cfg, "run", "--interval", "1", "--quiet") as runner:
        wait_until(runner, lambda: at_rest(status(cfg)), "the first cycle ended")
        broke = run_cli(cfg, "break", "A")
        assert broke.returncode == 0, broke.stderr
        assert "handed to the running agent" in broke.stdout and "replica A is broken" in broke.stdout
        cycle = status(cfg)["cycle"]
        wait_until(runner, lambda: status(cfg)["cycle"] >= cycle + 2, "two more cycles")
        assert _states(cfg)["A"] == "broken"  # never undone by the running agent
        added = run_cli(cfg, "add", "C", "--source", "A")  # a second replica of qtree A
        assert added.returncode == 0, added.stderr
        assert "replica C" in added.stdout and 'name = "C"\nsource = "A"' in cfg.read_text()
        wait_until(runner, lambda: _states(cfg).get("C") == "stable", "C baselined by the running agent")
        resynced = run_cli(cfg, "resync", "A")
        assert resynced.returncode == 0, resynced.stderr
        wait_until(runner, lambda: _states(cfg)["A"] == "stable", "A rejoined the cycle")
        removed = run_cli(cfg, "remove", "C")
        assert removed.returncode == 0, removed.stderr
        assert "removed replica C" in removed.stdout
        assert "C" not in _states(cfg) and 'name = "C"' not in cfg.read_text()
        refused = run_cli(cfg, "break", "nosuch")
        assert refused.returncode == 6 and "error: group 'truth' has no replica 'nosuch'" in refused.stderr
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 0
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_no_wait_queues_the_request_and_status_shows_it(sim_group: Path):
    cfg = sim_group
    with start_cli(cfg, "run", "--interval", "3600", "--quiet") as runner:
        wait_until(runner, lambda: at_rest(status(cfg)), "the first cycle ended")
        queued = run_cli(cfg, "break", "B", "--no-wait")
        assert queued.returncode == 0, queued.stderr
        m = re.search(r"request (\d+)", queued.stdout)
        assert m and "queued" in queued.stdout, queued.stdout
        wait_until(runner, lambda: _states(cfg)["B"] == "broken", "the queued break taken")
        requests = status(cfg)["requests"]
        assert [(r["id"], r["verb"], r["status"]) for r in requests][-1] == (int(m.group(1)), "break", "done")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 0


# -- the waiting verb, in this process (the cli fixtures of tests/cli/conftest.py: a mem group) ----------
def _args(**kw):
    import argparse

    return argparse.Namespace(**{"config": None, "verb": "break", "timeout": 5.0, "no_wait": False, **kw})


def _ask(name: str):
    """A `break NAME` request in the queue of the group at ./coalesce.toml; (ledger, request, its path)."""
    from coalesce_core import requests
    from coalesce_core.ledger import Ledger
    from coalesce_core.ui import cli as cli_mod

    with cli_mod._reader(_args()) as reader:
        path = Path(reader.ledger.path)
    led = Ledger.open(path)
    return led, led.ask("break", requests.make_args("break", replica=name), time.time(), 1), path


def test_a_request_the_agent_left_is_taken_by_the_waiting_verb(group, cli):
    """The agent stopped (a `run --once` that ended) before it took the request: the verb that waits for
    it takes the group's lock and the queue itself."""
    from coalesce_core import requests
    from coalesce_core.ui import cli as cli_mod

    assert cli("init")[0] == 0 and cli("run", "--once", "-q")[0] == 0
    led, req, path = _ask("A")
    try:
        answer = cli_mod._await(_args(), led, req, path, "nobody")
    finally:
        led.close()
    assert (answer.status, answer.message) == (requests.DONE, "replica A is broken")
    assert json.loads(cli("status", "--json")[1])["replicas"][0]["state"] == "broken"


def test_a_request_not_taken_in_time_is_withdrawn(group, cli):
    """A running agent that does not take the request within --timeout (here: a `coalesce run` holding the
    lock in a long cycle, played by this process): the verb withdraws it, exits 9 saying so, and the
    request is never taken afterwards."""
    from coalesce_core import requests
    from coalesce_core.errors import GroupLocked
    from coalesce_core.grouplock import GroupLock
    from coalesce_core.ui import cli as cli_mod

    assert cli("init")[0] == 0 and cli("run", "--once", "-q")[0] == 0
    led, req, path = _ask("A")
    lock = GroupLock.acquire(path, "home", "run")
    try:
        with pytest.raises(GroupLocked, match="was not taken within 0.3 s") as ei:
            cli_mod._await(_args(timeout=0.3), led, req, path, "PID 1")
        assert "--no-wait" in ei.value.hint and ei.value.exit_code == 9
        assert led.request(req.id).status == requests.WITHDRAWN
    finally:
        lock.release()
        led.close()
    assert cli("run", "--once", "-q")[0] == 0  # the next agent does not take it
    st = json.loads(cli("status", "--json")[1])
    assert {r["state"] for r in st["replicas"]} == {"stable"}
    assert [(r["id"], r["status"]) for r in st["requests"]] == [(req.id, "withdrawn")]


def test_status_shows_the_requests_and_their_answers(group, cli, validate_json):
    assert cli("init")[0] == 0 and cli("run", "--once", "-q")[0] == 0
    led, req, _path = _ask("nosuch")
    led.close()
    assert cli("run", "--once", "-q")[0] == 0  # the agent refuses it
    rc, out, _ = cli("status")
    assert f"request {req.id} (break nosuch): refused " in out and "has no replica 'nosuch'" in out
    doc = json.loads(cli("status", "--json")[1])
    validate_json(doc, "status")
    assert doc["requests"][0]["status"] == "refused" and doc["requests"][0]["answered"] > 0


def test_a_refused_add_or_remove_leaves_the_config_as_it_was(group, cli):
    """`add` and `remove` edit the config before the ledger; when the change is refused the config is put
    back, byte for byte.  A replica only the config names (added by hand, never run) is removed from the
    config alone."""
    tmp, _ = group
    cfg = tmp / "coalesce.toml"
    assert cli("init")[0] == 0 and cli("run", "--once", "-q")[0] == 0
    text = cfg.read_text()
    cfg.write_text(text.replace('[[replica]]\nname = "B"\nsource = "qb"\n', ""))  # B left the config by hand
    edited = cfg.read_text()
    rc, _, err = cli("add", "B", "--source", "other")  # the ledger's B replicates qb: refused
    assert rc == 6 and "already exists with source 'qb'" in err
    assert cfg.read_text() == edited
    rc, out, err = cli("add", "B", "--source", "qb")  # puts it back: reconciled
    assert rc == 0, err
    assert cli("run", "--once", "-q")[0] == 0
    cfg.write_text(cfg.read_text() + '\n[[replica]]\nname = "C"\nsource = "qc"\n')  # never run
    rc, out, err = cli("remove", "C")
    assert rc == 0 and "the group had not added it yet" in out, err
    assert 'name = "C"' not in cfg.read_text()
    assert [r["name"] for r in json.loads(cli("status", "--json")[1])["replicas"]] == ["A", "B"]


def test_break_beside_a_running_agent_while_the_source_is_down(sim_group: Path, tmp_path: Path):
    """The source is down: every cycle of the running agent ends before any transfer (source
    unavailable), the agent idle between them, so a failover (`break`) is taken as usual, without the
    source; a refused request is refused as usual; once the source is back the broken replica stays
    out of the cycle."""
    cfg = sim_group
    down = {"COALESCE_FAULTS": f"coalesce_snapshot_create:volume={tmp_path}/src:message=source down"}
    with start_cli(cfg, "run", "--interval", "2", "--quiet", env=down) as runner:
        wait_until(
            runner,
            lambda: all("source down" in (r["last_error"] or "") for r in status(cfg)["replicas"]),
            "a cycle that ended before any transfer",
        )
        broke = run_cli(cfg, "break", "A", "--timeout", "60")
        assert broke.returncode == 0, broke.stderr
        assert "handed to the running agent" in broke.stdout and "replica A is broken" in broke.stdout
        resync = run_cli(cfg, "resync", "B", "--timeout", "60")  # B is stable: not a resync's source state
        assert resync.returncode == 6 and "resync" in resync.stderr and "hint:" in resync.stderr, resync.stderr
        assert status(cfg)["phase"] == "idle"
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 0
        err = runner.communicate()[1]
        assert "source down" in err and "cycle failed" not in err  # the cycles ended, none failed
    back = run_cli(cfg, "run", "--once", "--quiet")
    assert back.returncode == 3, back.stderr  # A is broken: outside the cycle
    assert _states(cfg) == {"A": "broken", "B": "stable"}


def test_run_status_and_verify_on_a_config_of_two_sources(group, cli):
    """docs/config.md, "Sources": `init` checks both sources, `run --once` brings each replica to a PCPI
    of its own source in one coalesced image, `status` reads the group and `verify --full` compares each
    replica with its own source; with an `interval` of an hour on each source a second `run --once` starts
    no cycle, with a `parallel` of its own too."""
    tmp, _writer = group
    cfg = tmp / "coalesce.toml"
    src, other = f"mem://{tmp}/src.vol", f"mem://{tmp}/other.vol"
    fill(SourceWriter(Volume.open(plugin_manager(), other, create=True)), ["qb"], seed=5)
    two = (
        cfg.read_text()
        .replace(f'source = "{src}"\n', "")
        .replace(
            '[[replica]]\nname = "A"\n',
            f'[[source]]\nname = "one"\nurl = "{src}"\n[[source]]\nname = "two"\nurl = "{other}"\n'
            '[[replica]]\nname = "A"\nfrom = "one"\n',
            1,
        )
    )
    cfg.write_text(two.replace('source = "qb"\n', 'source = "qb"\nfrom = "two"\n'))
    assert cli("init")[0] == 0
    rc, _out, err = cli("run", "--once", "-q")
    assert rc == 0, err
    rc, out, _err = cli("status", "--json")
    doc = json.loads(out)
    assert rc == 0 and {r["name"]: r["state"] for r in doc["replicas"]} == {"A": "stable", "B": "stable"}
    points = {r["name"]: r["source_point"] for r in doc["replicas"]}
    assert len({r["exported_pcpi"] for r in doc["replicas"]}) == 1 and points["A"] != points["B"]
    assert sorted(doc["source_pcpis"]) == sorted(points.values())
    for name, url in (("A", src), ("B", other)):  # each source holds the PCPI its replica shows
        volume = Volume.open(plugin_manager(), url)
        try:
            assert points[name] in volume.snapshot_list()
        finally:
            volume.close()
    rc, out, err = cli("verify", "--full", "--json")
    assert rc == 0 and [r["result"] for r in json.loads(out)] == ["ok", "ok"], err
    paced = cfg.read_text().replace(f'url = "{src}"\n', f'url = "{src}"\ninterval = "1h"\n')
    cfg.write_text(paced.replace(f'url = "{other}"\n', f'url = "{other}"\ninterval = "1h"\n'))
    cycles = len(json.loads(cli("history", "--json")[1]))
    rc, out, err = cli("run", "--once")  # each source took its PCPI moments ago: none is due
    assert rc == 0 and "no cycle: no source is due yet" in out, err
    assert len(json.loads(cli("history", "--json")[1])) == cycles
    cfg.write_text(cfg.read_text().replace(f'url = "{other}"\n', f'url = "{other}"\nparallel = 1\n'))
    rc, _out, err = cli("run", "--once")  # a source's own parallel is applied, not refused
    assert rc == 0, err
