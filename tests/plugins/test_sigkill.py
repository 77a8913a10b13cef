"""`coalesce run` SIGKILLed at every named crash point and at random moments, on real btrfs and zfs volumes;
at the crash points of fan-in and stragglers on sim volumes.

After each kill, whatever readers see at the stable export paths is a complete
image of the source qtree at some source PCPI (compared by READING the files
under the export paths, not by trusting the ledger); after a restart the group
recovers, every replica is stable at the newest source point and the
destination holds exactly one PCPI (counted by the file system's own tools).
zfs-fuse is slow, so a representative subset of the crash points runs on it
(all of them run in-process on zfs in tests/core/test_crash_recovery.py). The points only a cycle of
several sources or a straggler passes run on a group of two sim sources whose replica B1 is slow
(tests/slow_apply.py), in-process at length in tests/core/test_crash_recovery_fan_in.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from backends import on_backend
from groups import EXE, PosixCliGroup, run_cli, status

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import CRASH_POINTS, FAN_IN_POINTS, STRAGGLER_POINTS
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.testing.workload import SourceWriter, fill

# the points of a cycle; a baseline, a retry, a re-seed and the kept writes of a resync have their own
# scenarios (tests/core/test_crash_recovery.py, tests/plugins/sim/test_sim_power_cut.py), and so do a cycle
# of several sources and a straggler (below, on sim)
POINTS = [
    p
    for p in CRASH_POINTS
    if p not in ("mid_baseline", "mid_retry", "mid_reseed", "after_kept_pcpi", "after_kept_release")
    and p not in FAN_IN_POINTS + STRAGGLER_POINTS
]
# the diff of qtree "qb" fails once, so that the killed cycle also holds a rollback
FAULTS = "coalesce_diff:qtree=qb:record=3:times=1:volume=-src"


class Group(PosixCliGroup):
    def __init__(self, tmp_path, src_url, dst_url):
        super().__init__(tmp_path, src_url, dst_url, "rt", "parallel = 2\n", file_size=50_000)
        for q in ("A", "qb"):
            self.write(q, "small", q.encode() * 10)

    def popen_run(self):
        e = dict(os.environ)
        e.pop("COALESCE_CRASH_AT", None)
        return subprocess.Popen(
            [*EXE, "--config", str(self.cfg), "run", "--once"],
            env=e,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def prepared(self):
        self.run("init")
        self.run("run", "--once")
        old = self.source_fps()
        self.write("A", "dir/file", os.urandom(60_000))
        self.write("qb", "new", b"n" * 3000)
        os.unlink(os.path.join(self.root, "A", "small"))
        return old, self.source_fps()

    def recovered(self, old, new, count_pcpis):
        seen = self.exported_fps()
        for r in ("A", "B"):
            assert seen[r] in (old[r], new[r]), f"replica {r} exports a partial image after the kill (I3)"
        self.run("run", "--once")
        self.run("run", "--once")
        assert self.run("check").returncode == 0
        st = json.loads(self.run("status", "--json").stdout)
        assert {r["state"] for r in st["replicas"]} == {"stable"}
        assert self.exported_fps() == new
        assert count_pcpis(self.dst_url) == 1, "the destination must hold exactly one PCPI at rest (I1)"


def btrfs_pcpis(url):
    vol = Volume.open(plugin_manager(), url)
    out = subprocess.run(
        ["btrfs", "subvolume", "list", "-s", vol.handle.parent], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if f".coalesce-snapshots/{vol.handle.name}/" in line)


def zfs_pcpis(url):
    ds = url.split("://", 1)[1]
    out = subprocess.run(
        ["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", ds], capture_output=True, text=True, check=True
    ).stdout.split()
    return sum(1 for n in out if n.startswith(ds + "@"))


COUNT_PCPIS = {"btrfs": btrfs_pcpis, "zfs": zfs_pcpis}
ZFS_POINTS = ["between_jump_ahead_pcpis", "mid_apply", "mid_rollback"]


@pytest.mark.parametrize(
    ("backend", "point"), [on_backend("btrfs", p) for p in POINTS] + [on_backend("zfs", p) for p in ZFS_POINTS]
)
def test_sigkill_at_every_crash_point(tmp_path, request, backend, point):
    urls = request.getfixturevalue(f"{backend}_urls")
    g = Group(tmp_path, urls("src"), urls("dst"))
    old, new = g.prepared()
    p = g.run("run", "--once", env={"COALESCE_CRASH_AT": point, "COALESCE_FAULTS": FAULTS}, check=None)
    assert p.returncode == -signal.SIGKILL, f"{point} was not reached: rc={p.returncode}\n{p.stderr}"
    g.recovered(old, new, COUNT_PCPIS[backend])


def random_kills(tmp_path, urls, count_pcpis, seeds):
    """Kill `coalesce run --once` at random moments of a large update; at least one kill lands mid-run."""
    killed_mid_run = 0
    for seed in seeds:
        g = Group(tmp_path / f"seed{seed}", urls("src"), urls("dst"))
        old, new = g.prepared()
        os.makedirs(os.path.join(g.root, "A", "many"))
        for i in range(3000):
            g.write("A", f"many/f{i}", os.urandom(2000))
        new = g.source_fps()
        proc = g.popen_run()
        time.sleep(random.Random(seed).uniform(0.15, 0.75))
        if proc.poll() is None:
            killed_mid_run += 1
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        g.recovered(old, new, count_pcpis)
    assert killed_mid_run, "no kill landed while `coalesce run` was running; raise the update size"


@pytest.mark.parametrize(("backend", "seeds"), [on_backend("btrfs", (1, 2, 3)), on_backend("zfs", (7,))])
def test_sigkill_at_random_moments(tmp_path, request, backend, seeds):
    random_kills(tmp_path, request.getfixturevalue(f"{backend}_urls"), COUNT_PCPIS[backend], seeds=seeds)


# ------------------------------------------------------------------------- fan-in and stragglers, on sim
#: replica -> its source, in the group of two sim sources
FAN_IN = {"A1": "a", "B1": "b"}
TESTS = str(Path(__file__).resolve().parents[1])
#: B1's applies on the destination each wait 1.5 s: with straggler_after 0.3 s its update straggles
SLOW_B1 = {
    "COALESCE_PLUGINS": "slow_apply",
    "COALESCE_SLOW_APPLY": "1.5",
    "COALESCE_SLOW_APPLY_QTREE": "B1",
    "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
}


def fan_in_group(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, dict[str, str]]]:
    """Group ``fk`` of sources ``a`` (A1) and ``b`` (B1) on sim volumes, ``straggler_after`` 0.3 s, initialised
    and through its first cycle, then new content written in both qtrees. Returns the config, the source URLs and
    each replica's fingerprints {"old", "new"} (the writers' own model)."""
    urls = {s: f"sim://{tmp_path}/{s}-src" for s in FAN_IN.values()}
    cfg = tmp_path / "coalesce.toml"
    lines = [
        "[group]",
        'name = "fk"',
        f'destination = "sim://{tmp_path}/dst"',
        f'metadata = "{tmp_path}/meta"',
        "parallel = 2",
        "straggler_after = 0.3",
        "[group.retry]",
        "initial = 0",
    ]
    lines += [x for s, url in urls.items() for x in ("[[source]]", f'name = "{s}"', f'url = "{url}"')]
    lines += [x for r, s in FAN_IN.items() for x in ("[[replica]]", f'name = "{r}"', f'from = "{s}"')]
    cfg.write_text("\n".join(lines) + "\n")
    fps: dict[str, dict[str, str]] = {}
    writers = {}
    for replica, source in FAN_IN.items():
        writers[replica] = SourceWriter(Volume.open(plugin_manager(), urls[source], create=True))
        fill(writers[replica], [replica], files=3, size=2000, seed=len(replica))
        fps[replica] = {"old": writers[replica].expected_fingerprint(replica)}
    for w in writers.values():
        w.volume.close()  # the runs below change the volumes: this process must not keep a stale handle
    assert run_cli(cfg, "init").returncode == 0
    first = run_cli(cfg, "run", "--once")
    assert first.returncode == 0, first.stderr
    for replica, source in FAN_IN.items():
        w = writers[replica]
        w.volume = Volume.open(plugin_manager(), urls[source])  # a fresh handle: the runs changed the volume
        w.write(replica, "news.txt", f"the new content of {replica}".encode() * 50)
        fps[replica]["new"] = w.expected_fingerprint(replica)
        w.volume.close()
    return cfg, urls, fps


def exported(tmp_path: Path) -> dict[str, str | None]:
    """What the destination exports for each replica, read from the volume (never from the ledger)."""
    dst = Volume.open(plugin_manager(), f"sim://{tmp_path}/dst")
    try:
        return {r: dst.fingerprint(r, snap) if (snap := dst.exported().get(r)) else None for r in FAN_IN}
    finally:
        dst.close()


#: one kill at each step of the way: between two sources' takes, B1 pinned outside the cycle, its rejoin (every
#: point of the way in-process: tests/core/test_crash_recovery_fan_in.py)
@pytest.mark.parametrize(
    "point", ["between_source_pcpis", "after_straggler_individual_pcpi", "after_straggler_rejoins"]
)
def test_sigkill_at_the_crash_points_of_fan_in_and_stragglers_on_sim(tmp_path, point):
    """`coalesce run --once` SIGKILLs itself at the point (the rejoin: in the run after the one B1 straggled
    in); what the destination exports right after is a complete image of each replica, the old or the new
    one (I3); the next runs recover, bring both replicas to their new images, and leave one PCPI on the
    destination and on each source (I1, I6, I7)."""
    cfg, urls, fps = fan_in_group(tmp_path)
    if point == "after_straggler_rejoins":
        straggled = run_cli(cfg, "run", "--once", env=SLOW_B1)
        assert straggled.returncode == 3, straggled.stderr  # B1 waits outside the cycle (docs/cli.md)
        assert {r["name"]: r["state"] for r in status(cfg)["replicas"]}["B1"] == "done_uncoalesced"
    died = run_cli(cfg, "run", "--once", env={**SLOW_B1, "COALESCE_CRASH_AT": point})
    assert died.returncode == -signal.SIGKILL, f"{point} was not reached: rc={died.returncode}\n{died.stderr}"
    seen = exported(tmp_path)
    for replica, fp in seen.items():
        assert fp in (fps[replica]["old"], fps[replica]["new"]), f"{replica} exports a partial image after the kill"
    for _ in range(3):
        run_cli(cfg, "run", "--once")
        st = status(cfg)
        if {r["state"] for r in st["replicas"]} == {"stable"} and exported(tmp_path) == {
            r: fps[r]["new"] for r in FAN_IN
        }:
            break
    assert run_cli(cfg, "check").returncode == 0
    assert run_cli(cfg, "verify", "--full").returncode == 0
    st = status(cfg)
    assert {r["state"] for r in st["replicas"]} == {"stable"} and [p["role"] for p in st["pcpis"]] == ["base"]
    assert exported(tmp_path) == {r: fps[r]["new"] for r in FAN_IN}
    for source, url in urls.items():
        vol = Volume.open(plugin_manager(), url)
        try:
            held = [n for n in vol.snapshot_list() if is_group_source_pcpi("fk", n)]
        finally:
            vol.close()
        assert len(held) == 1 and held[0] in st["source_pcpis"], f"source {source} holds {held}"
