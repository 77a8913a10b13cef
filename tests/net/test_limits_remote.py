"""The limits tests (tests/core/test_limits.py) with the source behind TLS and behind SSH.

Long names and paths, a 1,100-level tree and a 1 TiB sparse file travel through the
source service's protocol (diff streams in DATA messages, fingerprints in replies):
the test functions run unchanged with a Harness whose agent reaches a mem source
through a source service (tests/net/netkit.py).
"""

from __future__ import annotations

import os
import threading
import tracemalloc

import pytest
from core import test_limits as L
from net.netkit import RemoteHarness

from coalesce_remote.client import _Stderr


@pytest.fixture
def harness(remote_config):
    def make(replicas=("A", "B")):
        return RemoteHarness(remote_config(replicas=replicas))

    return make


@pytest.mark.parametrize(
    "name",
    [
        "test_names_are_255_bytes_of_multibyte_utf8",
        "test_a_tree_deeper_than_python_recurses",
        "test_paths_longer_than_4096_bytes",
    ],
)
def test_limits_through_the_source_service(name, harness):
    getattr(L, name)(harness)


def test_a_sparse_file_of_1_tib_through_the_source_service(harness):
    L.test_a_sparse_file_of_1_tib(harness, "mem")


def test_ssh_stderr_without_newlines_keeps_the_agent_s_memory_bounded():
    """An ssh (or what runs behind it) that writes to stderr without a newline during a long transfer:
    the client keeps the last pieces of at most LINE_MAX bytes, never one line of everything (it read
    whole lines, so 32 MiB without a newline were 32 MiB of the agent's memory)."""
    r, w = os.pipe()
    chunk = b"x" * (1 << 20)

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            for _ in range(32):
                f.write(chunk)
            f.write(b"\nPermission denied\n")

    tracemalloc.start()
    try:
        writer = threading.Thread(target=write)
        writer.start()
        err = _Stderr(os.fdopen(r, "rb"))
        err.t.join(60)
        writer.join(60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not err.t.is_alive()
    assert peak < 4 << 20, f"{peak} bytes at the peak for 32 MiB of stderr"
    assert err.text().endswith("Permission denied") and len(err.lines) <= 20
