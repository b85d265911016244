"""pytest-benchmark suite of one training step per path: ``python -m pytest bench -k steps``.

Every path of :mod:`bench.steps` (floor, library path, TorchJD, MTLStep's modes and backends) on
an MLP trunk of about a million shared parameters with four tasks. ``extra_info`` holds the
median post-backward part of the benchmarked rounds. The full comparison, with peak memory and
the other trunks, comes from ``python -m bench``.
"""

import math
import statistics

import pytest
import torch

from bench.backends import measured_backends
from bench.presets import TrunkSpec
from bench.steps import make_paths, step_sampler
from bench.timing import Clock
from bench.trunks import build_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC = TrunkSpec("mlp", batch=64, options={"in_features": 512, "width": 512, "depth": 4})
MODEL, BATCH = build_model(SPEC, 4, DEVICE)
PATHS = {path.key: path for path in make_paths(MODEL, measured_backends(DEVICE)[0])}


@pytest.mark.parametrize("key", list(PATHS))
def test_step(benchmark, key):
    sample = step_sampler(MODEL, BATCH, PATHS[key], Clock(DEVICE))
    post_backward = []
    benchmark(lambda: post_backward.append(sample()["post_backward"]))
    finite = [value for value in post_backward if math.isfinite(value)]
    benchmark.extra_info["post_backward_median_s"] = statistics.median(finite) if finite else None
