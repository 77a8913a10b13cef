"""`coalesce ls`, `diff`, `restore`, `pin`/`unpin`: reading, copying and keeping retained coalesced
generations, on the mem backend (the sim backend: tests/cli/test_images_sim.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _retaining(group, cli) -> None:
    """``group`` through three cycles keeping every generation: the bases of cycles 1 and 2 are
    generations (A's dir0/file0 changed in cycle 2), cycle 3's is the base."""
    tmp, writer = group
    cfg = tmp / "coalesce.toml"
    cfg.write_text(cfg.read_text() + '\n[retention]\nkeep_min = "30d"\nmax = 20\n')
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    writer.write("A", "dir0/file0", b"changed" * 50)
    assert cli("run", "--once", "-q")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0


def _gens(cli) -> list[dict]:
    return json.loads(cli("generations", "--json")[1])["generations"]


def test_ls_lists_a_generation_the_base_and_a_subtree(group, cli):
    _retaining(group, cli)
    first, second = _gens(cli)
    rc, out, err = cli("ls", f"A@{first['id']}", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["pcpi"] == first["pcpi"]
    paths = [e["path"] for e in doc["entries"]]
    assert paths[0] == "" and "dir0/file0" in paths
    old = next(e for e in doc["entries"] if e["path"] == "dir0/file0")
    base = json.loads(cli("ls", "A", "dir0", "--json")[1])
    assert all(e["path"].startswith("dir0") for e in base["entries"])
    new = next(e for e in base["entries"] if e["path"] == "dir0/file0")
    assert new["size"] == len(b"changed" * 50) != old["size"]
    rc, out, _ = cli("ls", "A@latest", "dir0/file0")
    assert rc == 0 and out.split()[-1] == "dir0/file0" and out.startswith("file")


def test_ls_an_iso_time_means_the_newest_at_or_before_it(group, cli):
    from datetime import UTC, datetime

    _retaining(group, cli)
    first, second = _gens(cli)
    at = datetime.fromtimestamp(second["time"], UTC).isoformat()
    assert json.loads(cli("ls", f"B@{at}", "--json")[1])["pcpi"] == second["pcpi"]
    rc, _, err = cli("ls", "B@1970-01-01T00:00")
    assert rc == 6 and "no generation taken at or before" in err and "hint" in err


def test_ls_unknown_replica_generation_or_path_is_an_error_with_a_hint(group, cli):
    _retaining(group, cli)
    for args, says in (
        (("ls", "Z@latest"), "no replica 'Z'"),
        (("ls", "A@999999"), "no generation 999999"),
        (("ls", "A@yesterday"), "not a generation id"),
        (("ls", "A", "no/such"), "no/such is not in replica"),
    ):
        rc, out, err = cli(*args)
        assert rc == 6, (args, out, err)
        assert says in err and "hint" in err and "Traceback" not in err


def test_diff_names_what_changed_between_two_generations_and_to_the_base(group, cli):
    _retaining(group, cli)
    first, second = _gens(cli)
    rc, out, err = cli("diff", f"A@{first['id']}", f"A@{second['id']}", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["from"], doc["to"]) == (first["pcpi"], second["pcpi"])
    assert "dir0/file0" in {c["path"] for c in doc["changes"]}
    assert {c["kind"] for c in doc["changes"] if c["path"] == "dir0/file0"} <= {"modified", "replaced"}
    rc, out, _ = cli("diff", f"A@{first['id']}")  # to the base: the same change
    assert rc == 0 and any(line.endswith(" dir0/file0") for line in out.splitlines())
    rc, out, _ = cli("diff", f"B@{first['id']}", "--json")  # B did not change
    assert rc == 0 and json.loads(out)["changes"] == []
    rc, out, _ = cli("diff", f"A@{second['id']}", "A@latest")
    assert rc == 0 and out == ""


def test_diff_of_two_replicas_or_an_unknown_generation_is_an_error(group, cli):
    _retaining(group, cli)
    rc, _, err = cli("diff", "A@latest", "B")
    assert rc == 6 and "one replica" in err and "hint" in err
    rc, _, err = cli("diff", "A@424242")
    assert rc == 6 and "no generation 424242" in err


def _volumes(tmp):
    """The ledger's bytes and the destination's PCPIs, read beside the CLI."""
    from coalesce_core.agent import Agent
    from coalesce_core.config import load_config

    with Agent.open(load_config(str(tmp / "coalesce.toml")), readonly=True) as agent:
        return Path(agent.ledger.path).read_bytes(), set(agent.dest.snapshot_list())


def _fingerprint(tmp, qtree: str, pcpi: str) -> str:
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume

    dst = Volume.open(plugin_manager(), f"mem://{tmp}/dst.vol")
    try:
        return dst.fingerprint(qtree, pcpi)
    finally:
        dst.close()


def test_restore_copies_an_image_out_and_changes_nothing_of_the_group(group, cli):
    from coalesce_posix import walk

    tmp, _ = group
    _retaining(group, cli)
    first, _second = _gens(cli)
    before = _volumes(tmp)
    rc, out, err = cli("restore", f"A@{first['id']}", "--to", str(tmp / "out"))
    assert rc == 0, err
    assert "restored replica A" in out
    assert walk.fingerprint(str(tmp / "out")) == _fingerprint(tmp, "A", first["pcpi"])
    assert (tmp / "out" / "dir0" / "file0").read_bytes() != b"changed" * 50  # the old image
    rc, _, err = cli("restore", "A@latest", "dir0/file0", "--to", str(tmp / "one"))
    assert rc == 0, err
    assert (tmp / "one" / "dir0" / "file0").read_bytes() == b"changed" * 50
    assert sorted(p.name for p in (tmp / "one").iterdir()) == ["dir0"]
    assert sorted(p.name for p in (tmp / "one" / "dir0").iterdir()) == ["file0"]
    assert _volumes(tmp) == before


def test_restore_refuses_a_non_empty_directory_and_an_unknown_path(group, cli):
    tmp, _ = group
    _retaining(group, cli)
    (tmp / "full").mkdir()
    (tmp / "full" / "mine").write_text("keep me")
    rc, _, err = cli("restore", "A@latest", "--to", str(tmp / "full"))
    assert rc == 1 and "not an empty directory" in err and "hint" in err
    assert [p.name for p in (tmp / "full").iterdir()] == ["mine"]
    rc, _, err = cli("restore", "A@latest", "no/such", "--to", str(tmp / "new"))
    assert rc == 6 and "not in replica" in err and not (tmp / "new").exists()


def test_pin_keeps_a_generation_past_max_until_unpin(group, cli):
    """max = 1: each jump-ahead prunes all but the newest generation, unless one is pinned."""
    tmp, writer = group
    cfg = tmp / "coalesce.toml"
    cfg.write_text(cfg.read_text() + '\n[retention]\nkeep_min = "30d"\nmax = 1\n')
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    (first,) = _gens(cli)
    rc, out, err = cli("pin", str(first["id"]))
    assert rc == 0, err
    assert "is pinned" in out
    for _ in range(2):
        assert cli("run", "--once", "-q")[0] == 0
    gens = _gens(cli)
    assert [g["pcpi"] for g in gens][0] == first["pcpi"] and len(gens) == 2
    assert gens[0]["pinned"] and not gens[1]["pinned"]
    rc, out, _ = cli("generations")
    assert rc == 0 and "pinned" in " ".join(out.split())
    assert cli("ls", f"A@{first['id']}")[0] == 0  # still readable
    rc, out, err = cli("unpin", "latest")  # not pinned: unpinning changes nothing, says so
    assert rc == 0 and "no longer pinned" in out
    rc, out, err = cli("unpin", str(first["id"]))  # at rest: max = 1 prunes it at once
    assert rc == 0, err
    assert "no longer pinned, and pruned" in " ".join(out.split())
    assert first["pcpi"] not in {g["pcpi"] for g in _gens(cli)}
    rc, _, err = cli("pin", str(first["id"]))
    assert rc == 6 and f"no generation {first['id']}" in err and "hint" in err


def test_restore_of_a_subtree_names_a_hard_link_whose_other_name_is_outside_it(group, cli):
    from coalesce_core.stream import records as R

    tmp, writer = group
    _retaining(group, cli)
    writer.volume.apply(
        "A",
        R.framed("A", None, "test", [R.MkDir(path="sub"), R.HardLink(path="sub/link", existing="dir0/file0")]),
        use_purgatory=False,
    )
    assert cli("run", "--once", "-q")[0] == 0
    rc, out, err = cli("restore", "A", "sub", "--to", str(tmp / "sub"))
    assert rc == 0, err
    assert "not restored: sub/link" in " ".join(out.split())
    assert (tmp / "sub" / "sub").is_dir() and not (tmp / "sub" / "sub" / "link").exists()
    rc, _, err = cli("restore", "A", "--to", str(tmp / "all"))  # the whole image keeps the link
    assert rc == 0, err
    assert (tmp / "all" / "sub" / "link").stat().st_ino == (tmp / "all" / "dir0" / "file0").stat().st_ino
