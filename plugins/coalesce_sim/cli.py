"""`coalesce sim`: make, fill, read, inspect and damage a sim volume.

``mkfs`` formats a volume; ``put`` copies host files into a qtree (a source); ``ls``, ``cat``
and ``get`` read the active file system, a PCPI (``--pcpi``) or what each replica exports
(``--export``) without a lock and without writing (:mod:`.reader`: beside a running agent too);
``info`` shows the volume; ``fail-disk``, ``reconstruct`` and ``scrub`` damage, rebuild and check
its RAID-4.  The verbs that change the volume or read every stripe need it to themselves
(:mod:`.volumelock`).  Each verb takes the volume as ``sim:///dir`` or a plain directory path
and sets ``func(args) -> exit code``; every user mistake is an ``error:`` and a ``hint:`` line.
The views are pure builders (``info_view``); ``--json`` prints plain data instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

from coalesce_core.errors import BackendError, CoalesceError, HostilePath
from coalesce_core.ui.errors import report_error

from .fs import BS, DIR, LNK, Inode, SimFS, View


def _location(text: str) -> str:
    return text[len("sim://") :] if text.startswith("sim://") else text


def _path_and_query(text: str) -> tuple[str, str]:
    path, _, q = _location(text).partition("?")
    return os.path.abspath(path), q


def _open(text: str):
    from . import open_sim

    path, q = _path_and_query(text)
    _volume_dir(path)  # a missing volume: the hint names mkfs
    return open_sim(path + (f"?{q}" if q else ""), create=False)


def _close(fs) -> None:
    from . import close_sim

    close_sim(fs)


def _volume_dir(text: str) -> str:
    """The directory of an existing sim volume (the read verbs open it themselves, read-only)."""
    path, _q = _path_and_query(text)
    if not os.path.exists(os.path.join(path, "raid.json")):
        raise BackendError(
            f"no sim volume at {path}",
            hint=f"create one with `coalesce sim mkfs {path}` (or `coalesce init` with sim://{path})",
        )
    return path


def info_view(info: dict[str, Any]):
    """A rich renderable of `info` (pure: builds, does not print)."""
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("volume", info["path"])
    head.add_row(
        "RAID-4",
        f"{info['data_disks']} data + 1 parity, {info['block_size']} B blocks, "
        f"parity {info['parity']}" + (f" ({info['failed_disk']} failed)" if info["failed_disk"] else ""),
    )
    head.add_row("consistency point", str(info["cp"]))
    space = f"{info['used_blocks']} blocks used, {info['stripes']} stripes ({info['free_stripes']} free)"
    if info["free_blocks"] is not None:
        space += f", {info['free_blocks']} blocks free of {info['max_stripes']} stripes"
    head.add_row("space", space)
    head.add_row("active FS", f"{info['active_blocks']} blocks, {info['inodes']} inode slots")
    head.add_row("PCPIs", f"{len(info['pcpis'])} / {info['max_pcpis']}")
    head.add_row("qtrees", ", ".join(info["qtrees"]) or "-")
    disks = Table(title="disks")
    for c in ("disk", "role", "state", "stripes"):
        disks.add_column(c)
    for d in info["disks"]:
        disks.add_row(
            d["disk"], d["role"], f"[red]{d['state']}[/]" if d["state"] != "ok" else d["state"], str(d["stripes"])
        )
    pc = Table(title="PCPIs")
    for c in ("name", "CP", "taken", "blocks referenced", "unique (freed on release)"):
        pc.add_column(c)
    for p in info["pcpis"]:
        taken = datetime.datetime.fromtimestamp(p["time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        pc.add_row(
            p["name"], str(p["cp"]), taken, "-" if p["blocks"] is None else str(p["blocks"]), str(p["unique_blocks"])
        )
    ex = Table(title="exports")
    ex.add_column("replica")
    ex.add_column("exports")
    for r, s in sorted(info["exports"].items()):
        ex.add_row(r, str(s))
    return Group(head, disks, pc, ex)


def cmd_info(args: argparse.Namespace) -> int:
    from .reader import Image, read_volume

    image = Image()

    def read(fs: SimFS) -> dict[str, Any]:
        image.read.add(None)  # the block map walks every image, the active file system too
        fs.derive_block_map()
        return fs.info()

    info = read_volume(
        _volume_dir(args.volume),
        image,
        read,
        hint="info walks every image, the active file system too: run it again between the agent's cycles",
    )
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        from rich.console import Console

        Console().print(info_view(info))
    return 0


def _alone(args: argparse.Namespace, verb: str, work: Callable[[Any], Any]) -> Any:
    """``work(fs)`` on the volume, held alone (refused while another process has it open)."""
    fs = _open(args.volume)
    try:
        with fs.raid.lock.exclusive(verb):
            return work(fs)
    finally:
        _close(fs)


def cmd_mkfs(args: argparse.Namespace) -> int:
    from . import open_sim

    path, _q = _path_and_query(args.volume)
    if os.path.exists(os.path.join(path, "raid.json")):
        raise BackendError(
            f"{path} already holds a sim volume",
            hint="use it as it is; to start over, remove the directory first (its PCPIs and replicas go with it)",
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise BackendError(f"{path} is a file, not a directory", hint="name a new or empty directory")
    if not 1 <= args.disks <= 32:
        raise BackendError(f"--disks {args.disks}: a sim volume has 1 to 32 data disks", hint="write e.g. --disks 3")
    if args.size:
        from .volume import _parse_size

        try:
            _parse_size(args.size)
        except BackendError:
            raise BackendError(
                f"--size {args.size!r} is not a size", hint="write e.g. --size 64M or --size 1G"
            ) from None
    query = f"disks={args.disks}" + (f"&size={args.size}" if args.size else "")
    fs = open_sim(f"{path}?{query}", create=True)  # refuses a directory that holds files
    try:
        n = fs.raid.ndata
    finally:
        _close(fs)
    size = f", at most {args.size}" if args.size else ", growing as blocks are allocated"
    print(f"formatted sim volume {path}: {n} data disks + 1 parity disk{size}")
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    from coalesce_core.stream import records as R

    from .hostfiles import put_records
    from .reader import split

    qtree, into = _split(args.dest, split)
    for src in args.sources:
        if not os.path.lexists(src):
            raise BackendError(f"no {src!r} on this host", hint="name existing files or directories to put")
        if not os.path.basename(os.path.abspath(src)):
            raise BackendError("cannot put the root directory as an entry", hint="put the directories below it")
    skipped: list[str] = []

    def put(fs) -> tuple[dict[str, int], int]:
        exports = fs.exports()
        if qtree in exports:
            raise BackendError(
                f"qtree {qtree!r} of {fs.path} is a replica (the volume exports it as {exports[qtree]}): "
                "what is put there would be undone by its next update",
                hint="put files into the source volume's qtree; coalesce replicates them here",
            )
        make = _missing_dirs(fs.view(), qtree, into)
        counts = fs.apply(qtree, R.framed(qtree, None, "put", put_records(args.sources, into, make, skipped)), False)
        return counts, fs.cp

    counts, cp = _alone(args, "put", put)
    for src in skipped:
        print(f"skipped {src}: not a file, directory or symlink", file=sys.stderr)
    where = f"{qtree}/{into}" if into else qtree
    print(
        f"put {len(args.sources)} path(s) into {where}: {counts['records']} records, {counts['bytes']} bytes (CP {cp})"
    )
    return 0


def _split(text: str, split: Callable[[str], tuple[str, str]]) -> tuple[str, str]:
    try:
        return split(text)
    except HostilePath as exc:
        raise BackendError(
            f"{text!r} is not a path in a qtree: {exc.message}",
            hint="write QTREE or QTREE/dir/name, without '.', '..' or empty components",
        ) from None


def _missing_dirs(view: View, qtree: str, into: str) -> list[str]:
    """The directories of ``into`` that the qtree lacks (parents first); refuses a non-directory on the way."""
    parts = [p for p in into.split("/") if p]
    ino = view.qtree_root(qtree)
    if ino is None:
        return ["/".join(parts[: i + 1]) for i in range(len(parts))]
    rec = view.existing(ino)
    for i, part in enumerate(parts):
        child = view.dir(rec).get(part)
        crec = view.inode(child) if child is not None else None
        if crec is None:
            return ["/".join(parts[: j + 1]) for j in range(i, len(parts))]
        if crec.kind != DIR:
            raise BackendError(
                f"{qtree}/{'/'.join(parts[: i + 1])} is not a directory", hint="put into a directory, or a new path"
            )
        rec = crec
    return []


def _image(args: argparse.Namespace):
    from .reader import Image

    return Image(pcpi=args.pcpi, exported=args.export)


def _row(name: str, rec: Inode, view: View) -> dict[str, Any]:
    from .reader import KINDS

    row = {
        "name": name,
        "kind": KINDS[rec.kind],
        "mode": rec.mode & 0o7777,
        "uid": rec.uid,
        "gid": rec.gid,
        "size": rec.size,
        "mtime_ns": rec.mtime,
    }
    if rec.kind == LNK:
        row["target"] = view.data(rec).decode("utf-8", "surrogateescape")
    return row


def cmd_ls(args: argparse.Namespace) -> int:
    from .reader import entries, read_volume, resolve, split

    image = _image(args)
    target = _split(args.path, split) if args.path else None

    def read(fs: SimFS) -> list[dict[str, Any]]:
        if target is None:
            if args.export:
                return [{"name": r, "kind": "d", "exports": p} for r, p in sorted(fs.exports().items())]
            view = fs.view(image.pcpi)
            image.read.add(image.pcpi)
            return [_row(q, view.existing(ino), view) for q in view.qtrees() if (ino := view.qtree_root(q))]
        qtree, rest = target
        view = image.view(fs, qtree)
        _ino, rec = resolve(view, qtree, rest, image.label(qtree))
        if rec.kind != DIR:
            return [_row((rest or qtree).rsplit("/", 1)[-1], rec, view)]
        return [_row(name, crec, view) for name, _i, crec in entries(view, rec)]

    rows = read_volume(_volume_dir(args.volume), image, read)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for r in rows:
        if not args.long:
            print(r["name"])
            continue
        if "exports" in r:
            print(f"{r['name']}\t{r['exports']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["mtime_ns"] / 1e9))
        link = f" -> {r['target']}" if "target" in r else ""
        print(f"{r['kind']} {r['mode']:04o} {r['uid']}:{r['gid']} {r['size']:>12} {when} {r['name']}{link}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    import tempfile

    from .reader import read_volume, resolve, split

    image = _image(args)
    qtree, rest = _split(args.path, split)
    out = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # written out once the read proved intact

    def read(fs: SimFS) -> None:
        out.seek(0)
        out.truncate()
        view = image.view(fs, qtree)
        _ino, rec = resolve(view, qtree, rest, image.label(qtree))
        if rec.kind == DIR:
            raise BackendError(
                f"{args.path!r} is a directory", hint="list it with `coalesce sim ls`, copy it out with get"
            )
        if rec.kind == LNK:
            target = view.data(rec).decode("utf-8", "surrogateescape")
            raise BackendError(
                f"{args.path!r} is a symlink to {target!r}", hint="symlinks are never followed: cat its target"
            )
        for fbn, vbn in fs.leaves(rec.top, rec.height):
            if fbn * BS < rec.size:
                out.seek(fbn * BS)
                out.write(fs.read(vbn)[: rec.size - fbn * BS])
        out.truncate(rec.size)

    try:
        read_volume(_volume_dir(args.volume), image, read)
        out.seek(0)
        shutil.copyfileobj(out, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    finally:
        out.close()
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from .hostfiles import get_tree
    from .reader import read_volume, resolve, split

    image = _image(args)
    qtree, rest = _split(args.path, split)
    dest = os.path.abspath(args.dest)
    if os.path.isdir(dest) and not os.path.islink(dest):
        dest = os.path.join(dest, (rest or qtree).rsplit("/", 1)[-1])
    if os.path.lexists(dest):
        raise BackendError(
            f"{dest} exists", hint="get writes only a new path, never over what is there: name a new one"
        )
    if not os.path.isdir(os.path.dirname(dest)):
        raise BackendError(f"no directory {os.path.dirname(dest)} on this host", hint="create it first")
    partial = f"{dest}.partial-{os.getpid()}"

    def discard() -> None:
        if os.path.isdir(partial) and not os.path.islink(partial):
            shutil.rmtree(partial)
        elif os.path.lexists(partial):
            os.unlink(partial)

    def read(fs: SimFS) -> int:
        discard()  # what a read the writer tore left
        view = image.view(fs, qtree)
        ino, _rec = resolve(view, qtree, rest, image.label(qtree))
        return get_tree(fs, view, ino, partial)

    try:
        n = read_volume(_volume_dir(args.volume), image, read)
        if os.path.lexists(dest):
            raise BackendError(f"{dest} appeared while it was written", hint="name a new path")
        os.rename(partial, dest)
    finally:
        discard()
    print(f"got {n} entr{'y' if n == 1 else 'ies'} of {image.label(qtree)} into {dest}")
    return 0


def cmd_fail_disk(args: argparse.Namespace) -> int:
    label = _alone(args, "fail-disk", lambda fs: fs.fail_disk(args.disk))
    print(f"{label} failed; the volume runs degraded (reads of it are rebuilt from parity)")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    def rebuild(fs) -> tuple[str | None, int]:
        failed = fs.raid.failed
        if failed is None:
            return None, 0
        label = fs.raid.disk_label(failed)
        return label, fs.reconstruct()

    label, n = _alone(args, "reconstruct", rebuild)
    if label is None:
        print("no failed disk: nothing to reconstruct")
    else:
        print(f"{label} rebuilt onto a replacement image from the other disks ({n} stripes)")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    def scrub(fs) -> dict[str, Any]:
        rep = fs.scrub(repair=args.repair)
        rep["block_map"] = fs.fsck()
        return rep

    rep = _alone(args, "scrub", scrub)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    elif rep["degraded"]:
        print("a disk has failed: parity cannot be verified; run `coalesce sim reconstruct`")
    else:
        live = [m for m in rep["mismatches"] if m["live"]]
        print(
            f"scrubbed {rep['checked']} stripes: {len(rep['mismatches'])} parity mismatches "
            f"({len(live)} in stripes holding live blocks)" + (f", {rep['repaired']} repaired" if args.repair else "")
        )
        for m in rep["mismatches"]:
            print(f"stripe {m['stripe']}: {m['verdict']}")
        for p in rep["block_map"]:
            print(f"block map: {p}")
    if rep["degraded"]:
        return 3
    return 1 if (rep["mismatches"] and not args.repair) or rep["block_map"] else 0


def _wrap(func):
    """A verb whose errors print ``error:`` and ``hint:`` plainly and exit with their code
    (coalesce_core/ui/errors.py): the volume's, and the host's (a file that cannot be read or
    written); any other error goes on to the command line's handler."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CoalesceError as exc:
            return report_error(exc, styled=False)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            return report_error(
                BackendError(
                    f"{exc.strerror or exc}{where}",
                    hint="check the path and its permissions on this host; nothing was overwritten",
                ),
                styled=False,
            )

    return run


def _image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pcpi", metavar="NAME", help="read this PCPI instead of the active file system")
    g.add_argument(
        "--export", action="store_true", help="read each qtree as the volume exports it (a replica's exported PCPI)"
    )


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sim", help="make, fill, read and inspect a sim volume (mkfs, put, ls, cat, get, info, fail-disk, ...)"
    )
    sub = p.add_subparsers(dest="sim_verb", metavar="VERB")
    sub.required = True
    m = sub.add_parser("mkfs", help="format a sim volume in a new or empty directory")
    m.add_argument("volume", help="sim:///dir or a directory")
    m.add_argument("--disks", type=int, default=3, help="data disks, 1..32 (a parity disk is added; default 3)")
    m.add_argument("--size", help="maximum size, e.g. 64M or 1G (default: grows as blocks are allocated)")
    m.set_defaults(func=_wrap(cmd_mkfs))
    u = sub.add_parser("put", help="copy host files, directories and symlinks into a qtree (a source)")
    u.add_argument("volume")
    u.add_argument("sources", nargs="+", metavar="SOURCE", help="host paths (symlinks are copied as symlinks)")
    u.add_argument("dest", metavar="QTREE[/DIR]", help="where in the volume (missing directories are made)")
    u.set_defaults(func=_wrap(cmd_put))
    ls = sub.add_parser("ls", help="list the qtrees, or a directory of a qtree (read-only)")
    ls.add_argument("volume")
    ls.add_argument("path", nargs="?", metavar="QTREE[/PATH]")
    ls.add_argument("-l", "--long", action="store_true", help="kind, mode, owner, size, mtime")
    ls.add_argument("--json", action="store_true")
    _image_options(ls)
    ls.set_defaults(func=_wrap(cmd_ls))
    c = sub.add_parser("cat", help="write a file of the volume to standard output (read-only)")
    c.add_argument("volume")
    c.add_argument("path", metavar="QTREE/PATH")
    _image_options(c)
    c.set_defaults(func=_wrap(cmd_cat))
    g = sub.add_parser("get", help="copy a file or directory of the volume to a new host path (read-only)")
    g.add_argument("volume")
    g.add_argument("path", metavar="QTREE[/PATH]")
    g.add_argument("dest", metavar="DEST", help="a new host path, or an existing directory to put it in")
    _image_options(g)
    g.set_defaults(func=_wrap(cmd_get))
    i = sub.add_parser("info", help="disks, parity state, CP counter, PCPIs and the blocks each holds, free space")
    i.add_argument("volume", help="sim:///dir or a directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_wrap(cmd_info))
    f = sub.add_parser("fail-disk", help="fail one disk (reads are then served degraded from parity)")
    f.add_argument("volume")
    f.add_argument("disk", help="data disk number (0..N-1), diskN, or 'parity'")
    f.set_defaults(func=_wrap(cmd_fail_disk))
    r = sub.add_parser("reconstruct", help="rebuild the failed disk onto a replacement image")
    r.add_argument("volume")
    r.set_defaults(func=_wrap(cmd_reconstruct))
    s = sub.add_parser("scrub", help="verify parity of every stripe (and the block map)")
    s.add_argument("volume")
    s.add_argument(
        "--repair",
        action="store_true",
        help="repair the mismatches whose wrong side the checksums show; refuses the rest",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_wrap(cmd_scrub))
    return p
