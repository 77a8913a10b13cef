"""A source's error text is data (docs/network.md, "Threat model"): rich markup in it prints as it
is, ESC/OSC sequences and other control characters never reach the terminal or the log file, and
a newline in it cannot start a forged log line; `status` and `status --json` show it escaped."""

from __future__ import annotations

import json
import re

#: what a hostile source's error says (no ';', ':' or '=': COALESCE_FAULTS's separators)
HOSTILE = "boom [/] [bold]x\x1b]0\x07\x1b[31mred\rover\x9bline\n2026-01-01T00.00.00.000Z INFO home[1] forged"
SHOWN = "boom [/] [bold]x\\x1b]0\\x07\\x1b[31mred\\rover\\x9bline\\n2026-01-01T00.00.00.000Z INFO home[1] forged"


def test_status_shows_a_hostile_error_text_escaped_in_text_and_json(group, cli, monkeypatch, validate_json):
    tmp_path, writer = group
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed")
    monkeypatch.setenv("COALESCE_FAULTS", f"coalesce_diff:qtree=A:updates_only=1:message={HOSTILE}")
    log = tmp_path / "run.log"
    rc, out, err = cli("--log-file", str(log), "run", "--once")
    monkeypatch.delenv("COALESCE_FAULTS")
    assert rc != 0 and "\x1b" not in out + err and "\r" not in out + err
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ home\[\d+\] ", ln) for ln in lines)
    assert any(SHOWN in ln for ln in lines)  # the forged "line" is inside the real one, escaped

    monkeypatch.setenv("COLUMNS", "300")  # the note column whole
    rc, out, err = cli("status")
    assert rc == 0, err
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out
    assert "InjectedFault: boom [/] [bold]x\\x1b]0\\x07\\x1b[31mred\\rover" in out

    rc, out, err = cli("status", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    validate_json(doc, "status")
    (a,) = [r for r in doc["replicas"] if r["name"] == "A"]
    assert SHOWN in a["last_error"] and a["last_error"].isprintable()
