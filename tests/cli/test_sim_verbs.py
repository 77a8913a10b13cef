"""A person's sim volumes, end to end through the command line (docs/sim.md, "`coalesce sim` verbs"):
`coalesce sim mkfs` and `put` make and fill a source, a group replicates it, `ls`/`cat`/`get --export`
read what the replica exports; beside a running `coalesce run` the read verbs work and `put` is
refused with the agent named (one process writes a sim volume at a time); after the agent stops,
`put` works and the next cycle replicates it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]
ENV = {**os.environ, "COALESCE_SIM_FSYNC": "0"}


def coalesce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=ENV, timeout=300)


def ok(*args: str) -> str:
    p = coalesce(*args)
    assert p.returncode == 0, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_a_person_fills_a_source_replicates_it_and_reads_the_replica_beside_the_agent(tmp_path: Path):
    host = tmp_path / "host"
    (host / "docs").mkdir(parents=True)
    (host / "docs" / "a.txt").write_text("first\n")
    (host / "docs" / "b.bin").write_bytes(os.urandom(20_000))
    src, dst = tmp_path / "src", tmp_path / "dst"
    ok("sim", "mkfs", str(src))
    ok("sim", "put", str(src), str(host / "docs"), "A")
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "p"\nsource = "sim://{src}"\ndestination = "sim://{dst}"\nmetadata = "{tmp_path}/meta"\n'
        '[[replica]]\nname = "A"\n'
    )
    ok("--config", str(cfg), "init")
    ok("--config", str(cfg), "run", "--once")
    assert ok("sim", "ls", "--export", str(dst), "A/docs").split() == ["a.txt", "b.bin"]
    ok("sim", "get", "--export", str(dst), "A/docs", str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "b.bin").read_bytes() == (host / "docs" / "b.bin").read_bytes()

    runner = subprocess.Popen(
        [*EXE, "--config", str(cfg), "run", "--interval", "3600", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while json.loads(ok("--config", str(cfg), "status", "--json")).get("agent") is None:
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (host / "later.txt").write_text("later\n")
        refused = coalesce("sim", "put", str(src), str(host / "later.txt"), "A")
        assert refused.returncode == 4, refused.stderr
        assert f"PID {runner.pid}" in refused.stderr and "coalesce --config" in refused.stderr
        assert "\nhint: stop the agent" in refused.stderr
        # the read verbs beside it: what the replica exports, bytes and all
        assert ok("sim", "cat", "--export", str(dst), "A/docs/a.txt") == "first\n"
        assert json.loads(ok("sim", "info", "--json", str(dst)))["exports"]["A"].startswith("co-p-")
        runner.send_signal(signal.SIGTERM)
        _out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    ok("sim", "put", str(src), str(host / "later.txt"), "A")
    ok("--config", str(cfg), "run", "--once")
    assert ok("sim", "cat", "--export", str(dst), "A/later.txt") == "later\n"
    assert ok("--config", str(cfg), "verify", "--full")
