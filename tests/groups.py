"""Groups the tests build: the TOML of a group of many replicas (:func:`group_toml`), the group the
command-line tests drive (:func:`mem_group`: two replicas on file-backed mem volumes, so that separate
processes share the volumes as they would share disks), an initialised group that subprocesses of the real
command line drive (:func:`cli_group`, on sim volumes unless told; :func:`run_cli`, :func:`start_cli`,
:func:`status`, :func:`at_rest`, :func:`wait_until`), and a group on a POSIX source volume driven through
the command line (:class:`PosixCliGroup`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill
from coalesce_posix import walk

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


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


def cli_group(tmp_path: Path, name: str, src: str | None = None, dst: str | None = None) -> tuple[Path, SourceWriter]:
    """Write ``tmp_path/coalesce.toml``: group ``name``, replicas A and B (qtrees A and B) from ``src`` to
    ``dst`` (sim volumes ``tmp_path/src`` and ``tmp_path/dst`` unless given), the ledger in ``tmp_path/meta``;
    fill the source qtrees and run ``coalesce init``.  Returns the config's path and the source's writer, its
    volume open: close it (``writer.volume.close()``) unless the test writes through it, since a process
    shares one handle per sim volume and a later open would get this one, stale once a run changed the
    volume."""
    src = src or f"sim://{tmp_path}/src"
    dst = dst or f"sim://{tmp_path}/dst"
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "{name}"\nsource = "{src}"\ndestination = "{dst}"\nmetadata = "{tmp_path}/meta"\n'
        '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n'
    )
    writer = SourceWriter(Volume.open(plugin_manager(), src, create=True))
    fill(writer, ["A", "B"])
    init = run_cli(cfg, "init")
    assert init.returncode == 0, init.stderr
    return cfg, writer


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "COALESCE_SIM_FSYNC": "0", **(env or {})}


def run_cli(cfg: Path, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """``coalesce --config CFG ARGS`` in a subprocess, its output captured as text, sim volumes without
    fsync, the test's environment plus ``env``; ``kw`` goes to :func:`subprocess.run`."""
    return subprocess.run(
        [*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=_cli_env(env), timeout=300, **kw
    )


@contextlib.contextmanager
def start_cli(cfg: Path, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Iterator[subprocess.Popen]:
    """``coalesce --config CFG ARGS`` started in the background (e.g. ``run --interval 3600``), as
    :func:`run_cli` runs it; standard output and error on pipes unless ``kw`` says otherwise.  Leaving the
    block kills the process if it still runs (a failed test leaves no agent behind) and waits for it."""
    with subprocess.Popen(
        [*EXE, "--config", str(cfg), *args],
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw},
        text=True,
        env=_cli_env(env),
    ) as p:
        try:
            yield p
        finally:
            if p.poll() is None:
                p.kill()


def status(cfg: Path) -> dict[str, Any]:
    """``coalesce status --json``, which must succeed, read."""
    p = run_cli(cfg, "status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def at_rest(st: dict[str, Any]) -> bool:
    """Whether status ``st`` shows the group between cycles with every replica stable."""
    return st["phase"] == "idle" and {r["state"] for r in st["replicas"]} == {"stable"}


def wait_until(runner: subprocess.Popen, ok: Callable[[], bool], what: str = "") -> None:
    """Poll ``ok`` until it holds, while ``runner`` (from :func:`start_cli`) is running and for 120 s at
    most."""
    deadline = time.monotonic() + 120
    while not ok():
        assert runner.poll() is None, runner.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


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


class PosixCliGroup:
    """A group of replicas A (qtree A) and B (qtree qb) whose source is a POSIX volume (btrfs, zfs), driven
    through the command line as an operator would; the test writes the source's files directly, and what
    readers see is read from the files at the export paths, not taken from the ledger."""

    def __init__(self, tmp_path: Path, src_url: str, dst_url: str, name: str, settings: str, file_size: int) -> None:
        """``settings``: the ``[group]`` lines after source and destination (``parallel``, ...); each source
        qtree starts with ``dir/file`` of ``file_size`` random bytes."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.cfg = tmp_path / "coalesce.toml"
        self.cfg.write_text(
            f'[group]\nname = "{name}"\nsource = "{src_url}"\ndestination = "{dst_url}"\n{settings}'
            "[group.retry]\ninitial = 0\n"
            '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\nsource = "qb"\n'
        )
        self.src = Volume.open(plugin_manager(), src_url, create=True)
        self.dst_url = dst_url
        self.root = self.src.handle.root
        for q in ("A", "qb"):
            self.write(q, "dir/file", os.urandom(file_size))

    def write(self, q: str, rel: str, data: bytes) -> None:
        path = os.path.join(self.root, q, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def source_fps(self) -> dict[str, str]:
        return {
            "A": walk.fingerprint(os.path.join(self.root, "A")),
            "B": walk.fingerprint(os.path.join(self.root, "qb")),
        }

    def exported_fps(self) -> dict[str, str]:
        """Fingerprints of what readers see at each replica's stable export path (read from the files)."""
        dst = Volume.open(plugin_manager(), self.dst_url)
        seen = {}
        for r in ("A", "B"):
            path = dst.export_path(r)
            assert path is not None, f"replica {r} has no export path"
            # a reader resolves the stable path (a symlink chain) to the image and reads its files
            seen[r] = walk.fingerprint(os.path.realpath(path))
        return seen

    def run(
        self, *args: str, env: dict[str, str | None] | None = None, check: int | None = 0
    ) -> subprocess.CompletedProcess:
        """``coalesce ARGS`` with this group's config, in the test's environment without a crash point and
        with ``env`` (a value sets a variable, None removes it); its exit code must be ``check`` (None: any)."""
        e = dict(os.environ)
        e.pop("COALESCE_CRASH_AT", None)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        p = subprocess.run([*EXE, "--config", str(self.cfg), *args], capture_output=True, text=True, env=e, timeout=300)
        if check is not None:
            assert p.returncode == check, f"{args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
        return p


def fake_run_clock(
    monkeypatch: Any, interval: float, waits: int, on_wait: Callable[[int], None] | None = None
) -> list[float]:
    """`coalesce run` in this process with its waits between cycles on a fake clock: the ``time.sleep``
    and ``time.monotonic`` the cli module uses advance a clock instead of waiting (the waits are cut
    into slices of AGENT_POLL); after each whole wait of ``interval`` seconds ``on_wait(n)`` runs, and
    the ``waits``-th wait ends the run by KeyboardInterrupt (Ctrl-C).  Returns the sleeps asked for."""
    from coalesce_core.ui import cli as cli_mod

    sleeps: list[float] = []
    clock = [0.0]

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds
        n = round(clock[0], 6) / interval
        if n == int(n):  # a whole wait between cycles has passed
            if on_wait is not None:
                on_wait(int(n))
            if n == waits:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod.time, "sleep", fake_sleep)
    monkeypatch.setattr(cli_mod.time, "monotonic", lambda: clock[0])
    return sleeps
