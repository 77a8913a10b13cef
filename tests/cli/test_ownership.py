"""One owner per volume, as an operator meets it (docs/operations.md "One owner per volume", docs/config.md
"Volume URLs"): every refusal is an `error:` line, a `hint:` line and its exit code, and changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from groups import cli_group, fake_run_clock, run_cli, status

from coalesce_core.errors import ConfigError, MetadataError


def _config(tmp_path: Path, name: str, source: str, destination: str, meta: str) -> Path:
    cfg = tmp_path / f"{name}-{meta}.toml"
    cfg.write_text(
        f'[group]\nname = "{name}"\nsource = "{source}"\ndestination = "{destination}"\n'
        f'metadata = "{tmp_path}/{meta}"\n[[replica]]\nname = "A"\n'
    )
    return cfg


def _refused(p, code: int, *words: str) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode == code, p.stderr
    assert any(line.startswith("error:") for line in lines) and any(line.startswith("hint:") for line in lines)
    assert "internal error" not in p.stderr
    for word in words:
        assert word in p.stderr, (word, p.stderr)


def test_a_second_group_on_the_destination_and_a_same_named_group_on_the_source_are_refused(tmp_path):
    home, writer = cli_group(tmp_path, "home")
    writer.volume.close()
    assert run_cli(home, "run", "--once").returncode == 0
    work = _config(tmp_path, "work", f"sim://{tmp_path}/other", f"sim://{tmp_path}/dst", "meta-work")
    _refused(run_cli(work, "init"), ConfigError.exit_code, "belongs to group 'home'", "owners/destination")
    twin = _config(tmp_path, "home", f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst2", "meta-twin")
    _refused(run_cli(twin, "init"), ConfigError.exit_code, "already serves another group named 'home'")
    assert not (tmp_path / "meta-work").exists() or not list((tmp_path / "meta-work").glob("*.sqlite"))
    run = run_cli(home, "run", "--once")
    assert run.returncode == 0, run.stderr
    assert run_cli(home, "check").returncode == 0


def test_a_same_named_group_s_ledger_is_refused_with_exit_5(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, w1 = cli_group(tmp_path / "one", "home")
    two, w2 = cli_group(tmp_path / "two", "home")
    for w in (w1, w2):
        w.volume.close()
    for cfg in (one, two):
        assert run_cli(cfg, "run", "--once").returncode == 0
    ledger = tmp_path / "one" / "meta" / "home.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "two" / "meta" / "home.sqlite", ledger)
    for verb in (("run", "--once"), ("status",)):
        _refused(run_cli(one, *verb), MetadataError.exit_code, "not the ledger of the group", "own ledger back")


def test_a_destination_that_is_the_source_spelt_otherwise_is_refused(tmp_path):
    cfg = _config(tmp_path, "home", f"sim://{tmp_path}/x", f"sim://{tmp_path}/x/", "meta")
    _refused(run_cli(cfg, "init"), ConfigError.exit_code, "is the source", "volume of its own")
    assert not (tmp_path / "x").exists()  # nothing was created


def test_a_config_changed_to_a_same_named_group_s_source_is_refused_at_each_cycle(tmp_path, capsys, monkeypatch):
    """`run --once` exits 2 with the record's error and hint, `run` prints them at every cycle and goes on,
    `status` and `check` work and show why; the other group goes on as before."""
    from coalesce_core.ui import cli as cli_mod

    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    one, w1 = cli_group(tmp_path / "one", "home")
    two, w2 = cli_group(tmp_path / "two", "home")
    for w in (w1, w2):
        w.volume.close()
    for cfg in (one, two):
        assert run_cli(cfg, "run", "--once").returncode == 0
    two.write_text(two.read_text().replace(f"sim://{tmp_path}/two/src", f"sim://{tmp_path}/one/src"))
    taken = "already serves another group named 'home'"
    _refused(run_cli(two, "run", "--once"), ConfigError.exit_code, taken, "another [group] name")
    st = status(two)
    assert {r["state"] for r in st["replicas"]} == {"stable"}
    assert all(taken in r["last_error"] for r in st["replicas"])
    assert run_cli(two, "check").returncode == 0
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
    sleeps = fake_run_clock(monkeypatch, 7, waits=2)
    capsys.readouterr()
    rc = cli_mod.main(["--config", str(two), "run", "--interval", "7"])
    err = capsys.readouterr().err
    assert rc == cli_mod.EXIT_INTERRUPTED and max(sleeps) == cli_mod.AGENT_POLL
    assert err.count(f"error: source sim://{tmp_path}/one/src {taken}") == 2, err
    assert err.count("hint: give this group another [group] name") == 2
    assert "cycle failed" not in err and "internal error" not in err
    assert [r["consecutive_failures"] for r in status(two)["replicas"]] == [3, 3]
    run = run_cli(one, "run", "--once")
    assert run.returncode == 0, run.stderr
    assert run_cli(one, "check").returncode == 0
