"""Resume across a real SIGKILL of the agent (docs/network.md; spec: resume_updates).

The agent is a separate `coalesce` process talking mutual TLS to a source
service (a thread of this test, over loopback).  It SIGKILLs itself in the
middle of applying an update; its spool then holds the change records that had
arrived.  The next `coalesce run --once` rolls the replica back, replays the
spool and asks the server for the stream from the first record it lacks (the
server logs ``records from K``), and the replica ends with exactly the source
PCPI's image (I3).
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import time
from pathlib import Path

from groups import EXE

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream.spool import Spool
from coalesce_core.testing.workload import SourceWriter, fill


def _run(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("COALESCE_CRASH_AT", None)
    e.update(env or {})
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=e, timeout=120)


def test_sigkill_mid_update_then_restart_resumes_from_the_spool_I3(tls_service, tmp_path, caplog):
    local = f"mem://resume-kill-{os.getpid()}-{time.monotonic_ns()}"
    src = Volume.open(plugin_manager(), local, create=True)
    writer = SourceWriter(src)
    fill(writer, ["A", "B"])
    url = tls_service.expose(local, name="killsrc")
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        "\n".join(
            [
                "[group]",
                'name = "k"',
                f'source = "{url}"',
                f'destination = "mem://{tmp_path}/dst.vol"',
                f'metadata = "{tmp_path}/meta"',
                "parallel = 2",
                "[[replica]]",
                'name = "A"',
                "[[replica]]",
                'name = "B"',
                "",
            ]
        )
    )
    assert _run(cfg, "init").returncode == 0
    assert _run(cfg, "run", "--once").returncode == 0  # the baselines
    rng = random.Random(11)
    for i in range(40):
        writer.write("A", f"new/f{i}", rng.randbytes(100_000))
    want = writer.expected_fingerprint("A")

    with caplog.at_level(logging.INFO, logger="coalesce.serve"):
        p = _run(cfg, "run", "--once", env={"COALESCE_CRASH_AT": "mid_apply:90"})
        assert p.returncode == -9, p.stderr
        spool = Spool(tmp_path / "meta" / "k.spool")
        spooled = spool.count("A")
        assert spooled > 0  # what had arrived is on local disk
        caplog.clear()
        p = _run(cfg, "run", "--once")  # recover (resume), then one more cycle
        assert p.returncode == 0, p.stdout + p.stderr
    starts = [
        int(k)
        for k in re.findall(
            r"streamed A co-k-src-\d+\.\.co-k-src-\d+ of killsrc "
            r"\(\d+ records from (\d+),",
            caplog.text,
        )
    ]
    assert starts and starts[0] == spooled > 0  # the server skipped exactly what the spool held
    assert spool.replicas() == []
    dst = Volume.open(plugin_manager(), f"mem://{tmp_path}/dst.vol")
    exported = dst.exported()["A"]
    assert dst.fingerprint("A", exported) == want  # I3: exactly the source PCPI's image
    assert _run(cfg, "check").returncode == 0
    coalesce_mem.forget(f"mem://{tmp_path}/dst.vol")
