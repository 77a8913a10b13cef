"""Owner records (the ``coalesce_claim`` hook): the default file store of coalesce_core/backend/claims.py
and the facade's ``Volume.claim``, on mem and sim volumes."""

from __future__ import annotations

import os
import threading

import pytest

from coalesce_core.backend import claims
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError


def test_the_first_writer_wins_and_later_claims_read_it_back(tmp_path):
    assert claims.claim_in(str(tmp_path), "destination", None) == ""
    assert not (tmp_path / "owners").exists()  # a read writes nothing
    assert claims.claim_in(str(tmp_path), "destination", "one") == "one"
    assert claims.claim_in(str(tmp_path), "destination", "two") == "one"
    assert claims.claim_in(str(tmp_path), "source.g", None) == ""
    assert sorted(os.listdir(tmp_path / "owners")) == ["destination"]  # no temporary file is left


def test_of_many_concurrent_writers_exactly_one_wins(tmp_path):
    barrier = threading.Barrier(8)
    got: list[str] = []

    def writer(i: int) -> None:
        barrier.wait()
        got.append(claims.claim_in(str(tmp_path), "destination", f"writer {i}"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and got[0].startswith("writer ")
    assert (tmp_path / "owners" / "destination").read_text() == got[0]


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_a_key_is_one_plain_file_name(tmp_path, key):
    with pytest.raises(ValueError):
        claims.claim_in(str(tmp_path), key, "v")


def test_a_store_that_cannot_be_written_is_a_backend_error_with_a_hint(tmp_path):
    (tmp_path / "owners").write_text("a file where the directory should be")
    with pytest.raises(BackendError) as ei:
        claims.claim_in(str(tmp_path), "destination", "v")
    assert "owners" in str(ei.value) and ei.value.hint


def test_sim_keeps_its_records_in_its_metadata_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
    pm = plugin_manager()
    vol = Volume.open(pm, f"sim://{tmp_path}/v", create=True)
    try:
        assert vol.claim("destination") == ""
        assert vol.claim("destination", "g") == "g"
        path = claims.record_path(vol.metadata_dir() or "", "destination")
        assert open(path).read() == "g"
    finally:
        vol.close()


def test_mem_keeps_the_records_of_a_registry_volume_in_memory_and_of_a_file_volume_beside_it(tmp_path):
    pm = plugin_manager()
    named = Volume.open(pm, f"mem://claims-{tmp_path.name}", create=True)
    assert named.metadata_dir() is None
    assert named.claim("destination", "g") == "g"
    assert Volume.open(pm, f"mem://claims-{tmp_path.name}").claim("destination", "h") == "g"
    filed = Volume.open(pm, f"mem://{tmp_path}/v.vol", create=True)
    assert filed.claim("destination", "g") == "g"
    assert (tmp_path / "v.vol.coalesce" / "owners" / "destination").read_text() == "g"


def test_a_handle_without_a_metadata_directory_keeps_no_records():
    from coalesce_core.backend.handles import VolumeHandle

    assert VolumeHandle().claim("destination", "g") is None
