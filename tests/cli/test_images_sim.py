"""`coalesce ls`, `diff`, `restore` and `pin` on the embedded sim backend, through the real command line
in subprocesses (the mem backend: tests/cli/test_images.py)."""

from __future__ import annotations

import json
from pathlib import Path

from groups import cli_group, run_cli


def _ok(cfg: Path, *args: str) -> str:
    p = run_cli(cfg, *args)
    assert p.returncode == 0, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def _meta(tmp_path: Path) -> dict[str, bytes]:
    """The group's metadata files (the ledger), their bytes; SQLite's shared-memory index left out."""
    files = {
        p.name: p.read_bytes() for p in (tmp_path / "meta").rglob("*") if p.is_file() and not p.name.endswith("-shm")
    }
    assert any(name.endswith((".db", ".sqlite")) or "ledger" in name for name in files), sorted(files)
    return files


def test_a_generation_on_sim_is_listed_diffed_restored_and_pinned(tmp_path: Path):
    cfg, writer = cli_group(tmp_path, "hist")
    writer.volume.close()
    cfg.write_text(cfg.read_text() + '[retention]\nkeep_min = "30d"\nmax = 1\n')
    _ok(cfg, "run", "--once", "-q")
    _ok(cfg, "run", "--once", "-q")
    (first,) = json.loads(_ok(cfg, "generations", "--json"))["generations"]
    _ok(cfg, "pin", str(first["id"]))
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "new.txt").write_text("new\n")
    _ok(cfg, "sim", "put", str(tmp_path / "src"), str(tmp_path / "host" / "new.txt"), "A")
    _ok(cfg, "run", "--once", "-q")
    _ok(cfg, "run", "--once", "-q")  # max = 1 would prune the first generation: pinned, it stays
    gens = json.loads(_ok(cfg, "generations", "--json"))["generations"]
    assert gens[0]["pcpi"] == first["pcpi"] and gens[0]["pinned"] and len(gens) == 2

    old = {e["path"] for e in json.loads(_ok(cfg, "ls", f"A@{first['id']}", "--json"))["entries"]}
    now = {e["path"] for e in json.loads(_ok(cfg, "ls", "A", "--json"))["entries"]}
    assert now - old == {"new.txt"}
    changes = json.loads(_ok(cfg, "diff", f"A@{first['id']}", "--json"))["changes"]
    assert {"path": "new.txt", "kind": "added"} in changes
    assert all(c["path"] in ("", "new.txt") for c in changes)  # the root's mtime at most besides

    before = _meta(tmp_path)
    _ok(cfg, "restore", "A@latest", "new.txt", "--to", str(tmp_path / "out"))
    assert (tmp_path / "out" / "new.txt").read_text() == "new\n"
    _ok(cfg, "restore", f"A@{first['id']}", "--to", str(tmp_path / "old"))
    assert not (tmp_path / "old" / "new.txt").exists()
    assert {str(p.relative_to(tmp_path / "old")) for p in (tmp_path / "old").rglob("*")} == old - {""}
    assert _meta(tmp_path) == before  # the ledger untouched
    refused = run_cli(cfg, "restore", "A@latest", "--to", str(tmp_path / "out"))
    assert refused.returncode == 1 and "hint" in refused.stderr
