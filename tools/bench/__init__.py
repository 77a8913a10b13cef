"""The benchmarks (docs/benchmarks.md): one module ``bench_<name>`` each, and what they share in ``common``.

From the repository root, one benchmark with its own options::

    python3 -m tools.bench.bench_sim [--quick]

and several (all by default) with ``python3 -m tools.bench [--quick] [NAME ...]``, which also runs
as ``python3 tools/bench [--quick] [NAME ...]`` from any directory (``__main__.py``).
"""
