"""Every named scenario of tests/send_scenarios.py through coalesce on zfs-fuse (I3, I9).

As tests/plugins/btrfs/test_send_scenarios.py, with ``zfs send -i OLD NEW |
zfs receive`` of the same two source PCPIs as the native control, except that
all scenarios share one group, each in its own qtrees (a group costs about
8 s on zfs-fuse: one per scenario would take minutes).  A scenario
that needs what zfs-fuse cannot do (its ``needs``, e.g. reflinks) is not
applicable here; :func:`test_zfs_fuse_cannot_do_what_is_left_out` shows it
really cannot, so the list fails when zfs-fuse learns one of them.
"""

from __future__ import annotations

import errno
import os
import subprocess

import attrs
import pytest
import send_scenarios as sc_mod
from groups import group_toml
from send_scenarios import SCENARIOS, KeepSourcePcpis, Outcome, drive
from trees import assert_same

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.config import parse_config
from coalesce_core.testing.harness import Harness

pytestmark = pytest.mark.zfs

CANNOT = frozenset({"reflink", "prealloc", "punch_hole", "large_xattr"})  # what zfs-fuse lacks
APPLICABLE = {name: sc for name, sc in SCENARIOS.items() if not sc.needs & CANNOT}
TAGGED = {f"s{i:02d}-": sc for i, sc in enumerate(APPLICABLE.values())}


def native_control(src, old: str, new: str, dataset: str) -> str:
    """``zfs send OLD | zfs receive``, then ``zfs send -i OLD NEW | zfs receive -F`` into ``dataset``;
    its mountpoint (the received NEW)."""
    for send_argv, recv_argv in (
        (["zfs", "send", f"{src.dataset}@{old}"], ["zfs", "receive", dataset]),
        (["zfs", "send", "-i", f"{src.dataset}@{old}", f"{src.dataset}@{new}"], ["zfs", "receive", "-F", dataset]),
    ):
        send = subprocess.Popen(send_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert send.stdout is not None and send.stderr is not None  # both PIPE
        recv = subprocess.run(recv_argv, stdin=send.stdout, capture_output=True)
        send.stdout.close()
        err = send.stderr.read()
        assert send.wait() == 0, f"{send_argv}: {err.decode(errors='replace')}"
        assert recv.returncode == 0, f"{recv_argv}: {recv.stderr.decode(errors='replace')}"
    get = subprocess.run(
        ["zfs", "get", "-H", "-o", "value", "mounted,mountpoint", dataset], capture_output=True, text=True, check=True
    ).stdout.split()
    if get[0] != "yes":
        subprocess.run(["zfs", "mount", dataset], check=True, capture_output=True)
    return get[1]


@attrs.frozen
class Run:
    harness: Harness
    outcome: Outcome
    image: str  # the source volume at the new source PCPI
    received: str  # the native control's copy of it


@pytest.fixture(scope="module")
def run(zfs_urls_module, tmp_path_factory):
    """Every applicable scenario in one group (its qtrees tagged ``sNN-``): a group costs ~8 s on zfs-fuse."""
    meta = tmp_path_factory.mktemp("send-scenarios")
    replicas = [r for tag, sc in TAGGED.items() for r in sc.replicas(tag)]
    text = group_toml(zfs_urls_module("src"), zfs_urls_module("dst"), f"{meta}/meta", replicas)
    keep = KeepSourcePcpis()
    h = Harness(parse_config(text, str(meta / "group.toml")), plugins=[keep])
    keep.source = src = h.agent.source.handle
    out = drive(h, TAGGED)
    received = native_control(src, out.old, out.new, zfs_urls_module("ctl").split("://", 1)[1])
    with src.image(out.new) as image:
        yield Run(h, out, image, received)
    h.agent.ledger.close()


@pytest.mark.parametrize("tag", list(TAGGED), ids=[sc.name for sc in TAGGED.values()])
def test_scenario(run, tag):
    sc = TAGGED[tag]
    assert run.outcome.baseline["failures"] == 0, run.outcome.baseline
    replicas = [run.harness.agent.state.replicas[r] for r in sc.replicas(tag)]
    errors = [r.last_error for r in replicas if r.last_error]
    assert not errors, errors
    for r in replicas:
        assert (r.state, r.source_point) == ("stable", run.outcome.new), r
    for q in sc.replicas(tag):
        want = os.path.join(run.image, q)
        assert_same(want, os.path.join(run.received, q), what=f"native control, qtree {q}")
        assert_same(want, run.harness.agent.export_path(q), what=f"replica {q}")


def _fails(probe) -> bool:
    """True when ``probe`` raises 'not supported' or returns False (the file system cannot do it)."""
    try:
        return probe() is False
    except OSError as exc:
        return exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL)


def test_zfs_fuse_cannot_do_what_is_left_out(zfs_url):
    """Each need in CANNOT fails on zfs-fuse; the scenarios that have it are left out, all others run."""
    assert {n for sc in SCENARIOS.values() for n in sc.needs} == CANNOT
    assert len(APPLICABLE) < len(SCENARIOS)
    vol = Volume.open(plugin_manager(), zfs_url, create=True)
    a, b = f"{vol.handle.root}/probe/a", f"{vol.handle.root}/probe/b"
    sc_mod.put(a, b"x" * 8192)
    sc_mod.put(b, b"")

    def long_xattr():  # zfs-fuse keeps a longer value as 8 other bytes, silently
        os.setxattr(a, "user.long", b"v" * 129)
        return os.getxattr(a, "user.long") == b"v" * 129

    probes = {
        "reflink": lambda: sc_mod.clone_file(a, b),
        "prealloc": lambda: sc_mod.fallocate(a, sc_mod.KEEP_SIZE, 0, 1 << 20),
        "punch_hole": lambda: sc_mod.fallocate(a, sc_mod.KEEP_SIZE | sc_mod.PUNCH_HOLE, 0, 4096),
        "large_xattr": long_xattr,
    }
    assert set(probes) == CANNOT
    os.setxattr(a, "user.short", b"v" * 128)
    assert os.getxattr(a, "user.short") == b"v" * 128, "xattrs of 128 bytes work"
    assert {need for need, probe in probes.items() if not _fails(probe)} == set()
    vol.close()
