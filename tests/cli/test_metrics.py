"""plugins/coalesce_metrics: Prometheus text format for node_exporter's textfile collector."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import parser  # noqa: E402  (pinned in the test extra)

from coalesce_core.backend.faults import Rule
from coalesce_core.cycle.spec import load_spec
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def parse(path: Path) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without group): value} for group 'g'/'home'."""
    out = {}
    for fam in parser.text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "group"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_file_follows_the_cycles(group_config, tmp_path, metrics_module):
    path = tmp_path / "textfile" / "coalesce.prom"
    obs = metrics_module.MetricsObserver(path, min_interval=0)
    h = Harness(group_config(replicas=("A", "B", "C")), plugins=[obs])
    try:
        fill(h.writer, ["A", "B", "C"], files=2, size=3000)
        h.cycle()
        m = parse(path)
        assert m[("coalesce_replicas", (("state", "stable"),))] == 3
        assert m[("coalesce_replicas", (("state", "update"),))] == 0
        assert m[("coalesce_pcpis", (("role", "base"),))] == 1
        assert (
            sum(m[("coalesce_pcpis", (("role", r),))] for r in ("rollback", "jump_ahead", "new_base", "individual"))
            == 0
        )
        assert m[("coalesce_cycles_total", ())] == 1
        assert m[("coalesce_transferred_bytes_total", ())] >= 3 * 2 * 3000
        assert m[("coalesce_transferred_records_total", ())] > 0
        assert (
            m[("coalesce_last_success_timestamp_seconds", ())] == m[("coalesce_last_cycle_timestamp_seconds", ())] > 0
        )
        assert m[("coalesce_agent_phase", (("phase", "idle"),))] == 1
        for s in load_spec().replica.states:  # every state has a sample, zero or not
            assert ("coalesce_replicas", (("state", s.name),)) in m
        first_success = m[("coalesce_last_success_timestamp_seconds", ())]

        # a failed rollback: C leaves the cycle and pins an individual PCPI
        h.writer.write("C", "dir0/file0", b"c" * 100)
        h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=2, times=1, volume="src"))
        h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=1, message="disk full"))
        h.clock.advance(60)
        h.cycle()
        m = parse(path)
        assert m[("coalesce_replicas", (("state", "unstable_uncoalesced"),))] == 1
        assert m[("coalesce_replicas", (("state", "stable"),))] == 2
        assert m[("coalesce_pcpis", (("role", "individual"),))] == 1
        assert m[("coalesce_pcpis", (("role", "base"),))] == 1
        assert m[("coalesce_failures_total", (("kind", "update_failed"),))] == 1
        assert m[("coalesce_failures_total", (("kind", "rollback_failed"),))] == 1
        assert m[("coalesce_last_cycle_failures", ())] == 1
        assert m[("coalesce_last_success_timestamp_seconds", ())] == first_success
        assert m[("coalesce_cycles_total", ())] == 2

        # retry, rejoin: back to one base
        h.clock.advance(3600)
        h.cycle()
        h.cycle()
        m = parse(path)
        assert m[("coalesce_replicas", (("state", "stable"),))] == 3
        assert m[("coalesce_pcpis", (("role", "individual"),))] == 0
        assert m[("coalesce_pcpis", (("role", "base"),))] == 1
        assert m[("coalesce_last_success_timestamp_seconds", ())] > first_success
        # types for the collector
        fams = {f.name: f.type for f in parser.text_string_to_metric_families(path.read_text())}
        assert fams["coalesce_cycles"] == "counter" and fams["coalesce_replicas"] == "gauge"
        # written atomically: no temporary file left behind, and only *.prom is for the collector
        assert sorted(p.name for p in path.parent.iterdir()) == ["coalesce.prom", "coalesce.prom.state.json"]
    finally:
        h.agent.close()


def test_per_replica_failure_and_lag_gauges(group_config, tmp_path, metrics_module):
    """A replica whose update fails shows it (failing 1, failures in a row, an older source point
    and a larger lag than the others) until a later update succeeds; a failed re-seed is counted."""
    path = tmp_path / "textfile" / "coalesce.prom"
    obs = metrics_module.MetricsObserver(path, min_interval=0)
    h = Harness(group_config(replicas=("A", "B")), plugins=[obs])
    try:
        fill(h.writer, ["A", "B"], files=2, size=300)
        h.cycle()
        for q in "AB":
            h.writer.write(q, "x", q.encode() * 100)
        h.faults.add(Rule(hook="coalesce_diff", qtree="B", volume="src", updates_only=True, times=1))
        h.clock.advance(60)
        h.cycle()
        m = parse(path)
        rep = lambda name, r: m[(name, (("replica", r),))]  # noqa: E731
        assert (rep("coalesce_replica_failing", "A"), rep("coalesce_replica_failing", "B")) == (0, 1)
        assert (
            rep("coalesce_replica_consecutive_failures", "A"),
            rep("coalesce_replica_consecutive_failures", "B"),
        ) == (0, 1)
        assert rep("coalesce_replica_lag_seconds", "B") == rep("coalesce_replica_lag_seconds", "A") + 60
        assert rep("coalesce_replica_source_point_timestamp_seconds", "B") + 60 == rep(
            "coalesce_replica_source_point_timestamp_seconds", "A"
        )
        assert (
            rep("coalesce_replica_last_success_timestamp_seconds", "A")
            > rep("coalesce_replica_last_success_timestamp_seconds", "B")
            > 0
        )
        h.clock.advance(60)
        h.cycle()
        m = parse(path)
        assert (rep("coalesce_replica_failing", "B"), rep("coalesce_replica_consecutive_failures", "B")) == (0, 0)
        assert rep("coalesce_replica_lag_seconds", "B") == rep("coalesce_replica_lag_seconds", "A")
        h.agent.reseed("A", "test")
        h.faults.add(Rule(hook="coalesce_diff", qtree="A", volume="src", times=1))
        h.cycle()
        m = parse(path)
        assert m[("coalesce_failures_total", (("kind", "reseed_failed"),))] == 1
        assert m[("coalesce_replicas", (("state", "reseed_pending"),))] == 1
        assert rep("coalesce_replica_failing", "A") == 1
    finally:
        h.agent.close()


def test_without_a_path_the_plugin_writes_nothing(group_config, tmp_path, monkeypatch, metrics_module):
    monkeypatch.delenv("COALESCE_METRICS_FILE", raising=False)
    obs = metrics_module.MetricsObserver(min_interval=0)
    h = Harness(group_config(replicas=("A",)), plugins=[obs])
    try:
        fill(h.writer, ["A"])
        h.cycle()
        assert obs.path is None and list(tmp_path.glob("**/*.prom")) == []
    finally:
        h.agent.close()


def test_cli_metrics_file_counters_survive_processes(group, tmp_path):
    """`coalesce --metrics-file` with the plugin loaded as COALESCE_PLUGINS (as the entry point will)."""
    tmp, _ = group
    prom = tmp / "node" / "coalesce.prom"
    from importlib import metadata

    env = dict(os.environ)
    env.pop("COALESCE_METRICS_FILE", None)
    if not any(ep.value == "coalesce_metrics" for ep in metadata.entry_points(group="coalesce.observers")):
        # not installed as an entry point yet: load it the other documented way
        env["COALESCE_PLUGINS"] = "coalesce_metrics"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))

    def run(*args: str) -> None:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "coalesce_core.ui.cli",
                "--config",
                str(tmp / "coalesce.toml"),
                "--metrics-file",
                str(prom),
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr

    run("init")
    run("run", "--once", "-q")
    run("run", "--once", "-q")
    m = parse(prom)
    assert m[("coalesce_cycles_total", ())] == 2  # counted across two processes
    assert m[("coalesce_replicas", (("state", "stable"),))] == 2
    assert m[("coalesce_pcpis", (("role", "base"),))] == 1
