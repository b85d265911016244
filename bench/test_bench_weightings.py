"""pytest-benchmark suite of the weighting solvers: ``python -m pytest bench -k weightings``.

One call of every weighting of :data:`emtl_kernels.WEIGHTINGS` (default options) for each T of
:data:`bench.bench_weightings.NUM_TASKS`, on the inputs of :mod:`bench.bench_weightings`, and in
each T's group the Gram pass over a ``[T, 2²⁰]`` float32 matrix (the "auto" backend): the
baseline the group's relative times are read against. The interleaved run, with CUDA-graph
replays on a GPU, comes from ``python -m bench``.

On a GPU, also the one-launch Triton solves of :mod:`emtl_kernels.weightings._triton_solvers` on
the same G: UPGrad's T dual-cone projections, DualProj's one, MGDA's min-norm point, the Jacobi
eigen-decomposition of IMTL-G and Aligned-MTL (the weightings' own rows time them once the
weightings call them on CUDA tensors).
"""

import pytest
import torch

from bench.bench_weightings import NUM_TASKS, solver_inputs
from emtl_kernels import WEIGHTINGS, TaskGradients, task_gram
from emtl_kernels.weightings._triton_solvers import (
    min_norm_weights,
    project_onto_dual_cone,
    symmetric_eigh,
    triton_solve_unavailable,
)

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


def _one_launch_solves(gram: torch.Tensor) -> dict:
    num_tasks = gram.shape[0]
    preferences = torch.eye(num_tasks, device=gram.device) / num_tasks
    mean = torch.full((1, num_tasks), 1 / num_tasks, device=gram.device)
    options = dict(norm_eps=0.0, reg_eps=1e-4, method="triton")
    return {
        "upgrad": lambda: project_onto_dual_cone(gram, preferences, **options),
        "dualproj": lambda: project_onto_dual_cone(gram, mean, **options),
        "mgda": lambda: min_norm_weights(gram, dtype=torch.float32, method="triton"),
        "eigh": lambda: symmetric_eigh(gram, method="triton"),
    }


@pytest.mark.skipif(
    triton_solve_unavailable(DEVICE, 1) is not None or DEVICE.type != "cuda",
    reason="the one-launch solves run on CUDA devices (on a CPU only in Triton's interpreter)",
)
@pytest.mark.parametrize("num_tasks", NUM_TASKS, ids=lambda num_tasks: f"T={num_tasks}")
@pytest.mark.parametrize("problem", ["upgrad", "dualproj", "mgda", "eigh"])
def test_one_launch_solve(benchmark, problem, num_tasks):
    _, gram = solver_inputs(num_tasks, DEVICE)
    benchmark.group = f"weightings, T={num_tasks}, {DEVICE.type}"
    _benchmark_synchronised(benchmark, _one_launch_solves(gram)[problem])
