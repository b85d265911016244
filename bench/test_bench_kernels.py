"""pytest-benchmark suite of the kernel passes: ``python -m pytest bench -k kernels``.

Every candidate of :mod:`bench.kernel_cases` (each backend's Gram and combine pass, each torch
baseline, the copy) on T = 8 task gradients: a ``[8, 2²⁰]`` matrix everywhere; on a GPU also a
``[8, 2²⁴]`` matrix and the 148 parameter tensors of GPT-2 small (these sizes skip without one).
``extra_info["bytes"]`` holds the bytes the pass must move (reads plus writes), so GB/s is bytes
over the reported time. The full sweep, interleaved, and its report come from ``python -m bench``.
"""

import math

import pytest
import torch

from bench.backends import measured_backends
from bench.kernel_cases import BASELINES, Candidate, KernelCase
from bench.kernels import pass_bytes
from bench.presets import GPT2_SMALL

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS, _ = measured_backends(DEVICE)
NUM_TASKS = 8
CANDIDATES = (
    [Candidate("copy")]
    + [Candidate(kernel_pass, backend) for kernel_pass in ("gram", "combine") for backend in BACKENDS]
    + [Candidate(kernel_pass, baseline=name) for kernel_pass, names in BASELINES.items() for name in names]
)

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="a GPU size: measured on a GPU only")
SIZES = [
    pytest.param([2**20], id="P=2^20"),
    pytest.param([2**24], id="P=2^24", marks=needs_gpu),
    pytest.param([math.prod(shape) for shape in GPT2_SMALL.shapes()], id="gpt2-small", marks=needs_gpu),
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def dtype_name(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=SIZES)
def case(request, dtype_name) -> KernelCase:
    return KernelCase.make(dtype_name, NUM_TASKS, request.param, DEVICE)


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda candidate: f"{candidate.kernel_pass}-{candidate.label}")
def test_kernel_pass(benchmark, case, candidate):
    call = case.calls(BACKENDS)[candidate]

    def synchronised():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    where = f"P={case.numel:,} in {len(case.blocks)} tensors"
    benchmark.group = f"{candidate.kernel_pass}, T={NUM_TASKS}, {where}, {case.blocks[0].dtype}"
    benchmark.extra_info["bytes"] = pass_bytes(candidate.kernel_pass, NUM_TASKS, case.numel, case.element_size)
    benchmark(synchronised)
