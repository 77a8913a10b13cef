"""Groups the tests build: the TOML of a group of many replicas (:func:`group_toml`), and the group the
command-line tests drive (:func:`mem_group`: two replicas on file-backed mem volumes, so that separate
processes share the volumes as they would share disks)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill


def mem_group(tmp_path: Path) -> SourceWriter:
    """Write ``tmp_path/coalesce.toml``: group ``home``, replicas A (qtree A) and B (qtree qb), source and
    destination ``mem://`` files in ``tmp_path``, parallel 2, no retry delay; fill the source qtrees.
    Returns the source's writer."""
    (tmp_path / "coalesce.toml").write_text(
        '[group]\nname = "home"\n'
        f'source = "mem://{tmp_path}/src.vol"\ndestination = "mem://{tmp_path}/dst.vol"\n'
        "parallel = 2\n[group.retry]\ninitial = 0\n"
        '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\nsource = "qb"\n'
    )
    writer = SourceWriter(Volume.open(plugin_manager(), f"mem://{tmp_path}/src.vol", create=True))
    fill(writer, ["A", "qb"])
    return writer


def group_toml(source: str, destination: str, metadata: str, replicas: Iterable[str]) -> str:
    """The TOML of group ``g``: ``replicas`` (each replicating the qtree of its name) from ``source`` to
    ``destination``, 4 transfers at a time, the ledger in ``metadata``, a failed replica retried at once
    (then 2x longer each time, at most 60 s)."""
    lines = [
        "[group]",
        'name = "g"',
        f'source = "{source}"',
        f'destination = "{destination}"',
        "parallel = 4",
        f'metadata = "{metadata}"',
        "[group.retry]",
        "initial = 0",
        "factor = 2",
        "maximum = 60",
    ]
    lines += [line for r in replicas for line in ("[[replica]]", f'name = "{r}"')]
    return "\n".join(lines) + "\n"
