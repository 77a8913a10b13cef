"""The hook layer: the entry point, the Volume facade, open/close, exports, metadata dir, CLI verbs."""

from __future__ import annotations

import argparse
import json
import os

import pytest

import coalesce_sim
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import ACTIVE, PRIMITIVE_HOOKS, hookimpl
from coalesce_core.backend.manager import backend_infos, plugin_manager
from coalesce_core.backend.urls import VolumeURL
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_sim import cli, parse_location
from coalesce_sim.testing import sim_apply


def test_the_module_writes_only_its_own_hooks_and_the_handle_has_every_primitive():
    """Like every backend (docs/writing-a-backend.md): the primitives are methods of the handle,
    which the core's default hooks call; the native rollback is a hook, tried before the generic one."""
    assert {n for n in dir(coalesce_sim) if n.startswith("coalesce_")} == {
        "coalesce_backend_info",
        "coalesce_open_volume",
        "coalesce_cli_commands",
        "coalesce_rollback",
    }
    assert issubclass(coalesce_sim.SimVolume, VolumeHandle) and issubclass(coalesce_sim.SimVolume, coalesce_sim.SimFS)
    for hook in set(PRIMITIVE_HOOKS[1:]) - {"coalesce_rollback"}:
        method = {"coalesce_close_volume": "close"}.get(hook, hook.removeprefix("coalesce_"))
        assert callable(getattr(coalesce_sim.SimVolume, method, None)), hook


def test_the_entry_point_serves_sim_and_only_sim(sim_url):
    pm = plugin_manager()
    assert any(i["scheme"] == "sim" and i["plugin"] == "sim" for i in backend_infos(pm))
    assert coalesce_sim.coalesce_open_volume(url=VolumeURL.parse("mem://x"), create=True) is None
    for hook in PRIMITIVE_HOOKS[1:]:
        caller = getattr(pm.hook, hook)
        params = {p: None for p in caller.spec.argnames if p != "volume"}
        params.update({k: "x" for k in ("name", "qtree", "rollback_pcpi", "replica") if k in params})
        params.update({k: v for k, v in (("qtrees", []), ("mapping", {}), ("records", []), ("skip", 0)) if k in params})
        assert caller(volume=object(), **params) is None, hook


class _DiffSpy:
    """Counts the diffs that run through the hook chain (the generic rollback's among them)."""

    def __init__(self) -> None:
        self.diffs = 0

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree):
        self.diffs += 1
        return (yield)


@pytest.mark.parametrize("native", [True, False])
def test_the_native_rollback_wins_and_the_generic_one_runs_when_it_is_off(sim_url, monkeypatch, native):
    if not native:
        monkeypatch.setenv("COALESCE_SIM_NATIVE_ROLLBACK", "0")
    spy = _DiffSpy()
    pm = plugin_manager([spy])
    v = Volume.open(pm, sim_url(), create=True)
    v.apply("q", R.framed("q", None, "t", [R.MkFile(path="f")]))
    v.snapshot_create("base")
    v.apply("q", R.framed("q", None, "t", [R.MkFile(path="g")]))
    v.snapshot_create("rb")
    cps = v.handle.cp
    assert v.rollback("q", "rb", "base") is True
    assert v.fingerprint("q") == v.fingerprint("q", "base")
    assert spy.diffs == (0 if native else 1), "native: no diff; off: the generic diff + apply"
    if native:
        assert v.handle.cp == cps + 1, "the native rollback is one CP"
    v.close()


def test_open_create_close_and_metadata_dir(sim_url, tmp_path):
    pm = plugin_manager()
    url = sim_url()
    with pytest.raises(BackendError) as ei:
        Volume.open(pm, url)
    assert ei.value.hint
    v = Volume.open(pm, url, create=True)
    v2 = Volume.open(pm, url, create=True)  # idempotent; the same handle
    assert v2.handle is v.handle
    md = v.metadata_dir()
    assert md == os.path.join(v.handle.path, ".coalesce") and os.path.isdir(md)
    assert v.qtree_list() == [] and v.snapshot_list() == []
    v.apply("q", R.framed("q", None, "t", [R.MkFile(path="f")]))
    assert "q" in v.qtree_list() and ".coalesce" not in v.qtree_list()
    v.close()
    assert v.handle.raid.fds[0] is not None, "still open for the second facade"
    v2.close()
    v2.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        v.snapshot_list()
    v3 = Volume.open(pm, url)
    assert v3.qtree_list() == ["q"]
    v3.close()


def test_location_options():
    assert parse_location("/a/b?disks=5&size=64M&fsync=0") == (
        "/a/b",
        {"ndata": 5, "max_bytes": 64 << 20, "fsync": False},
    )
    with pytest.raises(BackendError):
        parse_location("relative/dir")
    with pytest.raises(BackendError):
        parse_location("/a?colour=red")


def test_export_table_is_one_atomic_switch_and_read_back(sim_url):
    pm = plugin_manager()
    url = sim_url()
    v = Volume.open(pm, url, create=True)
    v.apply("q", R.framed("q", None, "t", [R.MkFile(path="f")]))
    v.snapshot_create("base")
    cp = v.handle.cp
    assert v.export({"A": "base", "B": "base", "C": ACTIVE, "D": None}) is True
    assert v.handle.cp == cp + 1
    assert v.export({"A": "base", "B": "base", "C": ACTIVE}) is True
    assert v.handle.cp == cp + 1, "an identical table is a no-op"
    with pytest.raises(BackendError):
        v.export({"A": "nope"})
    v.close()
    v = Volume.open(pm, url)
    assert v.exported() == {"A": "base", "B": "base", "C": ACTIVE}
    assert v.export_path("A") is None
    # releasing an exported PCPI drops it from the table
    v.snapshot_delete("base")
    assert v.exported() == {"C": ACTIVE}


def _run(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.add_commands(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_verbs(make_sim, capsys):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f"), R.Write(path="f", offset=0, data=b"x" * 10000)])
    fs.snapshot_create("s1")
    sim_apply(fs, "q", [R.Write(path="f", offset=0, data=b"y")])
    assert _run(["sim", "info", "--json", f"sim://{fs.path}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cp"] == fs.cp and info["data_disks"] == 3 and info["parity"] == "ok"
    assert [p["name"] for p in info["pcpis"]] == ["s1"] and info["pcpis"][0]["unique_blocks"] >= 1
    assert info["qtrees"] == ["q"] and len(info["disks"]) == 4
    assert _run(["sim", "info", fs.path]) == 0
    out = capsys.readouterr().out
    assert "PCPIs" in out and "s1" in out and "disk0" in out
    assert _run(["sim", "scrub", fs.path]) == 0
    assert _run(["sim", "fail-disk", fs.path, "2"]) == 0
    assert "disk2 failed" in capsys.readouterr().out
    assert _run(["sim", "info", "--json", fs.path]) == 0
    assert json.loads(capsys.readouterr().out)["failed_disk"] == "disk2"
    assert _run(["sim", "fail-disk", fs.path, "parity"]) == 4  # BackendError exit code
    assert "already failed" in capsys.readouterr().err
    assert _run(["sim", "scrub", fs.path]) == 3
    assert _run(["sim", "reconstruct", fs.path]) == 0
    assert "disk2 rebuilt" in capsys.readouterr().out
    assert _run(["sim", "scrub", "--json", fs.path]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["mismatches"] == [] and rep["block_map"] == []
    assert _run(["sim", "info", "/nonexistent/volume"]) == 4


def test_cli_hook_adds_the_sim_verbs():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    plugin_manager().hook.coalesce_cli_commands(subparsers=sub)
    args = p.parse_args(["sim", "scrub", "--repair", "/x"])
    assert args.repair and callable(args.func)
