"""plugins/coalesce_metrics: Prometheus text format for node_exporter's textfile collector."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from backends import on_backend
from prometheus_client import parser  # noqa: E402  (pinned in the test extra)

from coalesce_core.backend.faults import Rule
from coalesce_core.config import parse_config
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
        rep = lambda name, r: m[(name, (("replica", r), ("source", "default")))]  # noqa: E731
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


@pytest.mark.parametrize("backend", [on_backend("mem"), on_backend("sim")])
def test_per_replica_metrics_carry_their_source_and_each_source_has_its_own(backend, tmp_path, metrics_module):
    """A group of three sources (docs/config.md, "Sources"): every per-replica sample names its source;
    per source its last PCPI time, whether the last cycle reached it and whether it is due: ``c`` out
    of reach, ``b`` with an interval not due again yet."""
    path = tmp_path / "textfile" / "coalesce.prom"
    obs = metrics_module.MetricsObserver(path, min_interval=0)
    if backend == "mem":
        urls = {s: f"mem://metrics-{s}-{os.getpid()}-{tmp_path.name}" for s in ("a", "b", "c", "dst")}
    else:
        urls = {s: f"sim://{tmp_path}/{s}" for s in ("a", "b", "c", "dst")}
    lines = ["[group]", 'name = "g"', f'destination = "{urls["dst"]}"', f'metadata = "{tmp_path}/meta"']
    for s in "abc":
        lines += ["[[source]]", f'name = "{s}"', f'url = "{urls[s]}"'] + (['interval = "1h"'] if s == "b" else [])
    for s in "abc":
        lines += ["[[replica]]", f'name = "{s.upper()}1"', f'from = "{s}"']
    h = Harness(parse_config("\n".join(lines) + "\n", str(tmp_path / "g.toml")), plugins=[obs])
    try:
        for s in "abc":
            fill(h.writers[s], [f"{s.upper()}1"], seed=ord(s))
        h.cycle()
        first = parse(path)
        h.clock.advance(60)
        h.faults.add(Rule(hook="coalesce_snapshot_create", volume=urls["c"], times=1, message="c is down"))
        h.cycle()
        m = parse(path)
        for s in "abc":
            labels = (("replica", f"{s.upper()}1"), ("source", s))
            assert ("coalesce_replica_lag_seconds", labels) in m and ("coalesce_replica_failing", labels) in m
        assert not any(dict(labels).get("replica") and "source" not in dict(labels) for _n, labels in m)
        src = lambda name, s: m[(name, (("source", s),))]  # noqa: E731
        assert [src("coalesce_source_reachable", s) for s in "abc"] == [1, 1, 0]
        assert [src("coalesce_source_due", s) for s in "abc"] == [1, 0, 1]
        now = src("coalesce_source_last_pcpi_timestamp_seconds", "a")
        assert now == first[("coalesce_source_last_pcpi_timestamp_seconds", (("source", "a"),))] + 60
        assert src("coalesce_source_last_pcpi_timestamp_seconds", "b") == now - 60  # not due: not taken again
        assert src("coalesce_source_last_pcpi_timestamp_seconds", "c") == now - 60  # out of reach
        assert src("coalesce_source_lag_seconds", "c") == src("coalesce_source_lag_seconds", "a") + 60
        assert m[("coalesce_replica_failing", (("replica", "C1"), ("source", "c")))] == 1
    finally:
        h.agent.close()
