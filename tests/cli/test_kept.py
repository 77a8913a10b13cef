"""A resync keeps the broken replica's writes in a PCPI until `coalesce release` (docs/decisions.md,
"Resync fences first"; I11 of spec/invariants.md), as an operator meets it: on sim volumes and on real
btrfs volumes, with the verbs alone and beside a running `coalesce run`."""

from __future__ import annotations

from pathlib import Path

import pytest
from backends import on_backend
from groups import cli_group, run_cli, start_cli, status, wait_until

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream import records as R

DATA = b"written while A was broken\n" * 40


def _group(request, tmp_path: Path, backend: str) -> tuple[Path, str]:
    if backend == "sim":
        src, dst = f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst"
    else:
        urls = request.getfixturevalue(f"{backend}_urls")
        src, dst = urls("src"), urls("dst")
    cfg, writer = cli_group(tmp_path, "keep", src, dst)
    writer.volume.close()
    assert run_cli(cfg, "run", "--once", "-q").returncode == 0
    return cfg, dst


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs")])
def group(request, tmp_path: Path) -> tuple[Path, str]:
    """A two-replica group (A, B) after one cycle; returns its config's path and destination URL."""
    return _group(request, tmp_path, request.param)


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs"), on_backend("zfs")])
def any_group(request, tmp_path: Path) -> tuple[Path, str]:
    """As ``group``, on zfs datasets too."""
    return _group(request, tmp_path, request.param)


def _write_into_a(dst: str) -> str:
    """What a user does to broken replica A: a new file in its active FS.  Returns the active FS's
    fingerprint then (the writes a resync must keep)."""
    vol = Volume.open(plugin_manager(), dst)
    try:
        vol.apply(
            "A",
            R.framed(
                "A",
                None,
                "user",
                [R.MkFile(path="kept-file", mode=0o644), R.Write(path="kept-file", offset=0, data=DATA)],
            ),
            use_purgatory=False,
        )
        return vol.fingerprint("A", None)
    finally:
        vol.close()


def _fingerprint(dst: str, pcpi: str | None) -> str:
    vol = Volume.open(plugin_manager(), dst)
    try:
        return vol.fingerprint("A", pcpi)
    finally:
        vol.close()


def _a(cfg: Path) -> dict:
    return next(r for r in status(cfg)["replicas"] if r["name"] == "A")


def test_resync_keeps_the_writes_until_release_I11(group):
    cfg, dst = group
    good = _fingerprint(dst, _a(cfg)["exported_pcpi"])
    assert run_cli(cfg, "break", "A").returncode == 0
    writes = _write_into_a(dst)
    assert writes != good
    p = run_cli(cfg, "resync", "A")
    assert p.returncode == 0, p.stderr
    a = _a(cfg)
    kept = a["kept"]
    assert kept is not None and kept["pcpi"].startswith("co-keep-") and kept["pcpi"].endswith("-kept-A")
    assert isinstance(kept["taken_at"], float) and status(cfg)["kept"] == [kept]
    assert f"kept in PCPI {kept['pcpi']} until `coalesce release A`" in p.stdout
    assert _fingerprint(dst, kept["pcpi"]) == writes  # exactly the broken replica's writes
    assert a["state"] == "stable_uncoalesced" and _fingerprint(dst, a["exported_pcpi"]) == good
    assert _fingerprint(dst, None) == good  # the active FS is back at its last good image
    text = run_cli(cfg, "status", env={"COLUMNS": "250"}).stdout
    assert f"writes kept in {kept['pcpi']}" in text and f"kept 1 (A: {kept['pcpi']})" in text
    if dst.startswith("sim://"):  # how an operator reads them on sim (docs/operations.md)
        cat = run_cli(cfg, "sim", "cat", dst, "A/kept-file", "--pcpi", kept["pcpi"])
        assert cat.returncode == 0 and cat.stdout.encode() == DATA, cat.stderr
    # a second break: its resync would keep writes again, so it is refused until release or --discard
    assert run_cli(cfg, "break", "A").returncode == 0
    refused = run_cli(cfg, "resync", "A")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 6 and len(lines) == 2, refused.stderr
    assert lines[0].startswith("error: ") and kept["pcpi"] in lines[0]
    assert lines[1].startswith("hint: ") and "coalesce release A" in lines[1] and "--discard" in lines[1]
    assert _a(cfg)["state"] == "broken" and _a(cfg)["kept"] == kept  # refused: nothing changed
    discarded = run_cli(cfg, "resync", "A", "--discard")
    assert discarded.returncode == 0, discarded.stderr
    assert _a(cfg)["kept"] == kept  # the first writes stay kept; these were not
    released = run_cli(cfg, "release", "A")
    assert released.returncode == 0 and "released the PCPI that kept the writes of replica A" in released.stdout
    assert _a(cfg)["kept"] is None and status(cfg)["kept"] == []
    vol = Volume.open(plugin_manager(), dst)
    try:
        assert kept["pcpi"] not in vol.snapshot_list()
    finally:
        vol.close()
    again = run_cli(cfg, "release", "A")
    assert again.returncode == 6 and "keeps no writes of replica 'A'" in again.stderr and "hint:" in again.stderr
    assert run_cli(cfg, "run", "--once", "-q").returncode == 0
    assert {r["state"] for r in status(cfg)["replicas"]} == {"stable"}
    check = run_cli(cfg, "check")
    assert check.returncode == 0 and "I11" in check.stdout, check.stdout + check.stderr


def test_resync_and_release_beside_a_running_agent_I11(group):
    """Handed to a running `coalesce run` as requests: the resync keeps the writes, release deletes them.
    (The writes are made before the agent starts: a sim volume has one writer process at a time.)"""
    cfg, dst = group
    assert run_cli(cfg, "break", "A").returncode == 0
    writes = _write_into_a(dst)
    with start_cli(cfg, "run", "--interval", "3600", "--quiet") as runner:
        wait_until(runner, lambda: status(cfg)["cycle"] >= 2 and status(cfg)["phase"] == "idle", "a cycle ended")
        resync = run_cli(cfg, "resync", "A")
        assert resync.returncode == 0 and "handed to the running agent" in resync.stdout, resync.stderr
        kept = _a(cfg)["kept"]
        assert kept is not None and _fingerprint(dst, kept["pcpi"]) == writes
        release = run_cli(cfg, "release", "A")
        assert release.returncode == 0 and "handed to the running agent" in release.stdout, release.stderr
        assert _a(cfg)["kept"] is None
        again = run_cli(cfg, "release", "A")  # refused by the agent, with the verb's error and exit code
        assert again.returncode == 6 and "keeps no writes" in again.stderr
    assert run_cli(cfg, "check").returncode == 0


def test_status_names_the_path_the_kept_writes_are_readable_at_I11(any_group):
    """`status` gives a kept PCPI's path where the backend serves one (btrfs: the snapshot's qtree
    directory; OpenZFS: .zfs/snapshot), null where it has none (sim; zfs-fuse without a clone)."""
    cfg, dst = any_group
    assert run_cli(cfg, "break", "A").returncode == 0
    _write_into_a(dst)
    assert run_cli(cfg, "resync", "A").returncode == 0
    kept = _a(cfg)["kept"]
    assert kept is not None and status(cfg)["kept"] == [kept]
    vol = Volume.open(plugin_manager(), dst)
    try:
        has_path = dst.startswith("btrfs:") or (dst.startswith("zfs:") and vol.handle.browsable())
    finally:
        vol.close()
    text = run_cli(cfg, "status", env={"COLUMNS": "400"}).stdout
    path = kept["path"]
    if not has_path:
        assert path is None and "readable at" not in text
    else:
        assert isinstance(path, str) and Path(path).is_dir()
        # the kept writes, which the resync rolled out of the active FS
        assert (Path(path) / "kept-file").read_bytes() == DATA
        assert f"writes kept in {kept['pcpi']}, readable at {path}" in text
    assert run_cli(cfg, "release", "A").returncode == 0
    assert status(cfg)["kept"] == []
    if path is not None:
        assert not Path(path).exists()  # released: the PCPI and its path are gone
