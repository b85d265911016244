"""pytest-benchmark suite of the weighting solvers: ``python -m pytest bench -k weightings``.

One call of every weighting of :data:`emtl_kernels.WEIGHTINGS` (default options) for each T of
:data:`bench.bench_weightings.NUM_TASKS`, on the inputs of :mod:`bench.bench_weightings`, and in
each T's group the Gram pass over a ``[T, 2²⁰]`` float32 matrix (the "auto" backend): the
baseline the group's relative times are read against. The interleaved run, with CUDA-graph
replays on a GPU, comes from ``python -m bench``.
"""

import pytest
import torch

from bench.bench_weightings import NUM_TASKS, solver_inputs
from emtl_kernels import WEIGHTINGS, TaskGradients, task_gram

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAM_NUMEL = 2**20


def _benchmark_synchronised(benchmark, call):
    def synchronised():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(synchronised)


@pytest.mark.parametrize("num_tasks", NUM_TASKS, ids=lambda num_tasks: f"T={num_tasks}")
@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_weighting(benchmark, name, num_tasks):
    losses, gram = solver_inputs(num_tasks, DEVICE)
    if name == "krum" and num_tasks < 3:
        pytest.skip("Krum needs at least 3 tasks")
    weighting = WEIGHTINGS[name]()
    benchmark.group = f"weightings, T={num_tasks}, {DEVICE.type}"
    _benchmark_synchronised(benchmark, lambda: weighting(losses, gram))


@pytest.mark.parametrize("num_tasks", NUM_TASKS, ids=lambda num_tasks: f"T={num_tasks}")
def test_gram_pass(benchmark, num_tasks):
    grads = TaskGradients.from_matrix(torch.randn(num_tasks, GRAM_NUMEL, device=DEVICE))
    benchmark.group = f"weightings, T={num_tasks}, {DEVICE.type}"
    benchmark.extra_info["numel"] = GRAM_NUMEL
    _benchmark_synchronised(benchmark, lambda: task_gram(grads))
