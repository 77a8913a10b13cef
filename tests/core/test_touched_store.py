"""The touched paths of a large update, spilled to disk (coalesce_core.touched_store).

A Touched set past SPILL_PATHS keeps its nodes in a temporary SQLite database; every answer it
gives (paths, split, parts, part_of, moved, its length) and the check that reads it
(compare_touched: the same paths described in the same order, the same first difference) must
be the in-memory tree's.  Random record sequences over a few names (renames onto, into and out
of touched subtrees, names whose bytes sort around "/") are fed to both."""

from __future__ import annotations

import os

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce_core import touched_store
from coalesce_core import verify as V
from coalesce_core.stream import records as R
from coalesce_core.touched_store import TouchedStore
from coalesce_core.verify import Description, Touched, compare_touched

NAMES = ("a", "b", "a-b", "a0")
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


def _record(kind: str, p: str, q: str, n: int) -> object:
    if kind == "write":
        return R.Write(path=p, offset=n * 40000, data=b"x" * (1 + n * 9000))
    if kind == "truncate":
        return R.Truncate(path=p, size=n * 70000)
    if kind == "attr":
        return R.SetAttr(path=p, mode=0o600)
    if kind == "rename":
        return R.Rename(old=p, new=q)
    if kind == "link":
        return R.HardLink(path=p, existing=q)
    return {"mkfile": R.MkFile, "mkdir": R.MkDir, "unlink": R.Unlink, "rmdir": R.RmDir}[kind](path=p)


records = st.lists(
    st.builds(
        _record,
        st.sampled_from(
            ("write", "write", "truncate", "attr", "rename", "rename", "link", "mkfile", "mkdir", "unlink")
        ),
        paths,
        paths,
        st.integers(0, 5),
    ),
    min_size=1,
    max_size=25,
)


def _both(recs) -> tuple[Touched, Touched]:
    tree, spilled = Touched(), Touched(spill=TouchedStore, spill_at=0)
    for r in recs:
        tree.add(r)
        spilled.add(r)
    assert spilled.spilled and not tree.spilled
    return tree, spilled


def _image(tree: dict[str, Description]):
    return lambda batch: [
        attrs.evolve(tree[p], content=tree[p].content if c else None) if p in tree else Description.absent(p)
        for p, c in batch
    ]


def _tree(files: dict[str, str]) -> dict[str, Description]:
    out: dict[str, Description] = {}
    dirs: dict[str, set] = {"": set()}
    for path, data in files.items():
        parts = path.split("/")
        for i in range(len(parts)):
            parent, name = "/".join(parts[:i]), parts[i]
            if parent in out:
                break  # a file there already: this path is not in the image
            kind = "f" if i == len(parts) - 1 else "d"
            dirs.setdefault(parent, set()).add((name, kind))
            if kind == "d":
                dirs.setdefault("/".join(parts[: i + 1]), set())
        else:
            out[path] = Description(path=path, kind="f", size=len(data), content=data, mode=0o644)
    for d, entries in dirs.items():
        if d not in out:
            out[d] = Description(path=d, kind="d", mode=0o755, entries=tuple(sorted(entries)))
    return out


@settings(max_examples=150, deadline=None)
@given(recs=records)
def test_a_spilled_set_answers_as_the_tree(recs):
    tree, spilled = _both(recs)
    try:
        assert spilled.paths() == tree.paths()
        assert spilled.split() == tree.split()
        assert dict(spilled.parts()) == tree.parts()
        assert spilled.moved() == tree.moved()
        assert len(spilled) == len(tree)
        for p, _c in tree.paths():
            assert spilled.part_of(p) == tree.part_of(p), p
    finally:
        spilled.close()


@settings(max_examples=100, deadline=None)
@given(
    recs=records,
    files=st.dictionaries(paths, st.sampled_from(("1", "22")), max_size=6),
    wrong=st.dictionaries(paths, st.sampled_from(("1", "333")), max_size=3),
)
def test_the_check_of_a_spilled_set_describes_the_same_paths_and_finds_the_same_difference(recs, files, wrong):
    """I3: the replica image is the source's with a few files changed or added."""
    src, dst = _tree(files), _tree({**files, **wrong})
    tree, spilled = _both(recs)
    try:
        asked: dict[str, list] = {"tree": [], "spilled": []}

        def both(name):
            def describe_both(chunk):
                asked[name].append(list(chunk))
                return _image(src)(chunk), _image(dst)(chunk)

            return describe_both

        a = compare_touched(tree, both("tree"), batch=3)
        b = compare_touched(spilled, both("spilled"), batch=3)
        assert b == a
        flat = {k: [item for chunk in v for item in chunk] for k, v in asked.items()}
        assert flat["spilled"] == flat["tree"]
    finally:
        spilled.close()


def _temporary_databases() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "etilqs_" in target:
            out.append(target)
    return out


def test_a_large_set_spills_past_the_threshold_and_its_file_goes_with_the_process(monkeypatch):
    """Past SPILL_PATHS the nodes move to the store; its database is SQLite's private temporary
    one, unlinked as it is opened (a page cache of 64 KiB here, so it is written to), so no exit
    path, a kill included, leaves it behind; close releases it."""
    monkeypatch.setattr(V, "SPILL_PATHS", 100)
    monkeypatch.setattr(touched_store, "CACHE_KIB", 64)
    before = _temporary_databases()
    t = Touched(spill=TouchedStore)
    for i in range(98):
        t.add(R.MkFile(path=f"d/f{i:05d}"))
    assert not t.spilled
    for i in range(98, 3000):
        t.add(R.MkFile(path=f"d/f{i:05d}"))
    assert t.spilled
    assert len(t) == 3002  # the root, d and the files
    assert [p for p, _c in t.iter_paths(7)][:3] == ["", "d", "d/f00000"]
    held = [f for f in _temporary_databases() if f not in before]
    assert held and all(f.endswith("(deleted)") for f in held), held
    t.close()
    assert [f for f in _temporary_databases() if f not in before] == []
