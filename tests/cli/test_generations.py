"""`coalesce generations [--json] [--plan]`: the retained coalesced generations and what each holds."""

from __future__ import annotations

import json

from coalesce_core.ui import cli as cli_mod


def _retaining(group, cli, keep: str = 'keep_min = "30d"\nmax = 20') -> None:
    tmp, writer = group
    cfg = tmp / "coalesce.toml"
    cfg.write_text(cfg.read_text() + f"\n[retention]\n{keep}\n")
    rc, _, err = cli("init")
    assert rc == 0, err
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed" * 50)
    assert cli("run", "--once", "-q")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0


def test_generations_json_lists_each_with_its_manifest(group, cli, validate_json):
    _retaining(group, cli)
    rc, out, _ = cli("generations", "--json")
    assert rc == 0
    doc = json.loads(out)
    validate_json(doc, "generations")
    assert doc["policy"]["retains"] and doc["policy"]["keep_min"] == 30 * 86400
    gens = doc["generations"]
    assert [g["cycle"] for g in gens] == [1, 2]  # the bases of cycles 1 and 2; cycle 3's is the base
    assert gens[0]["counts"] == {"updated": 2, "unchanged": 0, "stale": 0, "outside": 0}
    assert gens[1]["counts"] == {"updated": 1, "unchanged": 1, "stale": 0, "outside": 0}
    a = next(e for e in gens[1]["replicas"] if e["replica"] == "A")
    assert a["status"] == "updated" and a["source_point"] and a["source_time"] > 0
    assert a["origin"] == "default"  # the source of `[group] source`, named beside its source PCPI
    assert all("plan" not in g for g in gens)
    assert gens[0]["id"] < gens[1]["id"] and gens[0]["pcpi"].endswith("-new_base")
    assert all(e["export_path"] is None for g in gens for e in g["replicas"])  # mem has no path (btrfs: tests/core)


def test_generations_json_shows_a_straggler_outside_then_updated_when_it_rejoins(
    group, cli, validate_json, monkeypatch
):
    """B's update straggles past `straggler_after` (its destination applies wait, tests/slow_apply.py):
    the generation of that jump-ahead lists B `outside` with no source PCPI (its image there is its
    update under way); the next one, where B rejoined, lists it `updated` at the source PCPI its
    transfer brought, the one A was updated to a cycle before."""
    tmp, writer = group
    cfg = tmp / "coalesce.toml"
    text = cfg.read_text().replace("parallel = 2\n", "parallel = 2\nstraggler_after = 1.0\n")
    cfg.write_text(text + '\n[retention]\nkeep_min = "30d"\nmax = 20\n')
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed" * 50)
    writer.write("qb", "dir0/file0", b"changed" * 50)
    monkeypatch.setenv("COALESCE_PLUGINS", "slow_apply")
    monkeypatch.setenv("COALESCE_SLOW_APPLY", "3")
    monkeypatch.setenv("COALESCE_SLOW_APPLY_QTREE", "B")
    assert cli("run", "--once", "-q")[0] == 3  # B finished outside the cycle: it rejoins at the next one
    monkeypatch.delenv("COALESCE_PLUGINS")
    assert cli("run", "--once", "-q")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    rc, out, _ = cli("generations", "--json")
    doc = json.loads(out)
    validate_json(doc, "generations")
    left, rejoined = ({e["replica"]: e for e in g["replicas"]} for g in doc["generations"][1:3])
    assert [g["cycle"] for g in doc["generations"]] == [1, 2, 3]
    assert (left["A"]["status"], left["B"]["status"], left["B"]["source_point"]) == ("updated", "outside", None)
    assert doc["generations"][1]["counts"] == {"updated": 1, "unchanged": 0, "stale": 0, "outside": 1}
    assert rejoined["B"]["status"] == "updated" and rejoined["B"]["source_point"] == left["A"]["source_point"]
    assert rejoined["A"]["status"] == "unchanged" and rejoined["A"]["source_point"] != left["A"]["source_point"]
    # the image of B there is its update under way: ls and restore refuse it, A's is fine
    gen = doc["generations"][1]["id"]
    rc, _out, err = cli("ls", f"B@{gen}")
    assert rc != 0 and "holds no source point of replica 'B'" in err and "hint:" in err
    rc, _out, err = cli("restore", f"B@{gen}", "--to", str(tmp / "out"))
    assert rc != 0 and "holds no source point" in err and not (tmp / "out").exists()
    assert cli("ls", f"A@{gen}")[0] == 0


def test_status_json_lists_each_replicas_generations_with_their_paths(group, cli, validate_json):
    _retaining(group, cli)
    gens = json.loads(cli("generations", "--json")[1])["generations"]
    rc, out, _ = cli("status", "--json")
    doc = json.loads(out)
    validate_json(doc, "status")
    assert rc == 0
    for r in doc["replicas"]:
        assert [(g["pcpi"], g["time"]) for g in r["generations"]] == [(g["pcpi"], g["time"]) for g in gens]
        assert all(g["export_path"] is None for g in r["generations"])


def test_generations_plan_says_what_is_kept_and_why(group, cli, validate_json):
    _retaining(group, cli)
    rc, out, _ = cli("generations", "--json", "--plan")
    doc = json.loads(out)
    validate_json(doc, "generations")
    assert rc == 0 and all(g["plan"]["keep"] for g in doc["generations"])
    assert all(any("younger than keep_min 30d" in r for r in g["plan"]["reasons"]) for g in doc["generations"])
    rc, out, _ = cli("generations", "--plan")
    words = " ".join(out.split())  # the table wraps its cells to the terminal's width
    assert rc == 0 and "prune" not in words and "keep" in words and "younger" in words and "updated" in words


def test_the_fresh_count_of_a_plan_is_the_updated_and_unchanged_generations_shows(group, cli):
    """Under prefer_complete the plan keeps the most complete generation of a period and names its
    count of fresh replicas: the sum of the `updated` and `unchanged` counts the same document shows
    for it (cycle 1: both baselines; cycle 2: A updated, B unchanged)."""
    _retaining(group, cli, keep='keep = "24h 2d"\nprefer_complete = true')
    doc = json.loads(cli("generations", "--json", "--plan")[1])
    named = 0
    for g in doc["generations"]:
        fresh = g["counts"]["updated"] + g["counts"]["unchanged"]
        for reason in g["plan"]["reasons"]:
            if reason.startswith("most complete"):
                assert reason.startswith(f"most complete ({fresh} fresh)"), (reason, g["counts"])
                named += 1
    assert named >= 2 and [g["counts"]["updated"] for g in doc["generations"]] == [2, 1]


def test_generations_plain_without_retention_says_how_to_get_some(cycled, cli):
    rc, out, _ = cli("generations")
    assert rc == 0
    assert "keeps no generations yet" in out and "[retention]" in out


def test_generations_names_the_verb_in_help():
    assert "generations" in cli_mod.build_parser().format_help()
