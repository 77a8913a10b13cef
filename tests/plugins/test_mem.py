"""The mem backend: the conformance suite on both URL forms, plus mem-specific tests
(persistence across processes and SIGKILL, damaged files, copy-on-write PCPIs,
the source-writing API, thread safety)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import coalesce_mem
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.manager import backend_infos, plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError, CorruptStream, HostilePath, TruncatedStream
from coalesce_core.stream.fingerprint import EMPTY, digest
from coalesce_core.stream.records import Begin, End, HardLink, MkDir, MkFile, Rename, SetAttr, Write, framed
from coalesce_core.testing import conformance

_ids = itertools.count()


@pytest.fixture(params=["name", "file"])
def make_url(request, tmp_path):
    """A factory of fresh mem volume URLs of both forms."""
    if request.param == "name":
        urls: list[str] = []

        def make() -> str:
            url = f"mem://conformance-{os.getpid()}-{next(_ids)}"
            urls.append(url)
            return url

        yield make
        for url in urls:
            coalesce_mem.forget(url)
    else:
        made: list[str] = []

        def make_file() -> str:
            made.append(f"mem://{tmp_path}/vol{next(_ids)}")
            return made[-1]

        yield make_file
        for url in made:
            coalesce_mem.forget(url)


@pytest.fixture
def pm():
    return plugin_manager()


def _vol(pm, url: str) -> Volume:
    return Volume.open(pm, url, create=True)


# ----------------------------------------------------------------- conformance
@pytest.mark.parametrize("check", list(conformance.BASIC_CHECKS))
def test_conformance_basic(check, make_url):
    conformance.run_basic_check(check, make_url)


def test_conformance_state_machine(make_url, request):
    # the file form fsyncs after every mutating primitive: fewer examples
    file_form = request.node.callspec.params["make_url"] == "file"
    conformance.run_conformance(
        make_url, basic=False, max_examples=8 if file_form else None, stateful_steps=20 if file_form else None
    )


# ----------------------------------------------------------------- discovery
def test_backend_is_registered_through_its_entry_point(pm):
    assert pm.get_plugin("mem") is coalesce_mem
    assert {"plugin": "mem", "scheme": "mem"}.items() <= next(
        i for i in backend_infos(pm) if i["scheme"] == "mem"
    ).items()


def test_other_schemes_are_not_mine(pm):
    from coalesce_core.backend.urls import VolumeURL

    assert coalesce_mem.coalesce_open_volume(url=VolumeURL.parse("zfs://pool/ds"), create=True) is None
    assert pm.hook.coalesce_snapshot_list(volume=object()) is None  # not a handle: nobody serves it
    with pytest.raises(ValueError):
        coalesce_mem.volume_for("sim:///x")


# ----------------------------------------------------------------- registry and files
def test_named_volume_survives_an_abandoned_agent_in_the_same_process():
    url = f"mem://abandoned-{next(_ids)}"
    v1 = _vol(plugin_manager(), url)
    v1.apply("q", framed("q", None, "t", [MkFile(path="f"), Write(path="f", offset=0, data=b"kept")]))
    v1.snapshot_create("s")
    del v1  # the agent is gone; the "disks" are not
    v2 = Volume.open(plugin_manager(), url, create=False)
    assert v2.snapshot_list() == ["s"]
    assert coalesce_mem.volume_for(url).read_file("q/f") == b"kept"
    coalesce_mem.forget(url)
    with pytest.raises(BackendError) as ei:
        Volume.open(plugin_manager(), url, create=False)
    assert "create" in ei.value.hint


def test_metadata_dir(pm, tmp_path):
    assert _vol(pm, f"mem://md-{next(_ids)}").metadata_dir() is None
    vol = _vol(pm, f"mem://{tmp_path}/v")
    assert vol.metadata_dir() == f"{tmp_path}/v.coalesce"
    assert os.path.isdir(f"{tmp_path}/v.coalesce")


def test_missing_file_is_a_clear_error(pm, tmp_path):
    with pytest.raises(BackendError) as ei:
        Volume.open(pm, f"mem://{tmp_path}/nope", create=False)
    assert "create" in ei.value.hint
    with pytest.raises(BackendError):
        Volume.open(pm, f"mem://{tmp_path}/no/such/dir/v", create=True)


def _run_py(code: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120, **kw
    )


def test_persisted_volume_is_seen_by_another_process(pm, tmp_path):
    path = tmp_path / "shared.vol"
    url = f"mem://{path}"
    res = _run_py(f"""
        import coalesce_mem
        v = coalesce_mem.volume_for({url!r})
        v.write_file("q1/dir/a.txt", b"from the child", mode=0o600)
        v.symlink("q1/l", "dir/a.txt")
        v.link("q1/dir/a.txt", "q1/hard")
        v.write_file("q1/\\udcffodd", b"non-utf8 name")
        v.snapshot_create("s1")
        v.write_file("q1/dir/a.txt", b"changed after s1")
        v.export({{"r1": "s1", "r2": "@active"}})
        print(v.fingerprint("q1", "s1"), v.fingerprint("q1", None))
    """)
    assert res.returncode == 0, res.stderr
    fp_s1, fp_active = res.stdout.split()
    coalesce_mem.forget(url)
    vol = Volume.open(pm, url, create=False)
    assert vol.snapshot_list() == ["s1"]
    assert vol.fingerprint("q1", "s1") == fp_s1 and vol.fingerprint("q1") == fp_active
    assert vol.exported() == {"r1": "s1", "r2": ACTIVE}
    mv = coalesce_mem.volume_for(url)
    assert mv.read_file("q1/hard") == b"changed after s1"  # the hard link survived the file
    assert mv.read_file("q1/dir/a.txt", snapshot="s1") == b"from the child"
    assert mv.readlink("q1/l") == "dir/a.txt"
    assert mv.read_file("q1/\udcffodd") == b"non-utf8 name"
    assert mv.stat("q1/dir/a.txt")["mode"] == 0o644  # write_file's default mode on the rewrite
    # the parent keeps its handle; a second process changes the file; a re-open sees it
    res = _run_py(f"""
        import coalesce_mem
        v = coalesce_mem.volume_for({url!r}, create=False)
        v.snapshot_create("s2")
        v.remove_qtree("q1")
    """)
    assert res.returncode == 0, res.stderr
    vol = Volume.open(pm, url, create=False)
    assert vol.snapshot_list() == ["s1", "s2"] and vol.qtree_list() == []


def test_a_file_costs_its_size_in_the_volume_file(pm, tmp_path):
    """The last block of a file is kept up to the end of file only: 1,000 files of 300 bytes
    make a file of a few hundred KiB, not 1,000 blocks of 64 KiB; they come back byte for byte."""
    url = f"mem://{tmp_path}/v"
    mv = coalesce_mem.volume_for(url, create=True)
    for i in range(1000):
        mv.write_file(f"q/f{i}", bytes([1 + i % 200]) * 300)
    mv.write_file("q/big", bytes(range(256)) * 1000)  # 3 full blocks and a cut one
    assert os.path.getsize(tmp_path / "v") < 1000 * 1024
    coalesce_mem.forget(url)
    again = coalesce_mem.volume_for(url, create=False)
    assert all(again.read_file(f"q/f{i}") == bytes([1 + i % 200]) * 300 for i in range(1000))
    assert again.read_file("q/big") == bytes(range(256)) * 1000


def test_every_mutating_primitive_is_persisted(pm, tmp_path):
    url = f"mem://{tmp_path}/v"
    vol = _vol(pm, url)

    def reread() -> Volume:
        coalesce_mem.forget(url)
        return Volume.open(plugin_manager(), url, create=False)

    vol.apply("q", framed("q", None, "t", [MkFile(path="f")]), use_purgatory=False)
    assert reread().qtree_list() == ["q"]
    vol = reread()
    vol.snapshot_create("s")
    assert reread().snapshot_list() == ["s"]
    vol = reread()
    vol.export({"q": "s"})
    assert reread().exported() == {"q": "s"}
    vol = reread()
    vol.apply("q", framed("q", None, "t", [MkFile(path="g")]), use_purgatory=True)  # replaces nothing
    vol.apply("q", framed("q", None, "t", [MkFile(path="g")]), use_purgatory=True)  # old g -> purgatory
    assert coalesce_mem.volume_for(url).purgatory_size("q") == 1
    vol = reread()
    assert coalesce_mem.volume_for(url).purgatory_size("q") == 1
    vol.purge_purgatory(["q"])
    assert coalesce_mem.volume_for(url).purgatory_size("q") == 0
    reread()
    assert coalesce_mem.volume_for(url).purgatory_size("q") == 0
    vol = reread()
    vol.export({})
    vol.snapshot_delete("s")
    assert reread().snapshot_list() == []
    vol = reread()
    vol.remove_qtree("q")
    assert reread().qtree_list() == []


def test_a_failed_apply_persists_its_partial_state(pm, tmp_path):
    url = f"mem://{tmp_path}/v"
    vol = _vol(pm, url)

    def broken():
        yield Begin(qtree="q", base=None, target="t")
        yield MkFile(path="partial")
        raise ConnectionError("link dropped")

    with pytest.raises(ConnectionError):
        vol.apply("q", broken(), use_purgatory=True)
    coalesce_mem.forget(url)
    assert coalesce_mem.volume_for(url, create=False).exists("q/partial")


def test_sigkill_leaves_a_readable_volume(tmp_path):
    url = f"mem://{tmp_path}/killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import coalesce_mem, sys
        v = coalesce_mem.volume_for({url!r})
        for i in range(100000):
            v.write_file(f"q/f{{i}}", b"x" * 1000)
            if i == 5:
                print("ready", flush=True)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    coalesce_mem.forget(url)
    listing = coalesce_mem.volume_for(url, create=False).listing("q")
    n = len(listing)
    assert n >= 6
    assert set(listing) == {f"f{i}" for i in range(n)}  # a prefix of the writes, nothing torn


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "version", "structure"])
def test_damaged_file_is_a_clear_error_and_is_never_emptied(pm, tmp_path, damage):
    path = tmp_path / "v"
    url = f"mem://{path}"
    vol = _vol(pm, url)
    vol.apply("q", framed("q", None, "t", [MkFile(path="f"), Write(path="f", offset=0, data=b"precious")]))
    vol.snapshot_create("s")
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        i = len(data) - 20
        data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
    elif damage == "garbage":
        data = b"\x00\xffnot json at all"
    elif damage == "empty":
        data = b""
    elif damage == "version":
        head, _, body = data.partition(b"\n")
        h = json.loads(head)
        h["version"] = 99
        data = json.dumps(h).encode() + b"\n" + body
    elif damage == "structure":  # a consistent checksum over a body that points nowhere
        import hashlib

        head, _, body = data.partition(b"\n")
        obj = json.loads(body)
        obj["active"]["q"] = 42
        body = json.dumps(obj).encode()
        data = (
            json.dumps(
                {"format": "coalesce-mem", "version": 1, "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
            ).encode()
            + b"\n"
            + body
            + b"\n"
        )
    path.write_bytes(data)
    coalesce_mem.forget(url)
    for create in (False, True):
        with pytest.raises(BackendError) as ei:
            Volume.open(plugin_manager(), url, create=create)
        assert "damaged" in str(ei.value) and "Restore" in ei.value.hint
    assert path.read_bytes() == data  # untouched


def test_a_file_of_another_scheme_is_refused(tmp_path):
    from coalesce_mem.volume import open_volume

    open_volume("mem", str(tmp_path / "v"), True)
    with pytest.raises(BackendError, match="not 'tiny'"):
        open_volume("tiny", str(tmp_path / "v"), False)


# ----------------------------------------------------------------- copy-on-write PCPIs
def test_pcpis_share_structure_and_are_not_affected_by_later_writes(pm):
    url = f"mem://cow-{next(_ids)}"
    vol = _vol(pm, url)
    mv = coalesce_mem.volume_for(url)
    for i in range(300):
        mv.write_file(f"q{i:03}/f", f"qtree {i}".encode())
    t = time.perf_counter()
    vol.snapshot_create("s1")
    took = time.perf_counter() - t
    assert took < 0.1  # O(qtrees), no data copied
    assert all(mv.snapshots["s1"][q] is mv.active[q] for q in mv.active)
    fp = vol.fingerprint("q007", "s1")
    mv.write_file("q007/f", b"changed")
    mv.write_file("q007/g", b"new")
    mv.unlink("q007/g")
    assert mv.snapshots["s1"]["q007"] is not mv.active["q007"]  # copied on first write
    assert sum(mv.snapshots["s1"][q] is mv.active[q] for q in mv.active) == 299  # only that one
    assert vol.fingerprint("q007", "s1") == fp
    assert mv.read_file("q007/f", snapshot="s1") == b"qtree 7"
    # an unchanged qtree diffs to nothing without a walk
    vol.snapshot_create("s2")
    assert [type(r) for r in vol.diff("q001", "s1", "s2")] == [Begin, End]


def test_hard_links_are_shared_inodes_and_break_from_pcpis_together(pm):
    url = f"mem://links-{next(_ids)}"
    vol = _vol(pm, url)
    mv = coalesce_mem.volume_for(url)
    mv.write_file("q/a", b"one")
    mv.link("q/a", "q/b")
    vol.snapshot_create("s")
    mv.write_file("q/b", b"two")
    assert mv.read_file("q/a") == b"two"
    assert mv.read_file("q/a", snapshot="s") == b"one" and mv.read_file("q/b", snapshot="s") == b"one"
    assert mv.stat("q/a")["inode"] == mv.stat("q/b")["inode"]


def test_snapshot_limit_and_names(pm):
    url = f"mem://limit-{next(_ids)}"
    vol = _vol(pm, url)
    coalesce_mem.volume_for(url).max_pcpis = 3
    for n in ("a", "b", "c"):
        vol.snapshot_create(n)
    assert vol.snapshot_create("a") == "a"  # an existing name is not a new PCPI
    with pytest.raises(BackendError) as ei:
        vol.snapshot_create("d")
    assert ei.value.hint
    for bad in ("", "a/b", ACTIVE, "x\x00"):
        with pytest.raises(BackendError):
            vol.snapshot_create(bad)


def test_an_exported_pcpi_cannot_be_deleted(pm):
    vol = _vol(pm, f"mem://exp-{next(_ids)}")
    vol.snapshot_create("base")
    vol.export({"r": "base"})
    with pytest.raises(BackendError, match="exported by r"):
        vol.snapshot_delete("base")
    vol.export({"r": ACTIVE})
    assert vol.snapshot_delete("base") is True


# ----------------------------------------------------------------- apply details
def test_apply_replays_and_stream_framing(pm):
    vol = _vol(pm, f"mem://replay-{next(_ids)}")
    recs = [
        MkDir(path="d"),
        MkFile(path="d/f"),
        Write(path="d/f", offset=3, data=b"x"),
        HardLink(path="h", existing="d/f"),
        Rename(old="h", new="h2"),
        SetAttr(path="d", mode=0o700),
    ]
    vol.apply("q", framed("q", None, "t", recs))
    fp = vol.fingerprint("q")
    # replaying the same stream (recovery) converges to the same tree
    vol.apply("q", framed("q", None, "t", [r for r in recs if not isinstance(r, (MkFile, HardLink))]))
    assert vol.fingerprint("q") == fp
    assert coalesce_mem.volume_for(str(vol.url)).read_file("q/d/f") == b"\0\0\0x"  # a materialised hole
    with pytest.raises(TruncatedStream):
        vol.apply("q", iter([Begin(qtree="q", base=None, target="t"), MkDir(path="e")]))
    with pytest.raises(CorruptStream):
        vol.apply("q", iter([Begin(qtree="q", base=None, target="t"), End(records=5)]))
    with pytest.raises(CorruptStream):
        vol.apply("q", iter(["not a record"]))
    with pytest.raises(CorruptStream):
        vol.apply("q", iter([Write(path="nope/x", offset=0, data=b"")]))
    with pytest.raises(HostilePath):
        vol.apply("../x", iter([]))
    with pytest.raises(HostilePath):
        vol.apply("a/b", iter([]))
    # bare change records (no Begin/End) are accepted too
    assert vol.apply("q", iter([MkDir(path="bare")])) == {"records": 1, "bytes": 0}


def test_concurrent_applies_to_different_qtrees(pm):
    url = f"mem://threads-{next(_ids)}"
    vol = _vol(pm, url)
    errors: list[BaseException] = []

    def worker(q: str) -> None:
        try:
            for i in range(40):
                vol.apply(
                    q, framed(q, None, "t", [MkFile(path=f"f{i}"), Write(path=f"f{i}", offset=0, data=q.encode() * 10)])
                )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"q{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for i in range(20):
        vol.snapshot_create(f"s{i}")  # PCPIs taken while the workers write
    for t in threads:
        t.join()
    assert not errors
    mv = coalesce_mem.volume_for(url)
    for n in range(8):
        assert len(mv.listing(f"q{n}")) == 40
    for i in range(20):
        for n in range(8):
            files = mv.listing(f"q{n}", snapshot=f"s{i}")
            assert all(v == ("f", 0o644, f"q{n}".encode() * 10) or v == ("f", 0o644, b"") for v in files.values())


# ----------------------------------------------------------------- the source-writing API
def test_source_api(pm):
    url = f"mem://api-{next(_ids)}"
    mv = coalesce_mem.volume_for(url)
    mv.mkdir("q")
    mv.mkdir("q/a/b", parents=True, mode=0o750)
    mv.mkdir("q/a/b", exist_ok=True)
    with pytest.raises(FileExistsError):
        mv.mkdir("q/a/b")
    with pytest.raises(FileNotFoundError):
        mv.mkdir("q/x/y")
    mv.write_file("q/a/b/f", b"data", mode=0o600, mtime_ns=123)
    mv.write_file("q/new/dir/g", b"parents made")
    mv.symlink("q/l", "a/b/f")
    mv.link("q/a/b/f", "q/h")
    mv.rename("q/h", "q/h2")
    mv.set_xattr("q/h2", "user.k", b"v")
    mv.set_attr("q/a", mode=0o700, uid=1, gid=2)
    assert mv.stat("q/a") | {"inode": 0} == {
        "kind": "d",
        "mode": 0o700,
        "uid": 1,
        "gid": 2,
        "mtime_ns": 0,
        "size": 0,
        "inode": 0,
        "xattrs": {},
    }
    assert mv.stat("q/a/b/f")["xattrs"] == {"user.k": b"v"} and mv.stat("q/a/b/f")["mtime_ns"] == 123
    assert mv.listing("q") == {
        "a": ("d", 0o700),
        "a/b": ("d", 0o750),
        "a/b/f": ("f", 0o600, b"data"),
        "h2": ("f", 0o600, b"data"),
        "l": ("l", "a/b/f"),
        "new": ("d", 0o755),
        "new/dir": ("d", 0o755),
        "new/dir/g": ("f", 0o644, b"parents made"),
    }
    mv.unlink("q/l")
    mv.unlink("q/new/dir/g")
    mv.rmdir("q/new/dir")
    with pytest.raises(FileNotFoundError):
        mv.unlink("q/l")
    assert not mv.exists("q/l") and mv.exists("q/new")
    with pytest.raises(FileNotFoundError):
        mv.read_file("q/a")
    with pytest.raises(ValueError):
        mv.link("q/a/b/f", "other/f")
    vol = Volume.open(pm, url)
    assert vol.fingerprint("q") == digest(
        coalesce_mem.tree.entries_of(mv.active["q"].root)
    )  # the API and the hook agree
    assert vol.fingerprint("missing") == EMPTY


def test_very_deep_trees_need_no_recursion(pm, tmp_path):
    url = f"mem://{tmp_path}/deep"
    vol = _vol(pm, url)
    depth = 1200  # deeper than the default recursion limit
    recs = [MkDir(path="/".join(["a"] * i)) for i in range(1, depth + 1)]
    recs += [MkFile(path="/".join(["a"] * depth + ["f"])), SetAttr(path="a", mode=0o700)]
    vol.apply("q", framed("q", None, "t", recs))
    vol.snapshot_create("s")
    coalesce_mem.volume_for(url).write_file("q/" + "/".join(["a"] * depth + ["f"]), b"deep")
    vol.snapshot_create("s2")
    coalesce_mem.forget(url)
    vol = Volume.open(plugin_manager(), url)
    vol.apply("copy", vol.diff("q", None, "s"))
    vol.apply("copy", vol.diff("q", "s", "s2"))
    assert vol.fingerprint("copy") == vol.fingerprint("q", "s2") != vol.fingerprint("q", "s")


def test_a_long_lived_handle_never_writes_back_a_stale_volume(pm, tmp_path):
    url = f"mem://{tmp_path}/stale"
    vol = _vol(pm, url)
    vol.apply("q", framed("q", None, "t", [MkFile(path="mine")]))
    res = _run_py(f"""
        import coalesce_mem
        coalesce_mem.volume_for({url!r}, create=False).write_file("q/theirs", b"other process")
    """)
    assert res.returncode == 0, res.stderr
    vol.snapshot_create("s")  # same handle, no re-open: it must see "theirs" and keep it
    coalesce_mem.forget(url)
    mv = coalesce_mem.volume_for(url, create=False)
    assert set(mv.listing("q", snapshot="s")) == {"mine", "theirs"}


def test_a_file_damaged_under_an_open_handle_is_never_overwritten(pm, tmp_path):
    path = tmp_path / "v"
    vol = _vol(pm, f"mem://{path}")
    vol.apply("q", framed("q", None, "t", [MkFile(path="f")]))
    path.write_bytes(b"damaged by someone else")
    for call in (
        lambda: vol.apply("q", framed("q", None, "t", [MkFile(path="g")])),
        lambda: vol.snapshot_create("s"),
        lambda: vol.export({}),
        lambda: vol.fingerprint("q"),
    ):
        with pytest.raises(BackendError, match="damaged"):
            call()
    assert path.read_bytes() == b"damaged by someone else"
