"""`coalesce ls`, `diff`, `restore`, `pin`/`unpin`: reading, copying and keeping retained coalesced
generations, on the mem backend (the sim backend: tests/cli/test_images_sim.py)."""

from __future__ import annotations

import json


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
