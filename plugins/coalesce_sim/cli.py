"""`coalesce sim info|fail-disk|reconstruct|scrub`: inspection and fault verbs of the sim backend.

Each verb takes the volume as ``sim:///dir`` or a plain directory path and
sets ``func(args) -> exit code``.  The views are pure builders (``info_view``)
printed by the verb; ``--json`` prints plain data instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from coalesce_core.errors import BackendError
from coalesce_core.ui.errors import report_error


def _location(text: str) -> str:
    return text[len("sim://") :] if text.startswith("sim://") else text


def _open(text: str):
    import os

    from . import open_sim

    loc = _location(text)
    path, _, q = loc.partition("?")
    loc = os.path.abspath(path) + (f"?{q}" if q else "")
    return open_sim(loc, create=False)


def _close(fs) -> None:
    from . import close_sim

    close_sim(fs)


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
    fs = _open(args.volume)
    try:
        info = fs.info()
    finally:
        _close(fs)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        from rich.console import Console

        Console().print(info_view(info))
    return 0


def cmd_fail_disk(args: argparse.Namespace) -> int:
    fs = _open(args.volume)
    try:
        label = fs.fail_disk(args.disk)
    finally:
        _close(fs)
    print(f"{label} failed; the volume runs degraded (reads of it are rebuilt from parity)")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    fs = _open(args.volume)
    try:
        failed = fs.raid.failed
        if failed is None:
            print("no failed disk: nothing to reconstruct")
            return 0
        label = fs.raid.disk_label(failed)
        n = fs.reconstruct()
    finally:
        _close(fs)
    print(f"{label} rebuilt onto a replacement image from the other disks ({n} stripes)")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    fs = _open(args.volume)
    try:
        rep = fs.scrub(repair=args.repair)
        rep["block_map"] = fs.fsck()
    finally:
        _close(fs)
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
        for p in rep["block_map"]:
            print(f"block map: {p}")
    if rep["degraded"]:
        return 3
    return 1 if (rep["mismatches"] and not args.repair) or rep["block_map"] else 0


def _wrap(func):
    """A verb whose BackendError prints ``error:`` and ``hint:`` plainly and exits with its code
    (coalesce_core/ui/errors.py); any other error goes on to the command line's handler."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BackendError as exc:
            return report_error(exc, styled=False)

    return run


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sim", help="inspect the sim backend's RAID-4 volume (info, fail-disk, reconstruct, scrub)"
    )
    sub = p.add_subparsers(dest="sim_verb", metavar="VERB")
    sub.required = True
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
    s.add_argument("--repair", action="store_true", help="rewrite parity of mismatched stripes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_wrap(cmd_scrub))
    return p
