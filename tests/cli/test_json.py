"""--json on every read verb, validated against docs/schemas/*.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

from coalesce_core.crashpoints import CRASH_POINTS
from coalesce_core.spec import load_spec

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_schemas_follow_the_spec():
    spec = load_spec()
    status = json.loads((SCHEMAS / "status.schema.json").read_text())
    replica = status["properties"]["replicas"]["items"]["properties"]
    assert replica["state"]["enum"] == [s.name for s in spec.replica.states]
    assert status["properties"]["phase"]["enum"] == [s.name for s in spec.agent.states]
    roles = status["properties"]["pcpis"]["items"]["properties"]["role"]["enum"]
    assert roles == [*spec.cycle_roles, spec.individual_role]
    for f in SCHEMAS.glob("*.schema.json"):
        doc = json.loads(f.read_text())
        assert doc["$schema"].endswith("2020-12/schema") and doc["title"].startswith("coalesce "), f.name


def test_every_read_verb_json_validates(group, cli, validate_json):
    tmp, writer = group
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed" * 50)
    assert cli("run", "--once", "-q")[0] == 0

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
    assert sum(e["crosses_line_1004"] for e in g["edges"]) == 4

    rc, out, _ = cli("backends", "--json")
    infos = json.loads(out)
    validate_json(infos, "backends")
    assert "mem" in {i["scheme"] for i in infos}

    rc, out, _ = cli("debug", "crash-points", "--json")
    validate_json(json.loads(out), "crash-points")
    assert json.loads(out) == CRASH_POINTS


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
