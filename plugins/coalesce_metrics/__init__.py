"""Prometheus metrics for coalesce, written for node_exporter's textfile collector.

An observer plugin (entry-point group ``coalesce.observers``): it listens to
the agent's observer hooks and rewrites one text-format file, atomically
(write a temporary file in the same directory, fsync, rename), so the
collector never reads half a file.

Where: ``$COALESCE_METRICS_FILE`` (or ``coalesce --metrics-file PATH``, which
sets it for the process).  Unset: the plugin does nothing.  The file name
must end in ``.prom`` for the textfile collector; the plugin keeps its
running totals beside it in ``PATH.state.json`` (the collector ignores it),
so counters keep counting across ``coalesce run --once`` invocations from
cron or a systemd timer.

Metrics (every one labelled ``group``; docs/cli.md lists them):

    coalesce_replicas{state}                  gauge    replicas per state (every state of the spec)
    coalesce_pcpis{role}                      gauge    destination PCPIs per role (4 cycle roles + individual)
    coalesce_source_pcpis                     gauge    source PCPIs the group holds
    coalesce_agent_phase{phase}               gauge    1 for the agent's current phase
    coalesce_cycles_total                     counter  finished cycles
    coalesce_last_cycle_timestamp_seconds     gauge    end of the last finished cycle
    coalesce_last_success_timestamp_seconds   gauge    end of the last cycle without failures
    coalesce_cycle_duration_seconds           gauge    duration of the last cycle
    coalesce_slowest_transfer_seconds         gauge    the last cycle's slowest transfer
    coalesce_transferred_bytes_total          counter  bytes of change records applied
    coalesce_transferred_records_total        counter  change records applied
    coalesce_failures_total{kind}             counter  update_failed, baseline_failed, reseed_failed,
                                                       rollback_failed, retry_failed
    coalesce_last_cycle_failures              gauge    failures in the last cycle
    coalesce_replica_lag_seconds{replica,source}
                                              gauge    age of the replica's exported image (at the write)
    coalesce_replica_source_point_timestamp_seconds{replica,source}
                                              gauge    when its exported image's source PCPI was taken
    coalesce_replica_consecutive_failures{replica,source}
                                              gauge    its transfers that failed in a row
    coalesce_replica_last_success_timestamp_seconds{replica,source}
                                              gauge    when a transfer of it last succeeded (0: never)
    coalesce_replica_failing{replica,source}  gauge    1 while it has a last_error
    coalesce_source_last_pcpi_timestamp_seconds{source}
                                              gauge    when its newest source PCPI the group holds was taken
    coalesce_source_reachable{source}         gauge    1 when the last cycle that asked it took its PCPI
    coalesce_source_due{source}               gauge    1 when it was due at the end of the last cycle
    coalesce_source_lag_seconds{source}       gauge    age of the oldest image its replicas export

Every per-replica metric is labelled with the name of the replica's source (``source``: its
``[[replica]] from``; ``default`` for ``[group] source``).

Replica and PCPI gauges follow the agent's events; they are exact at the end
of every cycle (the cycle report carries the state counts and every
replica's health) and from then on as long as every process that drives the
group loads this plugin.  The per-replica and per-source gauges are those of the last cycle.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import pluggy

hookimpl = pluggy.HookimplMarker("coalesce")

ENV = "COALESCE_METRICS_FILE"
#: the source of a replica whose health names none (a state file written before sources were labelled)
DEFAULT_SOURCE = "default"
CYCLE_ROLES = ("base", "rollback", "jump_ahead", "new_base")
ROLES = CYCLE_ROLES + ("individual",)
FAILURE_KINDS = ("update_failed", "baseline_failed", "reseed_failed", "rollback_failed", "retry_failed")
#: Rewrite the file at most this often for state changes (cycle ends and phase changes always write).
MIN_INTERVAL = 1.0


def _spec_names() -> tuple[list[str], list[str]]:
    try:
        from coalesce_core.cycle.spec import load_spec

        spec = load_spec()
        return [s.name for s in spec.replica.states], [s.name for s in spec.agent.states]
    except Exception:  # the metrics must never take the agent down
        return [], []


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[str, int] = {}
        self.pcpis: dict[str, str] = {}  # destination PCPI name -> role
        self.source_pcpis: set[str] = set()
        self.phase = "idle"
        self.cycles = 0
        self.last_cycle = 0.0
        self.last_success = 0.0
        self.duration = 0.0
        self.slowest = 0.0
        self.bytes = 0
        self.records = 0
        self.failures: dict[str, int] = {k: 0 for k in FAILURE_KINDS}
        self.last_failures = 0
        #: replica -> its health at the end of the last cycle (the report's "replicas")
        self.replicas: dict[str, dict[str, Any]] = {}
        #: source -> its health at the end of the last cycle (the report's "sources")
        self.sources: dict[str, dict[str, Any]] = {}

    def dump(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["source_pcpis"] = sorted(self.source_pcpis)
        return d

    @classmethod
    def load(cls, d: Mapping[str, Any]) -> "_Group":
        g = cls(str(d["name"]))
        for k, v in d.items():
            if k in g.__dict__:
                setattr(g, k, v)
        g.source_pcpis = set(d.get("source_pcpis", ()))
        g.failures = {k: int(g.failures.get(k, 0)) for k in FAILURE_KINDS}
        g.replicas = dict(d.get("replicas") or {})
        g.sources = dict(d.get("sources") or {})
        return g


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsObserver:
    """The observer.  ``path`` overrides ``$COALESCE_METRICS_FILE``."""

    def __init__(self, path: str | os.PathLike[str] | None = None, min_interval: float = MIN_INTERVAL) -> None:
        self._path = Path(path) if path else None
        self.min_interval = min_interval
        self.groups: dict[str, _Group] = {}
        self._loaded_from: Path | None = None
        self._lock = threading.RLock()
        self._last_write = 0.0
        self._dirty = False
        self._warned = False
        atexit.register(self.flush)

    # -- where ------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        if self._path is not None:
            return self._path
        env = os.environ.get(ENV)
        return Path(env) if env else None

    def _group(self, name: str) -> _Group:
        path = self.path
        if path is not None and self._loaded_from != path:
            self._loaded_from = path
            self._load(path)
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = _Group(name)
        return g

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(Path(str(path) + ".state.json").read_text(encoding="utf-8"))
            for d in data.get("groups", []):
                self.groups.setdefault(d["name"], _Group.load(d))
        except (OSError, ValueError, KeyError, TypeError):
            pass

    # -- rendering ----------------------------------------------------------------
    def render(self) -> str:
        """The whole file, in Prometheus text exposition format 0.0.4."""
        states, phases = _spec_names()
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {_num(value)}")

        gs = [self.groups[k] for k in sorted(self.groups)]
        family(
            "coalesce_replicas",
            "gauge",
            "Replicas per state of spec/coalescing.toml.",
            [({"group": g.name, "state": s}, g.counts.get(s, 0)) for g in gs for s in (states or sorted(g.counts))],
        )
        family(
            "coalesce_pcpis",
            "gauge",
            "Destination PCPIs the group holds, per role (cycle roles are at most 4).",
            [({"group": g.name, "role": r}, sum(1 for v in g.pcpis.values() if v == r)) for g in gs for r in ROLES],
        )
        family(
            "coalesce_source_pcpis",
            "gauge",
            "Source PCPIs the group holds.",
            [({"group": g.name}, len(g.source_pcpis)) for g in gs],
        )
        family(
            "coalesce_agent_phase",
            "gauge",
            "1 for the management agent's current phase.",
            [({"group": g.name, "phase": p}, 1 if g.phase == p else 0) for g in gs for p in (phases or [g.phase])],
        )
        family(
            "coalesce_cycles_total",
            "counter",
            "Finished coalescing cycles.",
            [({"group": g.name}, g.cycles) for g in gs],
        )
        family(
            "coalesce_last_cycle_timestamp_seconds",
            "gauge",
            "Unix time the last cycle ended.",
            [({"group": g.name}, g.last_cycle) for g in gs],
        )
        family(
            "coalesce_last_success_timestamp_seconds",
            "gauge",
            "Unix time the last cycle without a failed transfer or rollback ended.",
            [({"group": g.name}, g.last_success) for g in gs],
        )
        family(
            "coalesce_cycle_duration_seconds",
            "gauge",
            "Duration of the last cycle.",
            [({"group": g.name}, g.duration) for g in gs],
        )
        family(
            "coalesce_slowest_transfer_seconds",
            "gauge",
            "The last cycle's slowest transfer.",
            [({"group": g.name}, g.slowest) for g in gs],
        )
        family(
            "coalesce_transferred_bytes_total",
            "counter",
            "Bytes of change records applied.",
            [({"group": g.name}, g.bytes) for g in gs],
        )
        family(
            "coalesce_transferred_records_total",
            "counter",
            "Change records applied.",
            [({"group": g.name}, g.records) for g in gs],
        )
        family(
            "coalesce_failures_total",
            "counter",
            "Failed transfers, rollbacks and retries, by kind.",
            [({"group": g.name, "kind": k}, g.failures.get(k, 0)) for g in gs for k in FAILURE_KINDS],
        )
        family(
            "coalesce_last_cycle_failures",
            "gauge",
            "Failures in the last cycle.",
            [({"group": g.name}, g.last_failures) for g in gs],
        )

        def replica_labels(g: _Group, r: str, h: Mapping[str, Any]) -> dict[str, str]:
            return {"group": g.name, "replica": r, "source": str(h.get("source") or DEFAULT_SOURCE)}

        def per_replica(key: str, conv=float) -> list[tuple[dict[str, str], float]]:
            return [
                (replica_labels(g, r, h), conv(h[key]))
                for g in gs
                for r, h in sorted(g.replicas.items())
                if h.get(key) is not None
            ]

        def per_source(key: str, conv=float) -> list[tuple[dict[str, str], float]]:
            return [
                ({"group": g.name, "source": name}, conv(h[key]))
                for g in gs
                for name, h in sorted(g.sources.items())
                if h.get(key) is not None
            ]

        family(
            "coalesce_replica_lag_seconds",
            "gauge",
            "Age of the replica's exported image (now minus when its source PCPI was taken) at the last cycle.",
            per_replica("lag_seconds"),
        )
        family(
            "coalesce_replica_source_point_timestamp_seconds",
            "gauge",
            "Unix time the source PCPI of the replica's exported image was taken.",
            per_replica("source_point_time"),
        )
        family(
            "coalesce_replica_consecutive_failures",
            "gauge",
            "Transfers of the replica (updates, baselines, re-seeds) that failed in a row.",
            per_replica("consecutive_failures", int),
        )
        family(
            "coalesce_replica_last_success_timestamp_seconds",
            "gauge",
            "Unix time a transfer of the replica last succeeded (0: never).",
            per_replica("last_success"),
        )
        family(
            "coalesce_replica_failing",
            "gauge",
            "1 while the replica has a last error (until a transfer succeeds).",
            [
                (replica_labels(g, r, h), 1 if h.get("last_error") else 0)
                for g in gs
                for r, h in sorted(g.replicas.items())
            ],
        )
        family(
            "coalesce_source_last_pcpi_timestamp_seconds",
            "gauge",
            "Unix time the source's newest PCPI the group holds was taken.",
            per_source("last_pcpi_time"),
        )
        family(
            "coalesce_source_reachable",
            "gauge",
            "1 when the last cycle that asked the source for its PCPI got one, 0 when it was out of reach or refused.",
            per_source("reachable", int),
        )
        family(
            "coalesce_source_due",
            "gauge",
            "1 when the source was due (its interval had passed) at the end of the last cycle.",
            per_source("due", int),
        )
        family(
            "coalesce_source_lag_seconds",
            "gauge",
            "Age of the oldest image the source's replicas export, at the last cycle.",
            per_source("lag_seconds"),
        )
        return "\n".join(out) + "\n"

    # -- writing --------------------------------------------------------------------
    def _changed(self, force: bool = False) -> None:
        self._dirty = True
        if force or time.monotonic() - self._last_write >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        """Write the file now if anything changed (atomic replace)."""
        with self._lock:
            path = self.path
            if path is None or not self._dirty or not self.groups:
                return
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(
                    Path(str(path) + ".state.json"),
                    json.dumps({"groups": [g.dump() for g in self.groups.values()]}, sort_keys=True),
                )
                _atomic_write(path, self.render())
                self._dirty = False
                self._last_write = time.monotonic()
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    sys.stderr.write(
                        f"warning: coalesce_metrics cannot write {path}: {exc}\n"
                        f"hint: make its directory writable or change ${ENV}\n"
                    )

    # -- observer hooks ---------------------------------------------------------------
    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        with self._lock:
            g = self._group(group)
            if g.counts.get(source, 0) > 0:
                g.counts[source] -= 1
            g.counts[dest] = g.counts.get(dest, 0) + 1
            if trigger in g.failures:
                g.failures[trigger] += 1
            self._changed()

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        with self._lock:
            g = self._group(group)
            g.phase = dest
            if source == "jump_ahead_2":  # the export switch happened: the new base is the base
                for name, role in list(g.pcpis.items()):
                    if role == "base":
                        g.pcpis[name] = "individual"  # still held: pinned (or released in a moment)
                for name, role in list(g.pcpis.items()):
                    if role == "new_base":
                        g.pcpis[name] = "base"
            if dest == "idle":  # what the cycle did not release is pinned by replicas outside it
                for name, role in list(g.pcpis.items()):
                    if role in ("rollback", "jump_ahead", "new_base"):
                        g.pcpis[name] = "individual"
            self._changed(force=True)

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        with self._lock:
            g = self._group(group)
            if role == "source":
                g.source_pcpis.add(name)
            else:
                g.pcpis[name] = role
            self._changed()

    @hookimpl
    def coalesce_pcpi_released(self, group: str, volume: str, name: str) -> None:
        with self._lock:
            g = self._group(group)
            g.pcpis.pop(name, None)
            g.source_pcpis.discard(name)
            self._changed()

    @hookimpl
    def coalesce_cycle_finished(self, group: str, report: Mapping[str, Any]) -> None:
        with self._lock:
            g = self._group(group)
            g.cycles += 1
            ended = float(report.get("ended") or time.time())
            g.last_cycle = ended
            g.duration = float(report.get("seconds") or 0.0)
            g.slowest = float(report.get("slowest_seconds") or 0.0)
            g.bytes += int(report.get("bytes") or 0)
            g.records += int(report.get("records") or 0)
            g.last_failures = int(report.get("failures") or 0)
            if not g.last_failures:
                g.last_success = ended
            states = report.get("states")
            if isinstance(states, Mapping):
                g.counts = {str(k): int(v) for k, v in states.items()}
            replicas = report.get("replicas")
            if isinstance(replicas, Mapping):
                g.replicas = {str(k): dict(v) for k, v in replicas.items() if isinstance(v, Mapping)}
            sources = report.get("sources")
            if isinstance(sources, list):
                g.sources = {str(v["name"]): dict(v) for v in sources if isinstance(v, Mapping) and v.get("name")}
            g.phase = "idle"
            self._changed(force=True)


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- module-level plugin: what the entry point and COALESCE_PLUGINS register ------------------
_observer = MetricsObserver()


@hookimpl
def coalesce_state_changed(group: str, replica: str, trigger: str, source: str, dest: str) -> None:
    _observer.coalesce_state_changed(group=group, replica=replica, trigger=trigger, source=source, dest=dest)


@hookimpl
def coalesce_phase_changed(group: str, trigger: str, source: str, dest: str) -> None:
    _observer.coalesce_phase_changed(group=group, trigger=trigger, source=source, dest=dest)


@hookimpl
def coalesce_pcpi_taken(group: str, volume: str, name: str, role: str) -> None:
    _observer.coalesce_pcpi_taken(group=group, volume=volume, name=name, role=role)


@hookimpl
def coalesce_pcpi_released(group: str, volume: str, name: str) -> None:
    _observer.coalesce_pcpi_released(group=group, volume=volume, name=name)


@hookimpl
def coalesce_cycle_finished(group: str, report: Mapping[str, Any]) -> None:
    _observer.coalesce_cycle_finished(group=group, report=report)
