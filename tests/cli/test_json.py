"""--json on every read verb, validated against docs/schemas/*.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

from coalesce_core.crashpoints import CRASH_POINTS
from coalesce_core.cycle.spec import load_spec

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_schemas_follow_the_spec():
    spec = load_spec()
    status = json.loads((SCHEMAS / "status.schema.json").read_text())
    replica = status["properties"]["replicas"]["items"]["properties"]
    assert replica["state"]["enum"] == [s.name for s in spec.replica.states]
    assert status["properties"]["phase"]["enum"] == [s.name for s in spec.agent.states]
    roles = status["properties"]["pcpis"]["items"]["properties"]["role"]["enum"]
    assert roles == [*spec.cycle_roles, spec.individual_role, spec.kept_role, spec.generation_role]
    for f in SCHEMAS.glob("*.schema.json"):
        doc = json.loads(f.read_text())
        assert doc["$schema"].endswith("2020-12/schema") and doc["title"].startswith("coalesce "), f.name


def test_every_read_verb_json_validates(cycled, cli, validate_json):
    tmp, writer = cycled

    rc, out, _ = cli("status", "--json")
    doc = json.loads(out)
    validate_json(doc, "status")
    assert {r["state"] for r in doc["replicas"]} == {"stable"}

    rc, out, _ = cli("check", "--json")
    assert rc == 0
    validate_json(json.loads(out), "check")

    rc, out, _ = cli("history", "--json")
    hist = json.loads(out)
    validate_json(hist, "history")
    assert [c["cycle"] for c in hist] == [1, 2]
    rc, out, _ = cli("history", "--json", "--last", "1")
    assert [c["cycle"] for c in json.loads(out)] == [2]

    rc, out, _ = cli("graph", "--json")
    g = json.loads(out)
    validate_json(g, "graph")
    assert g["counts"] == {"stable": 2}
    # rollback_failed, baseline_succeeded, break_mirror and jump_ahead from stable_uncoalesced;
    # request_reseed from stable and from done, jump_ahead from reseeded; jump_ahead_refused
    # and jump_ahead from done_uncoalesced; remove from stable; straggle
    assert sum(e["crosses_line_1004"] for e in g["edges"]) == 11

    rc, out, _ = cli("backends", "--json")
    infos = json.loads(out)
    validate_json(infos, "backends")
    assert "mem" in {i["scheme"] for i in infos}

    rc, out, _ = cli("debug", "crash-points", "--json")
    validate_json(json.loads(out), "crash-points")
    assert json.loads(out) == CRASH_POINTS


def test_failures_lag_and_reseed_in_status_check_and_history_json(group, cli, validate_json, monkeypatch):
    """A failed update shows in status (last_error, consecutive_failures; kept through the
    rollback and the jump-ahead), in history (failed) and in `run --once`'s exit code 8; `check`
    reports the lag (informative without max_lag, a violation past it); `reseed` shows why."""
    tmp, writer = group
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("qb", "x", b"x" * 100)
    monkeypatch.setenv("COALESCE_FAULTS", "coalesce_diff:qtree=qb:volume=src:updates_only=1")
    rc, _out, err = cli("run", "--once", "-q")
    monkeypatch.delenv("COALESCE_FAULTS")
    assert rc == 8
    doc = json.loads(cli("status", "--json")[1])
    validate_json(doc, "status")
    b = next(r for r in doc["replicas"] if r["name"] == "B")
    assert b["state"] == "stable" and b["consecutive_failures"] == 1
    assert b["last_error"].startswith("update failed: InjectedFault") and b["lag_seconds"] >= 0
    hist = json.loads(cli("history", "--json")[1])
    validate_json(hist, "history")
    assert list(hist[-1]["failed"]) == ["B"] and hist[-1]["max_lag_seconds"] >= 0
    rc, out, _ = cli("check", "--json")
    findings = json.loads(out)
    validate_json(findings, "check")
    lag = next(f for f in findings if f["invariant"] == "lag")
    assert rc == 0 and lag["ok"] and "A: " in lag["detail"] and "B: " in lag["detail"]
    cfg = tmp / "coalesce.toml"
    cfg.write_text(cfg.read_text().replace("parallel = 2", 'parallel = 2\nmax_lag = "0.2s"'))
    import time

    time.sleep(0.3)  # every image is now older than max_lag
    rc, out, _ = cli("check", "--json")
    lag = next(f for f in json.loads(out) if f["invariant"] == "lag")
    assert rc == 1 and not lag["ok"] and "older than max_lag 0.2s" in lag["detail"]
    assert cli("reseed", "B", "--reason", "base lost")[0] == 0
    b = next(r for r in json.loads(cli("status", "--json")[1])["replicas"] if r["name"] == "B")
    assert (b["state"], b["reseed_reason"]) == ("reseed_pending", "base lost")


def test_status_watch_json_prints_one_document_per_refresh(group, cli, validate_json):
    assert cli("init")[0] == 0
    rc, out, _ = cli("status", "--watch", "--json", "--interval", "0.05", "--count", "3")
    assert rc == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 3
    for d in docs:
        validate_json(d, "status")
        assert {r["state"] for r in d["replicas"]} == {"uninitialized"}


def test_status_watch_plain_when_piped(group, cli):
    assert cli("init")[0] == 0
    rc, out, _ = cli("status", "--watch", "--interval", "0.05", "--count", "2")
    assert rc == 0
    assert out.count("group home — cycle 0, phase idle") == 2
    assert "\x1b[" not in out


def test_graph_json_without_a_group_has_null_counts(tmp_path, monkeypatch, cli, validate_json):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COALESCE_CONFIG", raising=False)
    rc, out, _ = cli("graph", "--json")
    doc = json.loads(out)
    validate_json(doc, "graph")
    assert doc["counts"] is None


def test_json_examples_in_docs_validate(validate_json):
    """The examples in docs/cli.md are real documents of their schema."""
    import re

    text = (SCHEMAS.parent / "cli.md").read_text()
    for heading, name in (("## `status --json`", "status"), ("### `history --json`", "history")):
        block = re.search(re.escape(heading) + r"\n+```json\n(.*?)```", text, re.S)
        assert block, heading
        validate_json(json.loads(block.group(1)), name)
