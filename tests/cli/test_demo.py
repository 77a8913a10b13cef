"""`coalesce demo` as a person runs it: in a terminal (tmux) and piped (plain lines)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid

import pytest
from groups import EXE

from coalesce_core.ui.demo import DEFAULT_BACKEND

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_demo_plain_when_piped():
    p = subprocess.run(
        [*EXE, "demo", "--backend", "mem", "--speed", "4", "--replicas", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert not ANSI.search(out), "escape sequences in plain output"
    for chapter in ("== cycle 1", "== cycle 2", "== cycle 3", "== cycle 4", "== coalesce check"):
        assert chapter in out
    assert "replica B: update -> rollback (update_failed)" in out
    assert "replica C: rollback -> unstable_uncoalesced (rollback_failed)" in out
    assert "replica C: unstable_uncoalesced -> stable_uncoalesced (retry_succeeded)" in out
    assert "replica C: stable_uncoalesced -> stable (jump_ahead)" in out
    assert "done but still exporting the old image (verified)" in out
    assert "final states: A=stable, B=stable, C=stable, D=stable" in out
    assert "demo finished: all replicas stable, every invariant holds" in out
    assert "VIOLATED" not in out


def test_demo_usage_errors():
    p = subprocess.run([*EXE, "demo", "--replicas", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "at least 1" in p.stderr
    p = subprocess.run([*EXE, "demo", "--backend", "nope", "--plain"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 4 and "no installed backend serves 'nope'" in p.stderr and "hint:" in p.stderr
    assert "Traceback" not in p.stderr


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, check=True, timeout=30).stdout


def test_demo_live_view_in_tmux(tmp_path):
    """Type `coalesce demo` into a 200x60 terminal, wait, read the final screen."""
    sock = f"coalesce-test-{uuid.uuid4().hex[:8]}"
    env_cmd = f"cd {shlex.quote(str(tmp_path))} && PS1='$ ' exec bash --norc --noprofile"
    _tmux(sock, "new-session", "-d", "-s", "demo", "-x", "200", "-y", "60", env_cmd)
    try:
        exe = shutil.which("coalesce") or " ".join(map(shlex.quote, EXE))
        _tmux(sock, "send-keys", "-t", "demo", f"{exe} demo --speed 3; echo DEMO-EXIT=$?", "Enter")
        screen = ""
        seen_live = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = _tmux(sock, "capture-pane", "-t", "demo", "-p")
            finished = re.search(r"^DEMO-EXIT=\d+", screen, re.M)
            seen_live = seen_live or (not finished and "agent phase" in screen and "PCPI budget" in screen)
            if finished:
                break
        else:
            pytest.fail("demo did not finish in 90 s:\n" + screen)
        assert seen_live, "never saw the live view while the demo ran"
        assert "DEMO-EXIT=0" in screen, screen
        # the last frame of the live view: every replica stable, the budget back to the base alone
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^ ([A-C])\s+(\w+)\s+(cycle|outside)\s", screen, re.M)}
        assert rows == {"A": "stable", "B": "stable", "C": "stable"}, screen
        assert "1 of 4 cycle PCPIs" in screen and "individual 0" in screen
        assert f"{DEFAULT_BACKEND} backend" in screen
        # the invariant report
        for inv in ("I1", "I2", "I3", "I4", "I5", "I8", "I9"):
            assert re.search(rf"│ {inv}\s+│ ok\s+│", screen), (inv, screen)
        assert "VIOLATED" not in screen
        assert "demo finished: all replicas stable, every invariant holds" in screen
        # and the story happened: the scrollback holds the whole event log's last frame
        history = _tmux(sock, "capture-pane", "-t", "demo", "-p", "-S", "-400")
        assert "cycle 6 finished" in history
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=30)
