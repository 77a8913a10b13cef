"""Fan-in from three real hosts' file systems into one btrfs destination, driven by the `coalesce` CLI
as an operator drives it (docs/config.md, "Sources").

* ``lab``: a btrfs subvolume on the 256 MiB btrfs (another file system than the destination's);
* ``far``: a btrfs subvolume reached over ssh: a real sshd runs in a network namespace B behind the
  link emulator's router (tests/net/linkemu.py), its forced command ``coalesce serve --stdio``;
* ``pool``: a zfs-fuse dataset;

two qtrees each, one replica per qtree.  Every cycle changes every qtree (new files, a rename of a
file and of a directory, a new hard link, removals, an append); after it each export equals its
source's qtree in the source PCPI the replica names (tests/trees.py, privileges stripped as the
default ``privileges = "strip"`` says), every replica is at its source's newest PCPI, `coalesce
check` passes and the destination holds one PCPI (counted by `btrfs subvolume list`).  Then the
link to B goes down: the next cycle exits 10 ("partial"), ``lab``'s and ``pool``'s replicas get
their new images, ``far``'s keep theirs and `status` shows the error; with the link back up the
next cycle catches ``far`` up.  Everything started is stopped by PID, everything made is removed,
even when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trees
from net.linkemu import Link
from net.netkit import SSHD

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume

pytestmark = [pytest.mark.btrfs, pytest.mark.zfs]

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]
SSH_PORT = 2222
QTREES = {"lab": ("a1", "a2"), "far": ("b1", "b2"), "pool": ("c1", "c2")}


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COALESCE_CRASH_AT"}
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=300)


def _status(cfg: Path) -> dict[str, Any]:
    p = _cli(cfg, "status", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def _fill(root: str, q: str) -> None:
    """A qtree's first content: directories, files, a hard link."""
    d = os.path.join(root, q)
    os.makedirs(os.path.join(d, "docs", "old"))
    os.mkdir(os.path.join(d, "data"))
    for rel, text in (("docs/readme.txt", "readme"), ("docs/old/v1.txt", "v1"), ("keep.txt", "kept")):
        Path(d, rel).write_text(f"{text} of {q}\n")
    Path(d, "data", "blob.bin").write_bytes(os.urandom(96 << 10))
    os.link(os.path.join(d, "keep.txt"), os.path.join(d, "data", "keep-link"))


def _change(root: str, q: str, k: int) -> None:
    """Cycle ``k``'s change of a qtree: a new file and a new directory, renames (the last cycle's
    file and directory), a new hard link, removals (the last cycle's link; at the first, a
    directory and its file), an append."""
    d = os.path.join(root, q)
    Path(d, f"new{k}.txt").write_text(f"cycle {k} of {q}\n" * k)
    os.makedirs(os.path.join(d, f"dir{k}", "sub"))
    Path(d, f"dir{k}", "sub", "f").write_bytes(os.urandom(4096 + k))
    if k > 1:
        os.rename(os.path.join(d, f"new{k - 1}.txt"), os.path.join(d, "docs", f"moved{k - 1}.txt"))
        os.rename(os.path.join(d, f"dir{k - 1}"), os.path.join(d, "docs", f"dir{k - 1}-moved"))
        os.unlink(os.path.join(d, f"link{k - 1}"))
    else:
        os.rename(os.path.join(d, "docs", "readme.txt"), os.path.join(d, "readme.txt"))
        os.unlink(os.path.join(d, "docs", "old", "v1.txt"))
        os.rmdir(os.path.join(d, "docs", "old"))
    os.link(os.path.join(d, "keep.txt"), os.path.join(d, f"link{k}"))
    with open(os.path.join(d, "data", "blob.bin"), "ab") as f:
        f.write(os.urandom(10_000))


def _snapshots(dest_path: str) -> list[str]:
    """The destination's PCPIs, as `btrfs subvolume list -s` of its file system shows them."""
    parent, name = os.path.split(dest_path)
    out = subprocess.run(["btrfs", "subvolume", "list", "-s", parent], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if f".coalesce-snapshots/{name}/" in line]


@pytest.fixture
def hosts(realfs, btrfs_urls, btrfs_small_url, zfs_urls, tmp_path) -> Iterator[dict[str, Any]]:
    """The three source volumes (filled), B's namespace and sshd, and the group's config, initialised."""
    local = {"lab": btrfs_small_url, "far": btrfs_urls("far"), "pool": zfs_urls("pool")}
    dest = btrfs_urls("dst")
    pm = plugin_manager()
    vols: dict[str, Volume] = {}
    link: Link | None = None
    sshd: SSHD | None = None
    try:
        for name, url in local.items():
            vols[name] = Volume.open(pm, url, create=True)
            for q in QTREES[name]:
                _fill(vols[name].handle.root, q)
        link = Link(mtu=1500, log=str(tmp_path / "linkemu.log"))
        link.start()  # after the assignment: what a failing start made is removed by close()
        (tmp_path / "sshd").mkdir()
        sshd = SSHD(tmp_path / "sshd", host=link.b_ip, port=SSH_PORT, netns=link.ns_b)
        far = sshd.expose(local["far"])
        cfg = tmp_path / "coalesce.toml"
        lines = [
            f'[group]\nname = "fan"\ndestination = "{dest}"\nparallel = 4\n[group.retry]\ninitial = 0',
            f'[[source]]\nname = "lab"\nurl = "{local["lab"]}"',
            f'[[source]]\nname = "far"\nurl = "{far}"',
            f'[source.ssh]\ncommand = "{sshd.ssh}"',
            "[source.transfer]\nretries = 1\nretry_delay = 0.05\ntimeout = 10",
            f'[[source]]\nname = "pool"\nurl = "{local["pool"]}"',
        ]
        lines += [f'[[replica]]\nname = "{q}"\nfrom = "{s}"' for s, qs in QTREES.items() for q in qs]
        cfg.write_text("\n\n".join(lines) + "\n")
        p = _cli(cfg, "init")
        assert p.returncode == 0, p.stdout + p.stderr
        yield {"cfg": cfg, "vols": vols, "link": link, "dest": dest.split("://", 1)[1]}
    finally:
        if sshd is not None:
            sshd.stop()
        problems = link.close() if link is not None else []
        for v in vols.values():
            v.close()
        assert not problems, problems


def _check_cycle(h: dict[str, Any], fresh: set[str]) -> dict[str, Any]:
    """After a cycle: every export equals its source qtree in its source PCPI, the replicas of the
    sources in ``fresh`` are at their source's newest PCPI, `check` passes, and the destination holds
    one PCPI, the coalesced image every replica exports."""
    doc = _status(h["cfg"])
    newest = {s["name"]: s["last_pcpi"] for s in doc["sources"]}
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in doc["replicas"]:
        assert r["state"] == "stable", r
        by_source.setdefault(r["from"], []).append(r)
    assert {s: sorted(r["name"] for r in rs) for s, rs in by_source.items()} == {
        s: sorted(qs) for s, qs in QTREES.items()
    }
    for s, rs in by_source.items():
        for point in {r["source_point"] for r in rs}:
            with h["vols"][s].handle.image(point) as img:
                for r in (r for r in rs if r["source_point"] == point):
                    want = trees.stripped(trees.capture(os.path.join(img, r["source"])))
                    diff = trees.differences(want, trees.capture(r["export_path"]))
                    assert not diff, f"{r['name']} differs from {s}'s {point}:\n  " + "\n  ".join(diff)
        if s in fresh:
            assert {r["source_point"] for r in rs} == {newest[s]}, (s, rs)
    p = _cli(h["cfg"], "check")
    assert p.returncode == 0, p.stdout + p.stderr
    exported = {r["exported_pcpi"] for r in doc["replicas"]}
    assert [os.path.basename(s) for s in _snapshots(h["dest"])] == sorted(exported) and len(exported) == 1, (
        _snapshots(h["dest"]),
        exported,
    )
    return doc


def _cycle(h: dict[str, Any], k: int, sources: tuple[str, ...] = tuple(QTREES)) -> subprocess.CompletedProcess:
    for s in sources:
        for q in QTREES[s]:
            _change(h["vols"][s].handle.root, q, k)
    return _cli(h["cfg"], "run", "--once", "-q")


def test_three_hosts_feed_one_btrfs_destination_and_one_going_down_is_a_partial_cycle(hosts):
    h = hosts
    p = _cli(h["cfg"], "run", "--once", "-q")  # the baselines
    assert p.returncode == 0, p.stdout + p.stderr
    doc = _check_cycle(h, set(QTREES))
    for k in (1, 2):
        p = _cycle(h, k)
        assert p.returncode == 0, p.stdout + p.stderr
        doc = _check_cycle(h, set(QTREES))
    before = {r["name"]: r for r in doc["replicas"]}

    h["link"].down()  # B's host is out of reach
    p = _cycle(h, 3)
    assert p.returncode == 10, p.stdout + p.stderr
    assert "partial: the cycle completed for source(s) lab, pool; failed for far" in p.stderr, p.stderr
    doc = _check_cycle(h, {"lab", "pool"})
    for r in doc["replicas"]:
        if r["from"] == "far":
            assert r["source_point"] == before[r["name"]]["source_point"], r  # its image, not cycle 4's
            assert r["last_error"] and "source unavailable" in r["last_error"], r
            assert not os.path.exists(os.path.join(r["export_path"], "new3.txt"))
        else:
            assert r["source_point"] != before[r["name"]]["source_point"], r
            assert r["last_error"] is None, r
            assert os.path.exists(os.path.join(r["export_path"], "new3.txt"))

    h["link"].up()
    p = _cycle(h, 4)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = _check_cycle(h, set(QTREES))
    for r in doc["replicas"]:  # far caught up: the changes made while it was down and cycle 4's
        assert os.path.exists(os.path.join(r["export_path"], "docs", "moved3.txt")), r
        assert os.path.exists(os.path.join(r["export_path"], "new4.txt")), r
        assert r["last_error"] is None, r
