"""`coalesce sim mkfs|put|ls|cat|get|scrub` (docs/sim.md, "`coalesce sim` verbs"): a person makes a
volume, fills a qtree from the host and reads it back; every mistake is an error: and a hint: line;
the read verbs write nothing and read a consistent image beside a writer."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import cli, open_sim
from coalesce_sim import diff as D
from coalesce_sim.fs import SimFS
from coalesce_sim.raid import BS
from coalesce_sim.reader import Image, read_volume
from coalesce_sim.testing import sim_apply


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.add_commands(sub)
    args = p.parse_args(argv)
    return args.func(args)


def _fail(argv: list[str], capsys, *words: str) -> str:
    """The verb fails as a user mistake: exit 4, an error: and a hint: line, no internal error."""
    assert _run(argv) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\nhint: " in err and "internal error" not in err, err
    for w in words:
        assert w in err, err
    return err


def _media(path: str) -> dict[str, str]:
    """A digest of every file of the volume directory (what a read verb must leave alone)."""
    out = {}
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            out[name] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
    return out


def _host_tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, st.st_mtime_ns, p.read_bytes())
    return out


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Host files to put: a file, an empty and a sparse file, a subdirectory, a symlink, odd modes."""
    h = tmp_path / "host"
    (h / "sub" / "deeper").mkdir(parents=True)
    (h / "a.txt").write_bytes(b"hello\n")
    (h / "empty").write_bytes(b"")
    with open(h / "sub" / "sparse", "wb") as f:
        f.seek(3 * (1 << 20) + 5)
        f.write(b"tail")
    (h / "sub" / "deeper" / "x").write_bytes(os.urandom(3 * BS + 7))
    os.symlink("../a.txt", h / "sub" / "link")
    os.chmod(h / "a.txt", 0o640)
    os.chmod(h / "sub" / "deeper", 0o750)
    for i, p in enumerate(sorted(h.rglob("*"))):
        os.utime(p, ns=(1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i), follow_symlinks=False)
    os.utime(h, ns=(1_690_000_000_000_000_000, 1_690_000_000_000_000_000))
    return h


def test_mkfs_makes_a_volume_only_where_nothing_is(tmp_path, capsys):
    vol = tmp_path / "vol"
    assert _run(["sim", "mkfs", str(vol), "--disks", "2", "--size", "64M"]) == 0
    assert "2 data disks" in capsys.readouterr().out
    fs = open_sim(f"{vol}?fsync=0")
    assert fs.raid.ndata == 2 and fs.max_stripes
    fs.close()
    media = _media(str(vol))
    _fail(["sim", "mkfs", f"sim://{vol}"], capsys, "already holds a sim volume")
    assert _media(str(vol)) == media
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine").write_text("keep me")
    _fail(["sim", "mkfs", str(busy)], capsys, "not empty")
    assert os.listdir(busy) == ["mine"] and (busy / "mine").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    _fail(["sim", "mkfs", str(tmp_path / "file")], capsys, "is a file")
    _fail(["sim", "mkfs", str(tmp_path / "new"), "--disks", "40"], capsys, "--disks")
    _fail(["sim", "mkfs", str(tmp_path / "new"), "--size", "lots"], capsys, "--size")
    assert not (tmp_path / "new").exists()


def test_put_then_ls_cat_get_give_the_host_files_back(tmp_path, host, capsys):
    vol = str(tmp_path / "vol")
    assert _run(["sim", "mkfs", vol]) == 0
    assert _run(["sim", "put", vol, str(host / "a.txt"), str(host / "empty"), str(host / "sub"), "q/in/here"]) == 0
    assert "put 3 path(s) into q/in/here" in capsys.readouterr().out
    assert _run(["sim", "ls", vol]) == 0
    assert capsys.readouterr().out.split() == ["q"]
    assert _run(["sim", "ls", "--json", vol, "q/in/here/sub"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"deeper", "link", "sparse"}
    assert rows["link"]["kind"] == "l" and rows["link"]["target"] == "../a.txt"
    assert rows["deeper"]["mode"] == 0o750 and rows["sparse"]["size"] == 3 * (1 << 20) + 9
    assert _run(["sim", "ls", "-l", vol, "q/in/here/a.txt"]) == 0
    assert capsys.readouterr().out.startswith("f 0640 ")
    out = tmp_path / "out"
    assert _run(["sim", "get", vol, "q/in/here", str(out)]) == 0
    assert "got 8 entries" in capsys.readouterr().out
    assert _host_tree(out) == _host_tree(host)  # names, kinds, bytes, modes, mtimes, link targets
    # the holes stay holes: the sparse file's blocks on the host are few
    assert os.stat(out / "sub" / "sparse").st_blocks * 512 < 1 << 20
    # get into an existing directory puts the entry inside it; never over an existing path
    assert _run(["sim", "get", vol, "q/in/here/a.txt", str(out)]) == 4
    assert "exists" in capsys.readouterr().err
    assert _run(["sim", "get", vol, "q/in/here/a.txt", str(tmp_path)]) == 0
    assert (tmp_path / "a.txt").read_bytes() == b"hello\n"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_cat_writes_the_bytes(tmp_path, host, capfdbinary):
    vol = str(tmp_path / "vol")
    assert _run(["sim", "mkfs", vol]) == 0
    assert _run(["sim", "put", vol, str(host / "sub"), "q"]) == 0
    capfdbinary.readouterr()
    assert _run(["sim", "cat", vol, "q/sub/deeper/x"]) == 0
    assert capfdbinary.readouterr().out == (host / "sub" / "deeper" / "x").read_bytes()
    assert _run(["sim", "cat", vol, "q/sub/sparse"]) == 0
    assert capfdbinary.readouterr().out == (host / "sub" / "sparse").read_bytes()


def test_user_mistakes_are_errors_with_hints_and_change_nothing(tmp_path, host, capsys):
    vol = str(tmp_path / "vol")
    assert _run(["sim", "mkfs", vol]) == 0
    assert _run(["sim", "put", vol, str(host / "a.txt"), "q"]) == 0
    fs = open_sim(f"{vol}?fsync=0")
    fs.snapshot_create("base")
    fs.export({"r": "base"})
    fs.close()
    capsys.readouterr()
    media = _media(vol)
    _fail(["sim", "put", vol, str(tmp_path / "missing"), "q"], capsys, "no ")
    _fail(["sim", "put", vol, str(host / "a.txt"), "q/a.txt/below"], capsys, "not a directory")
    _fail(["sim", "put", vol, str(host / "a.txt"), "q/../etc"], capsys, "'..'")
    sim_dir = tmp_path / "vol2"
    assert _run(["sim", "mkfs", str(sim_dir)]) == 0
    _fail(["sim", "put", str(tmp_path / "nowhere"), str(host / "a.txt"), "q"], capsys, "no sim volume", "sim mkfs")
    _fail(["sim", "scrub", str(tmp_path / "nowhere")], capsys, "no sim volume", "sim mkfs")
    fs = open_sim(f"{vol}?fsync=0")
    sim_apply(fs, "r", [R.MkFile(path="f")])  # a replica qtree (exported as "r")
    fs.close()
    media = _media(vol)
    _fail(["sim", "put", vol, str(host / "a.txt"), "r"], capsys, "is a replica")
    _fail(["sim", "ls", vol, "nope"], capsys, "no qtree 'nope'", "qtrees there")
    _fail(["sim", "ls", vol, "q/nope"], capsys, "no 'q/nope'")
    _fail(["sim", "ls", vol, "q//x"], capsys, "not a path in a qtree")
    _fail(["sim", "cat", vol, "q"], capsys, "is a directory")
    _fail(["sim", "cat", vol, "q/a.txt/x"], capsys, "is a file")
    _fail(["sim", "ls", "--pcpi", "nope", vol, "q"], capsys, "PCPI 'nope' does not exist")
    _fail(["sim", "ls", "--export", vol, "q"], capsys, "not exported")
    _fail(["sim", "get", vol, "q/a.txt", str(tmp_path / "no" / "dir" / "f")], capsys, "no directory")
    _fail(["sim", "ls", str(tmp_path / "nowhere")], capsys, "no sim volume")
    assert _media(vol) == media


def test_read_verbs_read_the_chosen_image_and_write_nothing(tmp_path, capsys):
    vol = str(tmp_path / "vol")
    fs = open_sim(f"{vol}?fsync=0", create=True)
    sim_apply(fs, "r", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"exported")])
    fs.snapshot_create("base")
    fs.export({"r": "base"})
    sim_apply(fs, "r", [R.Write(path="f", offset=0, data=b"ACTIVE!!"), R.MkFile(path="new")])
    fs.close()
    media = _media(vol)
    assert _run(["sim", "cat", vol, "r/f"]) == 0
    assert capsys.readouterr().out == "ACTIVE!!"
    assert _run(["sim", "cat", "--export", vol, "r/f"]) == 0
    assert capsys.readouterr().out == "exported"
    assert _run(["sim", "ls", "--pcpi", "base", vol, "r"]) == 0
    assert capsys.readouterr().out.split() == ["f"]
    assert _run(["sim", "ls", "--export", vol]) == 0
    assert capsys.readouterr().out.split() == ["r"]
    assert _run(["sim", "get", "--export", vol, "r", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "f").read_bytes() == b"exported" and not (tmp_path / "copy" / "new").exists()
    assert "the image exported for 'r'" in capsys.readouterr().out
    assert _run(["sim", "info", "--json", vol]) == 0
    assert json.loads(capsys.readouterr().out)["exports"] == {"r": "base"}
    assert _media(vol) == media  # no lock file written, no superblock healed, no CP


def test_a_read_torn_by_the_writer_is_done_again(make_sim):
    """The writer moves two CPs on under a read of the active file system: the blocks read may
    have been reused, so the read is done again; a PCPI's blocks stay while the PCPI exists."""
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"one")])
    fs.snapshot_create("s")
    attempts = []

    def read_active(ro: SimFS) -> dict:
        attempts.append(ro.cp)
        image.read.add(None)
        tree = D.tree_dict(ro, "q")
        if len(attempts) == 1:  # the writer commits twice meanwhile
            sim_apply(fs, "q", [R.Write(path="f", offset=0, data=b"two")])
            sim_apply(fs, "q", [R.MkFile(path="g")])
        return tree

    image = Image()
    tree = read_volume(fs.path, image, read_active)
    assert len(attempts) == 2 and attempts[1] == attempts[0] + 2
    assert tree == D.tree_dict(fs, "q") and tree["f"][2] == b"two"

    attempts.clear()

    def read_pcpi(ro: SimFS) -> dict:
        attempts.append(ro.cp)
        image.read.add("s")
        tree = D.tree_dict(ro, "q", "s")
        for i in range(3):
            sim_apply(fs, "q", [R.MkFile(path=f"more{i}")])
        return tree

    image = Image(pcpi="s")
    assert read_volume(fs.path, image, read_pcpi)["f"][2] == b"one" and len(attempts) == 1

    def read_while_released(ro: SimFS) -> dict:
        image.read.add("s")
        tree = D.tree_dict(ro, "q", "s")
        if "s" in fs.pcpi_names():
            fs.snapshot_delete("s")  # released under the read: its blocks may be reused
            for i in range(3):
                sim_apply(fs, "q", [R.MkFile(path=f"after{i}")])
        return tree

    with pytest.raises(BackendError, match="PCPI 's' does not exist"):
        read_volume(fs.path, image, read_while_released)

    def always_moving(ro: SimFS) -> None:
        image.read.add(None)
        for i in range(2):
            sim_apply(fs, "q", [R.MkFile(path=f"x{len(fs.pcpi_names())}{ro.cp}{i}")])

    image = Image()
    with pytest.raises(BackendError, match="changed under the read") as exc:
        read_volume(fs.path, image, always_moving)
    assert "--export" in exc.value.hint


HOLDER = """
import sys, time
from coalesce_sim import open_sim
fs = open_sim(sys.argv[1] + "?fsync=0")
print("open", flush=True)
sys.stdin.read()
"""


def test_a_writing_verb_is_refused_while_another_process_has_the_volume_open(tmp_path, host, capsys):
    """One process writes a sim volume at a time (docs/sim.md): put, scrub, fail-disk and
    reconstruct are refused, naming the holder, while another process has the volume open; the
    read verbs work beside it; once it exits, put works."""
    vol = str(tmp_path / "vol")
    assert _run(["sim", "mkfs", vol]) == 0
    assert _run(["sim", "put", vol, str(host / "a.txt"), "q"]) == 0
    capsys.readouterr()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, vol], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        media = _media(vol)
        for argv in (
            ["put", vol, str(host / "empty"), "q"],
            ["scrub", vol],
            ["fail-disk", vol, "1"],
            ["reconstruct", vol],
        ):
            err = _fail(["sim", *argv], capsys, f"PID {holder.pid}", "needs the volume to itself")
            assert "stop the agent" in err
        assert _media(vol) == media
        assert _run(["sim", "cat", vol, "q/a.txt"]) == 0
        assert capsys.readouterr().out == "hello\n"
        assert _run(["sim", "info", vol]) == 0
    finally:
        holder.communicate("", timeout=60)
    assert _run(["sim", "put", vol, str(host / "empty"), "q"]) == 0
    assert _run(["sim", "ls", vol, "q"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["a.txt", "empty"]


def test_scrub_repair_refusal_is_an_error_with_a_hint(tmp_path, host, capsys):
    vol = str(tmp_path / "vol")
    assert _run(["sim", "mkfs", vol]) == 0
    assert _run(["sim", "put", vol, str(host / "sub"), "q"]) == 0
    fs = open_sim(f"{vol}?fsync=0")
    live = sorted(fs.suse)[-1]
    fs.close()
    with open(os.path.join(vol, "disk1.img"), "r+b") as f:
        f.seek(live * BS + 9)
        f.write(b"rot")
    capsys.readouterr()
    assert _run(["sim", "scrub", "--json", vol]) == 1
    [m] = json.loads(capsys.readouterr().out)["mismatches"]
    assert m["live"] and not m["decided"]
    _fail(["sim", "scrub", "--repair", vol], capsys, "nothing was written", "fail-disk")
    assert _run(["sim", "scrub", vol]) == 1  # still there: nothing was repaired
    assert "not repaired" in capsys.readouterr().out
