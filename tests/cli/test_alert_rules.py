"""contrib/prometheus/coalesce-alerts.rules.yml (docs/operations.md, "Alerts") names metrics, labels and
states that a real `coalesce --metrics-file` run writes: a renamed metric or state breaks this test,
not the alerts of a site in silence."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from prometheus_client import parser  # pinned in the test extra

from coalesce_core.cycle.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "coalesce-alerts.rules.yml"
PLUGINS = ROOT / "plugins"


def expressions() -> list[str]:
    exprs = re.findall(r"^\s+expr: (.+)$", RULES.read_text(encoding="utf-8"), re.M)
    assert len(exprs) >= 5
    return exprs


def written(group_dir: Path) -> dict[str, set[str]]:
    """{metric name: label names} of the file two `run --once` (one with a failed update) wrote."""
    prom = group_dir / "node" / "coalesce.prom"
    env = {k: v for k, v in os.environ.items() if k != "COALESCE_METRICS_FILE"}
    if not any(ep.value == "coalesce_metrics" for ep in metadata.entry_points(group="coalesce.observers")):
        env["COALESCE_PLUGINS"] = "coalesce_metrics"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    cli = [sys.executable, "-m", "coalesce_core.ui.cli", "--config", str(group_dir / "coalesce.toml")]
    for args, extra, rc in (
        (["init"], {}, 0),
        (["run", "--once", "-q"], {}, 0),
        (["run", "--once", "-q"], {"COALESCE_FAULTS": "coalesce_apply:qtree=A"}, 8),
    ):
        p = subprocess.run(
            [*cli, "--metrics-file", str(prom), *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=120,
        )
        assert p.returncode == rc, p.stderr
    out: dict[str, set[str]] = {}
    for fam in parser.text_string_to_metric_families(prom.read_text()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_every_metric_label_and_state_of_the_alert_rules_is_written(group):
    tmp, writer = group
    writer.write("A", "changed", b"x")  # the second run has an update of A to fail
    metrics = written(tmp)
    states = {s.name for s in load_spec().replica.states}
    for expr in expressions():
        names = re.findall(r"\b(coalesce_[a-z_]+)\b", expr)
        assert names, expr
        for name in names:
            assert name in metrics, f"{name} (in {expr!r}) is not written"
            assert "group" in metrics[name]
        for label, values in re.findall(r'(\w+)=~"([^"]+)"', expr):
            assert all(label in metrics[n] for n in names), expr
            if label == "state":
                assert set(values.split("|")) <= states, expr
    text = RULES.read_text(encoding="utf-8")
    for label in re.findall(r"\$labels\.(\w+)", text):
        assert any(label in labels for labels in metrics.values()), label
