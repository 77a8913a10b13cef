"""Directories kept as sorted blocks and changed a block at a time (coalesce_sim.dirblocks)."""

from __future__ import annotations

import random

from coalesce_core.stream import records as R
from coalesce_sim import diff as D
from coalesce_sim import ops
from coalesce_sim.dirblocks import BS, block_entries, encode_dir, fsname
from coalesce_sim.fs import DIR
from coalesce_sim.testing import reopen, sim_apply


def _dir(fs, path: str):
    """The committed inode record of directory ``q/path``."""
    v = fs.view()
    ino = v.qtree_root("q")
    for part in filter(None, path.split("/")):
        ino = v.dir(v.existing(ino))[part]
    rec = v.existing(ino)
    assert rec.kind == DIR
    return rec


def _blocks(fs, rec) -> list[tuple[int, list[tuple[bytes, int]]]]:
    """(block number, entries) of each block of a committed directory."""
    return [(vbn, list(block_entries(fs.read(vbn)))) for _f, vbn in fs.leaves(rec.top, rec.height)]


def _check_layout(fs, rec, want: dict[str, int]) -> None:
    """The directory holds ``want``, sorted by the bytes of the names across its blocks, none empty,
    its size its number of blocks, and the block map agrees with the trees."""
    blocks = _blocks(fs, rec)
    names = [n for _v, ents in blocks for n, _i in ents]
    assert all(ents for _v, ents in blocks)
    assert names == sorted(fsname(n) for n in want)
    assert rec.size == len(blocks) * BS
    assert fs.view().dir(rec) == want
    assert fs.fsck() == []


def test_random_changes_over_many_cps_keep_a_sorted_directory_equal_to_a_model(make_sim):
    fs = make_sim()
    fs.OVERLAY_INODES = 64  # a CP every 64 inodes: the changes span many CPs
    rng = random.Random(7)
    model: dict[str, int] = {}
    sim_apply(fs, "q", [R.MkDir(path="big")])
    for _round in range(6):
        recs: list[object] = []
        for _ in range(700):
            name = f"n{rng.randrange(3000):05d}" + "x" * rng.randrange(40)
            if name in model or (model and rng.random() < 0.4):
                victim = name if name in model else rng.choice(sorted(model))
                recs.append(R.Unlink(path=f"big/{victim}"))
                del model[victim]
            else:
                recs.append(R.MkFile(path=f"big/{name}"))
                model[name] = 0
        sim_apply(fs, "q", recs)
        rec = _dir(fs, "big")
        got = fs.view().dir(rec)
        assert set(got) == set(model)
        model = got
        _check_layout(fs, rec, model)
    fs = reopen(fs)
    _check_layout(fs, _dir(fs, "big"), model)


def test_a_directory_packed_full_by_the_former_encoder_opens_and_changes(make_sim):
    """The layout is the one sim always wrote (entries sorted, never split across a block); a
    directory created in one CP is still packed full, byte for byte as the former encoder packed it,
    and one written block by block reads back the same way."""
    fs = make_sim()
    names = [f"f{i:05d}" for i in range(2000)]
    sim_apply(fs, "q", [R.MkDir(path="big")] + [R.MkFile(path=f"big/{n}") for n in names])
    rec = _dir(fs, "big")
    entries = fs.view().dir(rec)
    assert [fs.read(v) for _f, v in fs.leaves(rec.top, rec.height)] == encode_dir(entries)
    fs = reopen(fs)
    sim_apply(fs, "q", [R.Unlink(path="big/f00007"), R.MkFile(path="big/f00007a"), R.MkFile(path="big/zz")])
    entries = {k: v for k, v in entries.items() if k != "f00007"}
    got = fs.view().dir(_dir(fs, "big"))
    assert set(got) == set(entries) | {"f00007a", "zz"}
    _check_layout(fs, _dir(fs, "big"), got)


def test_a_change_to_one_entry_rewrites_one_block_of_a_large_directory(make_sim):
    fs = make_sim()
    names = [f"f{i:05d}" for i in range(3000)]  # 13 bytes an entry: about 10 blocks
    sim_apply(fs, "q", [R.MkDir(path="big")] + [R.MkFile(path=f"big/{n}") for n in names])
    before = _blocks(fs, _dir(fs, "big"))
    assert len(before) >= 8
    sim_apply(fs, "q", [R.Unlink(path="big/f01500")])
    after = _blocks(fs, _dir(fs, "big"))
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a[0] != b[0]]
    assert len(changed) == 1
    i = changed[0]
    assert [n for n, _ in before[i][1] if n != b"f01500"] == [n for n, _ in after[i][1]]


def test_a_lookup_reads_a_few_blocks_and_decodes_none_whole(make_sim, monkeypatch):
    """A name is found by a binary search over the first entries of the blocks, then one block."""
    fs = make_sim()
    names = [f"f{i:05d}" for i in range(6000)]  # about 20 blocks
    sim_apply(fs, "q", [R.MkDir(path="big")] + [R.MkFile(path=f"big/{n}") for n in names])
    nblocks = len(_blocks(fs, _dir(fs, "big")))
    q = fs.view().qtree_root("q")
    monkeypatch.setattr(D.View, "dir", lambda *a: (_ for _ in ()).throw(AssertionError("decoded whole")))
    big = fs.a_dir(fs.a_dir(q).get("big"))
    reads = fs.stats["block_reads"]
    assert big.get("f03333") is not None and big.get("f03333x") is None and big.get("a") is None
    assert fs.stats["block_reads"] - reads <= 3 * (nblocks.bit_length() + 1)
    assert fs.dirty_bytes == 0  # looked up, not decoded for a change


def test_decoded_blocks_count_as_dirty_data_and_a_split_keeps_the_order(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkDir(path="d")] + [R.MkFile(path=f"d/{i:04d}") for i in range(500)])  # 10 bytes each
    q = fs.view().qtree_root("q")
    d = fs.a_dir(fs.a_dir(q).get("d"))
    assert len(d.slots) == 2
    fs.dirty_bytes = 0
    d.remove("0001")  # decodes the first block (packed full)
    assert fs.dirty_bytes == BS and d.get("0001") is None
    for i in range(400):  # the first block overflows and splits, again and again
        d.set(f"0000b{i:03d}", 6)
    assert fs.dirty_bytes >= 3 * BS
    names = [n for n, _ in d.items()]
    assert names == sorted(names, key=fsname) and len(names) == 899
    assert d.get("0000b123") == 6 and d.get("0499") is not None


def test_purging_a_purgatory_of_many_entries_over_many_cps(make_sim):
    fs = make_sim()
    fs.OVERLAY_INODES = 100
    names = [f"f{i:05d}" for i in range(2500)]
    sim_apply(fs, "q", [R.MkDir(path="d")] + [R.MkFile(path=f"d/{n}") for n in names])
    sim_apply(fs, "q", [R.Unlink(path=f"d/{n}") for n in names], use_purgatory=True)
    q = fs.view().qtree_root("q")
    purg = fs.view().existing(q).purg
    assert len(fs.view().dir(fs.view().existing(purg))) == 2500
    cps = fs.stats["cps"]
    fs.purge_purgatory(["q"])
    assert fs.stats["cps"] - cps >= 20  # past the overlay's bounds, a CP at a time
    assert fs.view().existing(q).purg == 0 and fs.view().inode(purg) is None
    assert D.tree_dict(fs, "q") == {"d": D.tree_dict(fs, "q")["d"]} and fs.fsck() == []


def test_destroying_a_directory_walks_its_blocks(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkDir(path="d")] + [R.MkFile(path=f"d/{i:04d}") for i in range(1000)])
    q = fs.view().qtree_root("q")
    d = fs.a_dir(q).get("d")
    sub = ops.subtree(fs, d)
    assert len(sub) == 1001 and sub[0] == d


def test_a_directory_past_512_blocks_moves_its_blocks_and_keeps_the_indirect_blocks_it_can(make_sim):
    """A tree of height 3 (more than 512 blocks of entries): removing the names of a block moves
    every block after it (new indirect blocks), a change in the last block keeps the indirect block
    over the first 512."""
    fs = make_sim()
    long = "x" * 240
    names = [f"{i:05d}{long}" for i in range(8400)]  # 251 bytes an entry: 16 a block, 525 blocks
    sim_apply(fs, "q", [R.MkDir(path="big")] + [R.MkFile(path=f"big/{n}") for n in names])
    rec = _dir(fs, "big")
    assert rec.height == 3
    model = fs.view().dir(rec)
    _check_layout(fs, rec, model)
    sim_apply(fs, "q", [R.Unlink(path=f"big/{n}") for n in names[:40]])  # the first blocks go
    for n in names[:40]:
        del model[n]
    rec = _dir(fs, "big")
    _check_layout(fs, rec, model)
    first_indirect = fs.ptrs(rec.top)[0]
    sim_apply(fs, "q", [R.MkFile(path="big/zzz")])
    model["zzz"] = fs.view().dir(_dir(fs, "big"))["zzz"]
    rec = _dir(fs, "big")
    assert fs.ptrs(rec.top)[0] == first_indirect
    _check_layout(fs, rec, model)
