"""The sim backend's volume handles: one shared :class:`~.fs.SimFS` per directory and process.

:func:`open_sim` opens (or creates) the volume of a ``sim:///ABS/DIR`` location and counts its
openers; :func:`close_sim` closes it when the last one closes.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import parse_qs

from coalesce_core.errors import BackendError

from .fs import SimFS

_OPEN: dict[str, SimFS] = {}
_OPEN_LOCK = threading.Lock()

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in _SIZE_UNITS else ""
    num = t[:-1] if unit else t
    if not num.isdigit():
        raise BackendError(f"bad size {text!r}", hint="write e.g. size=64M or size=1G")
    return int(num) * _SIZE_UNITS[unit]


def parse_location(location: str) -> tuple[str, dict[str, Any]]:
    """``/abs/dir?disks=3&size=64M&fsync=0`` -> (path, options)."""
    path, _, query = location.partition("?")
    if not path.startswith("/"):
        raise BackendError(f"sim volume path {path!r} is not absolute", hint="write sim:///absolute/dir")
    opts: dict[str, Any] = {}
    for k, vs in parse_qs(query).items():
        v = vs[-1]
        if k == "disks":
            opts["ndata"] = int(v)
        elif k == "size":
            opts["max_bytes"] = _parse_size(v)
        elif k == "fsync":
            opts["fsync"] = v not in ("0", "false", "no")
        else:
            raise BackendError(f"unknown sim volume option {k!r}", hint="options: disks, size, fsync")
    if "fsync" not in opts and os.environ.get("COALESCE_SIM_FSYNC", "1") in ("0", "false", "no"):
        opts["fsync"] = False
    return os.path.normpath(path), opts


def open_sim(location: str, *, create: bool = False) -> SimFS:
    """Open (or create) the sim volume at ``location``; one shared handle per directory and process."""
    path, opts = parse_location(location)
    with _OPEN_LOCK:
        fs = _OPEN.get(path)
        if fs is not None and fs.broken is None:
            fs.opens += 1
            return fs
        fsync = opts.get("fsync", True)
        if os.path.exists(os.path.join(path, "raid.json")):
            fs = SimFS(path, fsync=fsync)
        elif create:
            fs = SimFS.format(path, ndata=opts.get("ndata", 3), max_bytes=opts.get("max_bytes", 0), fsync=fsync)
        else:
            raise BackendError(
                f"no sim volume at {path}",
                hint=f"create it (open with create=True, or `coalesce init` with sim://{path})",
            )
        os.makedirs(os.path.join(path, ".coalesce"), exist_ok=True)
        fs.opens = 1
        _OPEN[path] = fs
        return fs


def close_sim(fs: SimFS) -> None:
    with _OPEN_LOCK:
        fs.opens = getattr(fs, "opens", 1) - 1
        if fs.opens > 0:
            return
        if _OPEN.get(fs.path) is fs:
            del _OPEN[fs.path]
    if fs.broken is None:
        fs.close()
