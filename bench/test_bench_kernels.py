"""pytest-benchmark suite of the kernel passes: ``python -m pytest bench -k kernels``.

Each backend's Gram and combine pass over a ``[8, 2²⁰]`` matrix, and a copy of the same matrix as
the baseline; ``extra_info["bytes"]`` holds the bytes each moves (reads plus writes), so GB/s is
bytes over the reported time. The full sweep and its report come from ``python -m bench``.
"""

import pytest
import torch

from bench.backends import measured_backends
from bench.kernels import KernelCase, pass_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS, _ = measured_backends(DEVICE)
NUM_TASKS, NUMEL = 8, 2**20


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request) -> KernelCase:
    return KernelCase.make(request.param, NUM_TASKS, NUMEL, DEVICE)


def _run(benchmark, case: KernelCase, kernel_pass: str, backend: str | None) -> None:
    call = case.calls(BACKENDS)[(kernel_pass, backend)]

    def synchronised():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["bytes"] = pass_bytes(kernel_pass, NUM_TASKS, NUMEL, case.matrix.element_size())
    benchmark(synchronised)


def test_copy_baseline(benchmark, case):
    _run(benchmark, case, "copy", None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel_pass", ["gram", "combine"])
def test_kernel_pass(benchmark, case, kernel_pass, backend):
    _run(benchmark, case, kernel_pass, backend)
