"""Running one test on the volumes of several backends: the ``backend`` parameter and ``group_config`` on it.

A test module written against ``group_config`` (tests/conftest.py: mem volumes) runs on other backends by
declaring the two fixtures :func:`backend_fixtures` makes, a parametrized ``backend`` and ``group_config``
on it (:func:`config_on`)::

    backend, group_config = backend_fixtures("mem", "sim", "btrfs", "zfs")

A test then picks its own backends with ``pytest.mark.parametrize("backend", [on_backend(...), ...])``.
"""

from __future__ import annotations

import pytest

#: the marks of the backends whose volumes are real file systems (tests/realfs.py builds them)
_BACKEND_MARKS = {"btrfs": pytest.mark.btrfs, "zfs": pytest.mark.zfs}


def on_backend(name: str, *values: object):
    """One parameter set for a test that runs on the volumes of backend ``name`` (with that backend's mark):
    ``pytest.param(name, *values)``, for a ``backend`` fixture parametrized directly or indirectly."""
    return pytest.param(name, *values, marks=_BACKEND_MARKS.get(name, ()), id="-".join(map(str, (name, *values))))


def config_on(backend: str, group_config, request, monkeypatch):
    """``group_config`` whose source and destination are fresh volumes of ``backend``: mem (the default
    fixture), sim (in tmp_path), btrfs subvolumes or zfs datasets (tests/realfs.py, removed after the test).
    Tests written once against ``group_config`` run on every backend by overriding it with this."""
    if backend == "mem":
        return group_config
    if backend == "sim":
        monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
        return lambda *a, **kw: group_config(*a, **{**kw, "scheme": "sim"})
    urls = request.getfixturevalue(f"{backend}_urls")

    def make(**kw):
        kw.setdefault("source_url", urls("src"))
        kw.setdefault("dest_url", urls("dst"))
        return group_config(**kw)

    return make


def backend_fixtures(*names: str):
    """The fixtures ``backend`` (parametrized: each of ``names``, with its mark) and ``group_config`` (on the
    volumes of that backend), to be bound to those names in a test module."""

    @pytest.fixture(params=[on_backend(name) for name in names])
    def backend(request):
        return request.param

    @pytest.fixture
    def group_config(group_config, backend, request, monkeypatch):
        return config_on(backend, group_config, request, monkeypatch)

    return backend, group_config
