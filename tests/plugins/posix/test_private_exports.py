"""Exports are reachable by root only (docs/operations.md, "Publishing exports"): the directories
through which a POSIX destination's qtrees, PCPI images and exports are reached are created mode
0700 and narrowed to it at every export switch (start-up's included) when found wider, with a
warning; a user other than root cannot reach a planted setuid binary through an export path.
PosixVolume on plain directories here (PCPIs are copies); btrfs and zfs add their PCPI
directories (``private_dirs``), run by the lead on the real file systems."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import tempfile

import pytest

from coalesce_posix.exports import make_private
from coalesce_posix.volume import PosixVolume


class DirVolume(PosixVolume):
    """A PosixVolume whose PCPIs are copies of its root in ``<parent>/snaps/<pcpi>``."""

    def __init__(self, parent: str) -> None:
        self.snapdir = os.path.join(parent, "snaps")
        super().__init__("dir://test", os.path.join(parent, "vol"), os.path.join(parent, "exp"))
        os.makedirs(self.root, 0o755, exist_ok=True)
        os.makedirs(self.snapdir, 0o755, exist_ok=True)

    def private_dirs(self) -> list[str]:
        return [*super().private_dirs(), self.snapdir]

    def snapshot_create(self, name: str) -> None:
        shutil.copytree(self.root, os.path.join(self.snapdir, name), symlinks=True)

    def snapshot_list(self) -> list[str]:
        return sorted(os.listdir(self.snapdir))

    def export_image_path(self, replica: str, pcpi: str) -> str:
        return os.path.join(self.snapdir, pcpi, replica)

    def export_image_prefix(self) -> str:
        return self.snapdir


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _as_nobody(path: str) -> int:
    """Fork, become ``nobody`` and try to stat ``path``: the child's errno (0: it could)."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.stat(path)
        except PermissionError as exc:
            code = exc.errno or 99
        except BaseException:
            code = 98
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def volume():
    # a directory of its own in /tmp that lets anybody in (pytest's tmp_path is below a 0700 one)
    parent = tempfile.mkdtemp(prefix="coalesce-private-exports-")
    os.chmod(parent, 0o755)
    vol = DirVolume(parent)
    os.makedirs(os.path.join(vol.root, "A", "bin"))
    su = os.path.join(vol.root, "A", "bin", "su")
    with open(su, "wb") as f:
        f.write(b"\x7fELF")
    os.chmod(su, 0o4755)
    vol.snapshot_create("co-g-000001")
    yield vol
    shutil.rmtree(parent)


def test_an_export_switch_makes_every_way_to_the_images_root_only_and_says_so(volume, caplog):
    for d in volume.private_dirs():
        if os.path.isdir(d):
            assert _mode(d) == 0o755  # as an older coalesce or an operator left them
    with caplog.at_level(logging.WARNING, logger="coalesce.posix"):
        volume.export({"A": "co-g-000001"})
    assert {d: _mode(d) for d in volume.private_dirs()} == {d: 0o700 for d in volume.private_dirs()}
    narrowed = [r.getMessage() for r in caplog.records if "now 0o700" in r.getMessage()]
    assert len(narrowed) == 2 and all("was mode 0o755" in m for m in narrowed)  # root and snaps; exp was new
    su = os.path.join(volume.export_path("A"), "bin", "su")
    assert os.stat(su).st_mode & stat.S_ISUID  # root reaches it (a "keep" group's image)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coalesce.posix"):
        volume.export({"A": "co-g-000001"})
    assert not caplog.records  # nothing to correct the second time


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_user_other_than_root_cannot_reach_an_export(volume):
    su = os.path.join(volume.export_path("A"), "bin", "su")
    os.makedirs(volume.export_root, 0o755)
    assert _as_nobody(os.path.join(volume.snapdir, "co-g-000001", "A", "bin", "su")) == 0  # before: reachable
    volume.export({"A": "co-g-000001"})
    assert os.path.exists(su)
    assert _as_nobody(su) == 13  # EACCES: the export path
    assert _as_nobody(os.path.join(volume.root, "A", "bin", "su")) == 13  # the active FS
    assert _as_nobody(os.path.join(volume.snapdir, "co-g-000001", "A", "bin", "su")) == 13  # the PCPI image


def test_make_private_creates_missing_directories_0700_and_leaves_narrower_ones(tmp_path):
    new, narrow = str(tmp_path / "a" / "b"), str(tmp_path / "n")
    os.mkdir(narrow, 0o500)
    assert make_private([new, narrow]) == []
    assert (_mode(new), _mode(narrow)) == (0o700, 0o500)
