"""The limits tests (tests/core/test_limits.py) with the source behind TLS and behind SSH.

Long names and paths, a 1,100-level tree and a 1 TiB sparse file travel through the
source service's protocol (diff streams in DATA messages, fingerprints in replies):
the test functions run unchanged with a Harness whose agent reaches a mem source
through a source service (tests/net/netkit.py).
"""

from __future__ import annotations

import pytest
from core import test_limits as L
from net.netkit import RemoteHarness


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
