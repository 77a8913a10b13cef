"""The project's tools: the test command, real file systems, formal checks and benchmarks.

A package so that the benchmarks (``tools.bench``) and the tests can import them from the
repository root (``python3 -m tools.bench.bench_sim``; ``from tools import spin``).
realfs.py, mutants.py, spin.py and gen_promela.py also run as scripts: ``python3 tools/realfs.py up``.
"""
