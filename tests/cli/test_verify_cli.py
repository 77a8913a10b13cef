"""`coalesce verify`: a good export passes, a deliberately damaged one is found; read-only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import coalesce_mem
from coalesce_mem.tree import File


def _damage(tmp: Path, replica: str, mutate) -> str:
    """Change the image ``replica`` exports in the file-backed destination (a copy of its state,
    so the active FS and other PCPIs keep theirs); returns the damaged PCPI."""
    vol = coalesce_mem.volume_for(f"mem://{tmp}/dst.vol", create=False)
    with vol.lock:
        vol._sync()
        pcpi = vol.exports[replica]
        assert pcpi is not None, f"{replica} exports no PCPI to damage"
        state = vol.snapshots[pcpi][replica].thaw()
        mutate(state.root)
        state.frozen = True
        vol.snapshots[pcpi] = {**vol.snapshots[pcpi], replica: state}
        vol.persist()
    return pcpi


def _ledger_bytes(tmp: Path) -> dict[str, str]:
    """The ledger's files (an empty write-ahead log that SQLite makes when it opens one is nothing)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tmp.glob("dst.vol.coalesce/*"))
        if p.is_file() and not p.name.endswith("-shm") and p.stat().st_size  # (owners/: the volume's owner records)
    }


def test_a_good_export_passes_and_the_json_validates(cycled, cli, validate_json):
    tmp, writer = cycled
    before = _ledger_bytes(tmp)
    rc, out, err = cli("verify", "--full", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    validate_json(rows, "verify")
    assert [(r["replica"], r["result"], r["full"]) for r in rows] == [("A", "ok", True), ("B", "ok", True)]
    assert all(r["checked"] > 5 and r["differences"] == [] and r["source_point"] for r in rows)
    rc, out, _ = cli("verify", "B")
    assert rc == 0 and "B ok" in out and "A " not in out
    assert _ledger_bytes(tmp) == before  # read-only: the ledger is as it was


def test_a_damaged_export_is_found_and_named(group, cli, validate_json):
    tmp, writer = group
    cli("init")
    assert cli("run", "--once", "-q")[0] == 0
    rel = next(p for p, (k, _v) in sorted(writer.trees["A"].items()) if k == "f")
    parts = rel.split("/")

    def flip(root):
        node = root
        for part in parts:
            node = node.children[part]
        assert isinstance(node, File)
        node.data[0] ^= 0xFF  # same size, same times: only the bytes differ

    _damage(tmp, "A", flip)
    rc, out, _ = cli("verify", "--json")  # without --full the bytes are not read
    assert rc == 0 and {r["result"] for r in json.loads(out)} == {"ok"}
    rc, out, _ = cli("verify", "--full", "--json")
    rows = json.loads(out)
    validate_json(rows, "verify")
    assert rc == 1
    a, b = rows
    assert (a["result"], b["result"]) == ("differs", "ok")
    assert [(d["path"], d["field"]) for d in a["differences"]] == [(rel, "content")]
    assert a["differences"][0]["message"].startswith(f"{rel!r}: content is digest ")
    rc, out, _ = cli("verify", "--full")
    assert rc == 1 and "A differs" in out and f"{rel!r}: content" in out

    _damage(tmp, "B", lambda root: setattr(root.children[sorted(root.children)[0]], "mode", 0o700))
    rc, out, _ = cli("verify", "B", "--json")
    (b,) = json.loads(out)
    assert rc == 1 and b["result"] == "differs" and b["differences"][0]["field"] == "mode"
    assert b["differences"][0]["source"] != b["differences"][0]["replica"] == 0o700


def test_unknown_replicas_and_replicas_without_an_image(group, cli):
    tmp, _writer = group
    cli("init")
    rc, out, _ = cli("verify", "--json")  # nothing exported yet
    assert rc == 0 and {r["result"] for r in json.loads(out)} == {"skipped"}
    rc, _out, err = cli("verify", "nope")
    assert rc == 6 and "no replica 'nope'" in err
