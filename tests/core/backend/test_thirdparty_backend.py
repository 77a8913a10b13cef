"""A third-party backend distribution is found through its entry point only.

tests/fixtures/tiny_backend is a separate distribution ("coalesce-tiny-backend",
module ``coalesce_tiny``, entry point ``tiny = "coalesce_tiny"`` in the group
``coalesce.backends``).  It is installed with pip into a private directory
(never into this environment), and a subprocess that has that directory on
PYTHONPATH must list it beside the bundled backends and pass the backend
conformance suite through the plugin manager alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coalesce_core.backend.manager import backend_infos, plugin_manager

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_backend"


def _can_build_wheels() -> bool:
    """Can setuptools in this environment build a wheel without pip's build isolation?"""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (68, 0):
        return False
    try:
        import wheel  # noqa: F401  (setuptools < 70.1 needs it for bdist_wheel)

        return True
    except ImportError:
        return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    src = work / "src"
    shutil.copytree(FIXTURE, src)  # build in a copy: no build/ or egg-info in the repository
    site = work / "site"
    # Offline when this environment can build wheels itself; else pip's usual
    # isolated build (which fetches setuptools and wheel from the index).
    offline = ["--no-build-isolation"] if _can_build_wheels() else []
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            *offline,
            "--no-input",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (site / "coalesce_tiny.py").exists()
    return site


def _python(site: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    env.pop("COALESCE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600
    )


def test_tiny_is_not_installed_here():
    assert "tiny" not in {i["scheme"] for i in backend_infos(plugin_manager())}


def test_installed_distribution_is_discovered_through_its_entry_point(tiny_site):
    res = _python(
        tiny_site,
        """
        import json
        from importlib import metadata
        from coalesce_core.backend.manager import backend_infos, plugin_manager
        pm = plugin_manager()
        eps = {ep.name: ep.value for ep in metadata.entry_points(group="coalesce.backends")}
        print(json.dumps({"infos": backend_infos(pm), "eps": eps,
                          "dist": metadata.distribution("coalesce-tiny-backend").version}))
    """,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    by_scheme = {i["scheme"]: i for i in out["infos"]}
    assert {"mem", "tiny"} <= set(by_scheme)
    assert by_scheme["tiny"]["plugin"] == "tiny" and by_scheme["mem"]["plugin"] == "mem"
    assert out["eps"]["tiny"] == "coalesce_tiny"
    assert out["dist"] == "0.1.0"


def test_tiny_passes_the_conformance_suite(tiny_site, tmp_path):
    res = _python(
        tiny_site,
        f"""
        import itertools
        from coalesce_core.testing.conformance import run_conformance, run_basic_check
        from coalesce_core.backend.manager import plugin_manager
        from coalesce_core.backend.volume import Volume
        n = itertools.count()
        run_conformance(lambda: f"tiny://cf-{{next(n)}}", max_examples=5, stateful_steps=10)
        run_basic_check("open", lambda: f"tiny://{tmp_path}/vol{{next(n)}}")
        vol = Volume.open(plugin_manager(), "tiny://check", create=True)
        print(type(vol.handle).__name__, vol.handle.scheme)
    """,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["MemVolume", "tiny"]


def test_coalesce_backends_lists_the_third_party_backend(tiny_site):
    """`coalesce backends` (the CLI verb) finds tiny through its entry point."""
    script = shutil.which("coalesce")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tiny_site), env.get("PYTHONPATH", "")]))
    for args in (["backends", "--json"], ["backends"]):
        cmd = (
            [script, *args]
            if script
            else [sys.executable, "-c", f"import sys; from coalesce_core.ui.cli import main; sys.exit(main({args!r}))"]
        )
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        if "--json" in args:
            schemes = {i["scheme"]: i["plugin"] for i in json.loads(res.stdout)}
            assert schemes.get("tiny") == "tiny" and schemes.get("mem") == "mem"
        else:
            assert any(line.split()[:2] == ["tiny", "tiny"] for line in res.stdout.splitlines()), res.stdout
