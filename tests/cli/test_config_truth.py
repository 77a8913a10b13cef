"""The config is the truth (docs/operations.md, "Changing a group while it runs"): a replica removed from or changed
in the config is refused until `coalesce remove`/`coalesce add` reconcile it; never silently ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from groups import cli_group, run_cli, status

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume


@pytest.fixture
def sim_group(tmp_path: Path) -> Path:
    """An initialised two-replica group (A, B) on sim volumes, through one cycle; its config's path."""
    cfg, writer = cli_group(tmp_path, "truth")
    writer.volume.close()
    first = run_cli(cfg, "run", "--once", "--quiet")
    assert first.returncode == 0, first.stderr
    return cfg


def _drop_replica(cfg: Path, name: str) -> None:
    text = cfg.read_text()
    block = f'[[replica]]\nname = "{name}"\n'
    assert block in text
    cfg.write_text(text.replace(block, ""))


def _states(cfg: Path) -> dict[str, str]:
    return {r["name"]: r["state"] for r in status(cfg)["replicas"]}


def test_a_replica_removed_from_the_config_is_refused_until_coalesce_remove(sim_group: Path):
    cfg = sim_group
    _drop_replica(cfg, "B")
    refused = run_cli(cfg, "run", "--once")
    assert refused.returncode == 2, refused.stderr
    assert "error: replica 'B' is in the ledger but not in" in refused.stderr
    assert "hint:" in refused.stderr and "coalesce remove B" in refused.stderr
    assert _states(cfg) == {"A": "stable", "B": "stable"}  # nothing changed
    removed = run_cli(cfg, "remove", "B")
    assert removed.returncode == 0, removed.stderr
    assert "removed replica B" in removed.stdout and "its data stay" in removed.stdout
    assert _states(cfg) == {"A": "stable"}
    again = run_cli(cfg, "run", "--once")
    assert again.returncode == 0, again.stderr
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_changed_source_is_refused_naming_remove_and_add(sim_group: Path):
    cfg = sim_group
    text = cfg.read_text()
    cfg.write_text(text.replace('[[replica]]\nname = "A"\n', '[[replica]]\nname = "A"\nsource = "B"\n'))
    refused = run_cli(cfg, "run", "--once")
    assert refused.returncode == 2, refused.stderr
    assert "error: replica 'A' has source qtree 'A' in the ledger, 'B' in" in refused.stderr
    assert "coalesce remove A" in refused.stderr and "coalesce add A --source B" in refused.stderr
    cfg.write_text(text)
    assert run_cli(cfg, "run", "--once").returncode == 0


def test_remove_releases_the_pins_and_keeps_the_data(sim_group: Path, tmp_path: Path):
    """`coalesce remove` of a broken replica: its last good image (an individual PCPI) is released, its
    config block is gone, its destination qtree stays; a replica of that name can be added again."""
    cfg = sim_group
    assert run_cli(cfg, "break", "B").returncode == 0
    assert run_cli(cfg, "run", "--once", "--quiet").returncode == 3  # B outside the cycle
    pcpis = status(cfg)["pcpis"]  # B's last good image: the old base, now its individual PCPI
    assert any(p["role"] == "individual" for p in pcpis), pcpis
    removed = run_cli(cfg, "remove", "B")
    assert removed.returncode == 0, removed.stderr
    assert 'name = "B"' not in cfg.read_text()
    st = status(cfg)
    assert [r["name"] for r in st["replicas"]] == ["A"]
    assert not any(p["role"] == "individual" for p in st["pcpis"]), st["pcpis"]
    dst = Volume.open(plugin_manager(), f"sim://{tmp_path}/dst")
    try:
        assert "B" in dst.qtree_list()  # the data stay until the operator deletes them
    finally:
        dst.close()
    unknown = run_cli(cfg, "remove", "B")
    assert unknown.returncode == 6 and "no replica 'B'" in unknown.stderr
    assert run_cli(cfg, "add", "B").returncode == 0
    assert run_cli(cfg, "run", "--once", "--quiet").returncode == 0
    assert _states(cfg) == {"A": "stable", "B": "stable"}


def test_a_refused_add_or_remove_leaves_the_config_as_it_was(group, cli):
    """`add` and `remove` edit the config before the ledger; when the change is refused the config is put
    back, byte for byte.  A replica only the config names (added by hand, never run) is removed from the
    config alone."""
    tmp, _ = group
    cfg = tmp / "coalesce.toml"
    assert cli("init")[0] == 0 and cli("run", "--once", "-q")[0] == 0
    text = cfg.read_text()
    cfg.write_text(text.replace('[[replica]]\nname = "B"\nsource = "qb"\n', ""))  # B left the config by hand
    edited = cfg.read_text()
    rc, _, err = cli("add", "B", "--source", "other")  # the ledger's B replicates qb: refused
    assert rc == 6 and "already exists with source 'qb'" in err
    assert cfg.read_text() == edited
    rc, out, err = cli("add", "B", "--source", "qb")  # puts it back: reconciled
    assert rc == 0, err
    assert cli("run", "--once", "-q")[0] == 0
    cfg.write_text(cfg.read_text() + '\n[[replica]]\nname = "C"\nsource = "qc"\n')  # never run
    rc, out, err = cli("remove", "C")
    assert rc == 0 and "the group had not added it yet" in out, err
    assert 'name = "C"' not in cfg.read_text()
    assert [r["name"] for r in json.loads(cli("status", "--json")[1])["replicas"]] == ["A", "B"]
