"""Benchmarks of emtl-kernels against its peers and against the memory-bandwidth limit.

``python -m bench --quick`` (CPU, minutes) or ``python -m bench --full`` (GPU) measures, in one
run, the kernel passes of every backend against the torch baselines and a copy of the same bytes
(:mod:`bench.kernels`), the cost of a training step on realistic shared trunks for every way of
taking it (equal weighting, the usual library path, TorchJD, :class:`emtl_kernels.MTLStep`), how
that cost scales with the number of tasks and parameters, and the suite modules of
:mod:`bench.extras` (the distributed step; the weightings' solvers when present). It writes
``results.json``, ``report.md`` and PNG plots under ``bench/results/<device>/``;
``python -m bench --report-only <results.json>`` rebuilds the report from the JSON alone.

The pytest-benchmark suites ``bench/test_bench_*`` run with ``python -m pytest bench``; the
project's own test run (``tests/``) never collects them.
"""
