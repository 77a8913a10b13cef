"""`coalesce` on a group of two sources, as an operator meets it (docs/config.md, "Sources"): the
`run --once` exit code of a cycle that completed for one source and failed for the other (10,
docs/cli.md "Exit codes")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill
from coalesce_core.ui import cli as cli_mod


@pytest.fixture
def two(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Group ``home`` of the sources ``one`` (replica A) and ``two`` (replica B) on mem:// files, ./coalesce.toml,
    initialised; returns each source's file by name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    files = {s: tmp_path / f"{s}.vol" for s in ("one", "two")}
    lines = ['[group]\nname = "home"', f'destination = "mem://{tmp_path}/dst.vol"', "[group.retry]\ninitial = 0"]
    for s, f in files.items():
        lines += [f'[[source]]\nname = "{s}"\nurl = "mem://{f}"']
        writer = SourceWriter(Volume.open(plugin_manager(), f"mem://{f}", create=True))
        fill(writer, ["A" if s == "one" else "B"])
        writer.volume.close()
    lines += ['[[replica]]\nname = "A"\nfrom = "one"', '[[replica]]\nname = "B"\nfrom = "two"']
    (tmp_path / "coalesce.toml").write_text("\n".join(lines) + "\n")
    assert cli_mod.main(["init"]) == 0
    return files


def run_once(capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_mod.main(["run", "--once", "-q"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_run_once_exits_10_when_the_cycle_completed_for_one_source_and_the_other_was_out_of_reach(two, capsys):
    assert run_once(capsys)[0] == 0
    gone = two["two"].with_name("two.gone")
    two["two"].rename(gone)  # source two's host is down
    rc, _out, err = run_once(capsys)
    assert rc == cli_mod.EXIT_PARTIAL == 10, err
    assert "error: the source mem://" in err and "could not be reached" in err and "hint:" in err
    assert "partial: the cycle completed for source(s) one; failed for two" in err
    two["one"].rename(two["one"].with_name("one.gone"))  # now both: nothing completed, exit 4 as before
    rc, _out, err = run_once(capsys)
    assert rc == 4 and "partial" not in err
    two["one"].with_name("one.gone").rename(two["one"])
    gone.rename(two["two"])
    assert run_once(capsys)[0] == 0  # both back: a whole cycle again


def test_status_json_names_each_replicas_source_and_each_sources_pace(two, capsys, validate_json):
    """`from` per replica; `sources` in the config's order with their replicas, newest PCPI and its
    time, `interval` and when next due (docs/cli.md, "status --json"); valid against the schema."""
    cfg = Path("coalesce.toml")
    cfg.write_text(
        cfg.read_text().replace(f'url = "mem://{two["two"]}"\n', f'url = "mem://{two["two"]}"\ninterval = "1h"\n')
    )
    assert run_once(capsys)[0] == 0
    assert cli_mod.main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate_json(doc, "status")
    assert {r["name"]: r["from"] for r in doc["replicas"]} == {"A": "one", "B": "two"}
    one, two_ = doc["sources"]
    points = {r["name"]: r["source_point"] for r in doc["replicas"]}
    assert (one["name"], one["replicas"], one["last_pcpi"], one["interval"], one["next_due"]) == (
        "one",
        ["A"],
        points["A"],
        None,
        None,
    )
    assert (two_["name"], two_["replicas"], two_["last_pcpi"], two_["interval"]) == ("two", ["B"], points["B"], 3600.0)
    assert two_["last_pcpi_time"] and 3595.0 <= two_["next_due"] - two_["last_pcpi_time"] <= 3600.0


@pytest.fixture
def three(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Group ``home`` of the sources ``lab`` (replica A), ``office`` (B, an ``interval`` of 1h) and
    ``remote`` (C) on mem:// files, ./coalesce.toml, initialised, one cycle run; returns each
    source's file by name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    replica = {"lab": "A", "office": "B", "remote": "C"}
    files = {s: tmp_path / f"{s}.vol" for s in replica}
    lines = ['[group]\nname = "home"', f'destination = "mem://{tmp_path}/dst.vol"', "[group.retry]\ninitial = 0"]
    for s, f in files.items():
        lines += [f'[[source]]\nname = "{s}"\nurl = "mem://{f}"' + ('\ninterval = "1h"' if s == "office" else "")]
        writer = SourceWriter(Volume.open(plugin_manager(), f"mem://{f}", create=True))
        fill(writer, [replica[s]])
        writer.volume.close()
    lines += [f'[[replica]]\nname = "{r}"\nfrom = "{s}"' for s, r in replica.items()]
    (tmp_path / "coalesce.toml").write_text("\n".join(lines) + "\n")
    assert cli_mod.main(["init"]) == 0
    return files


def status_json(capsys) -> dict:
    capsys.readouterr()
    assert cli_mod.main(["status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_json_gives_each_sources_state_reachable_due_last_pcpi_error_and_lag(three, capsys, validate_json):
    """Three sources: ``remote`` out of reach at the second cycle, ``office`` not due (its interval):
    each source's entry says whether its last PCPI was taken, the error that stopped it, whether it
    is due, its last PCPI and the lag of its oldest image (docs/cli.md, "status --json")."""
    assert run_once(capsys)[0] == 0
    first = {s["name"]: s for s in status_json(capsys)["sources"]}
    assert [first[s]["reachable"] for s in ("lab", "office", "remote")] == [True, True, True]
    assert all(s["last_error"] is None for s in first.values())
    three["remote"].rename(three["remote"].with_name("remote.gone"))  # its host is down
    rc, _out, err = run_once(capsys)
    assert rc == cli_mod.EXIT_PARTIAL, err
    doc = status_json(capsys)
    validate_json(doc, "status")
    src = {s["name"]: s for s in doc["sources"]}
    assert [s["name"] for s in doc["sources"]] == ["lab", "office", "remote"]
    lab, office, remote = src["lab"], src["office"], src["remote"]
    assert (lab["reachable"], lab["last_error"], lab["due"], lab["replicas"]) == (True, None, True, ["A"])
    assert lab["last_pcpi"] != first["lab"]["last_pcpi"] and lab["seen_at"] > first["lab"]["seen_at"]
    # office was not asked in the second cycle: its record is the first cycle's, and it is not due
    assert (office["reachable"], office["last_error"], office["due"]) == (True, None, False)
    assert office["seen_at"] == first["office"]["seen_at"] and office["last_pcpi"] == first["office"]["last_pcpi"]
    assert office["next_due"] > time.time() + 3000
    assert remote["reachable"] is False and remote["due"] is True
    assert "remote.vol does not exist" in remote["last_error"]
    assert remote["last_pcpi"] == first["remote"]["last_pcpi"]  # its replica still shows the first cycle's image
    replicas = {r["name"]: r for r in doc["replicas"]}
    for s in src.values():
        (name,) = s["replicas"]
        assert s["lag_seconds"] == pytest.approx(replicas[name]["lag_seconds"], abs=0.5)
    assert remote["lag_seconds"] > lab["lag_seconds"]  # C's image is the older: its source missed the cycle


def test_status_text_groups_the_replicas_under_each_sources_line(three, capsys):
    assert run_once(capsys)[0] == 0
    three["remote"].rename(three["remote"].with_name("remote.gone"))
    assert run_once(capsys)[0] == cli_mod.EXIT_PARTIAL
    capsys.readouterr()
    assert cli_mod.main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("source ")]
    assert [lines[i].split(":")[0] for i in heads] == ["source lab", "source office", "source remote"]
    assert "source lab: reachable · due every cycle · last PCPI co-home-src-" in lines[heads[0]]
    assert "source office: reachable · due at " in lines[heads[1]] and "(interval 60.0 min)" in lines[heads[1]]
    remote = " ".join(lines[heads[2] :])
    assert "source remote: unreachable · due every cycle" in remote and "last error: BackendError: the volume" in remote
    # each replica's row sits under its own source's line
    for head, (start, replica) in enumerate(zip(heads, "ABC")):
        end = heads[head + 1] if head + 1 < len(heads) else len(lines)
        rows = [line for line in lines[start:end] if line.startswith("│") or line.startswith("┃")]
        assert any(f"│ {replica} " in row for row in rows), (replica, lines[start:end])
        assert not any(f"│ {other} " in row for row in rows for other in "ABC" if other != replica)


def test_status_text_of_a_group_of_one_source_has_one_table_and_its_source_line(tmp_path, monkeypatch, capsys):
    """`[group] source = URL` (the source "default"): no heading per source, one line of its state."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    writer = SourceWriter(Volume.open(plugin_manager(), f"mem://{tmp_path}/src.vol", create=True))
    fill(writer, ["A"])
    writer.volume.close()
    (tmp_path / "coalesce.toml").write_text(
        f'[group]\nname = "home"\nsource = "mem://{tmp_path}/src.vol"\ndestination = "mem://{tmp_path}/dst.vol"\n'
        '[[replica]]\nname = "A"\n'
    )
    assert cli_mod.main(["init"]) == 0
    assert run_once(capsys)[0] == 0
    capsys.readouterr()
    assert cli_mod.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count("group home — cycle 1") == 1
    (line,) = [line for line in out.splitlines() if line.startswith("source")]
    assert line.startswith("source: reachable · due every cycle · last PCPI co-home-src-")
    assert "default" not in out


def test_add_from_names_the_replicas_source(two, capsys, validate_json):
    """`coalesce add NAME --source Q --from SOURCE` (docs/cli.md): the replica's table gets its `from`,
    the ledger records that source, and the next cycle baselines it from that source's qtree."""
    assert run_once(capsys)[0] == 0
    capsys.readouterr()
    assert cli_mod.main(["add", "B2", "--source", "B", "--from", "two"]) == 0
    assert "added replica B2 (source qtree B of source two)" in capsys.readouterr().out
    assert '[[replica]]\nname = "B2"\nsource = "B"\nfrom = "two"\n' in Path("coalesce.toml").read_text()
    assert run_once(capsys)[0] == 0
    doc = status_json(capsys)
    validate_json(doc, "status")
    b2 = next(r for r in doc["replicas"] if r["name"] == "B2")
    b = next(r for r in doc["replicas"] if r["name"] == "B")
    assert (b2["from"], b2["source"], b2["state"]) == ("two", "B", "stable")
    assert b2["source_point"] == b["source_point"]  # B's qtree of source two, at two's PCPI
    assert next(s for s in doc["sources"] if s["name"] == "two")["replicas"] == ["B", "B2"]


def test_add_from_an_unknown_source_is_refused_naming_the_defined_ones(two, capsys):
    before = Path("coalesce.toml").read_text()
    capsys.readouterr()
    assert cli_mod.main(["add", "C", "--from", "three"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "has no source named 'three'" in err
    assert "hint:" in err and "the defined sources: 'one', 'two'" in err
    assert Path("coalesce.toml").read_text() == before
    assert cli_mod.main(["add", "C"]) == 2  # without --from, a group of several sources asks which one
    err = capsys.readouterr().err
    assert "has 2 sources: say which one replica 'C' comes from" in err
    assert "hint: give --from SOURCE, one of the defined sources: 'one', 'two'" in err
    assert Path("coalesce.toml").read_text() == before
    assert [r["name"] for r in status_json(capsys)["replicas"]] == ["A", "B"]


def test_run_warns_of_the_pcpis_left_on_a_source_whose_table_was_removed_and_status_lists_them(
    two, capsys, validate_json
):
    """`remove B`, then source two's [[source]] table deleted before a cycle released its PCPI: `run --once`
    exits 0 (not a refusal) and warns, naming the PCPI, with a hint; `status --json` lists the source as
    removed with its PCPI (docs/config.md, "Removing a source")."""
    assert run_once(capsys)[0] == 0
    assert cli_mod.main(["remove", "B"]) == 0
    cfg = Path("coalesce.toml")
    text = cfg.read_text()
    table = f'[[source]]\nname = "two"\nurl = "mem://{two["two"]}"\n'
    assert table in text
    cfg.write_text(text.replace(table, ""))
    rc, _out, err = run_once(capsys)
    assert rc == 0, err
    assert (
        "warning: source 'two' is no longer in the config, and the group still holds 1 PCPI(s) on it: co-home-src-"
        in err
    )
    assert "hint: put its [[source]] table back" in err
    assert cli_mod.main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate_json(doc, "status")
    removed = [s for s in doc["sources"] if s["removed"]]
    assert [(s["name"], len(s["pcpis"])) for s in removed] == [("two", 1)] and removed[0]["pcpis"][0] in err
    cfg.write_text(text)  # the table is back: the next run releases the PCPI and warns no more
    rc, _out, err = run_once(capsys)
    assert rc == 0 and "warning" not in err, err
    assert cli_mod.main(["status", "--json"]) == 0
    two_ = [s for s in json.loads(capsys.readouterr().out)["sources"] if s["name"] == "two"]
    assert [(s["removed"], s["pcpis"]) for s in two_] == [(False, [])]
