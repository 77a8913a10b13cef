"""`coalesce` on a group of two sources, as an operator meets it (docs/config.md, "Sources"): the
`run --once` exit code of a cycle that completed for one source and failed for the other (10,
docs/cli.md "Exit codes")."""

from __future__ import annotations

import json
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
