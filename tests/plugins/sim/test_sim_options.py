"""A mistyped sim volume option is a user mistake: an `error:` and a `hint:` line, never `internal error`."""

from __future__ import annotations

import pytest

from coalesce_core.ui import cli


@pytest.mark.parametrize("query", ["disks=abc", "disks=0", "disks=99", "size=lots", "colour=red"])
def test_a_bad_sim_option_is_an_error_with_a_hint(tmp_path, capsys, query):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[group]\nname = "g"\nsource = "sim://{tmp_path}/src"\ndestination = "sim://{tmp_path}/dst?{query}"\n'
        '[[replica]]\nname = "A"\n'
    )
    rc = cli.main(["--config", str(cfg), "init"])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "error:" in err and "hint:" in err and "internal error" not in err
    assert query.split("=")[0] in err


def test_init_never_formats_a_sim_volume_over_a_directory_of_files(tmp_path, capsys):
    """`coalesce init` creates the destination volume: in a directory of user files that must be refused
    (the files stay as they were), not formatted over them."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "thesis.tex").write_text("years of work")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[group]\nname = "g"\nsource = "sim://{tmp_path}/src"\ndestination = "sim://{dst}"\n')
    rc = cli.main(["--config", str(cfg), "init"])
    err = capsys.readouterr().err
    assert rc == 4 and "is not empty and holds no sim volume" in err and "hint:" in err
    assert sorted(p.name for p in dst.iterdir()) == ["thesis.tex"]
    assert (dst / "thesis.tex").read_text() == "years of work"
