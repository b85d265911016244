"""Every backend's ops against float64 computations, over T, P, dtypes and layouts."""

from __future__ import annotations

import pytest
import torch
from _asserts import assert_combine_close, assert_gram_close, assert_sq_norms_close, combine64, flat_output
from task_gradient_cases import LAYOUTS, make_task_gradients

from emtl_kernels import TaskGradients, available_backends, task_gram, task_sq_norms, weighted_combine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_DEVICES = [(b, d) for d in DEVICES for b in available_backends(d)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_TASKS = [1, 2, 3, 6, 8, 17, 32]
NUMELS = [1, 7, 1000, 4099]
# Triton on a CPU runs in its interpreter, which is slow: there the matrix keeps every layout and
# size but fewer T and dtypes; test_triton_backend.py runs Triton's full T × P × dtype matrix.
INTERPRETED_DTYPES = [torch.float32, torch.bfloat16]
INTERPRETED_NUM_TASKS = [1, 3, 17]


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


MATRIX = [
    pytest.param(backend, device, dtype, num_tasks, id=f"{backend}-{device}-{dtype}-{num_tasks}")
    for backend, device in BACKEND_DEVICES
    for dtype in (INTERPRETED_DTYPES if interpreted(backend, device) else DTYPES)
    for num_tasks in (INTERPRETED_NUM_TASKS if interpreted(backend, device) else NUM_TASKS)
]


@pytest.mark.parametrize("backend,device,dtype,num_tasks", MATRIX)
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gram_and_norms_match_float64(backend, device, dtype, num_tasks, numel, layout):
    grads, exact = make_task_gradients(num_tasks, numel, dtype, layout, device=device, seed=numel + num_tasks)
    gram = task_gram(grads, backend=backend)
    assert gram.shape == (num_tasks, num_tasks)
    assert_gram_close(gram, exact)
    assert torch.equal(gram, gram.T)
    assert_sq_norms_close(task_sq_norms(grads, backend=backend), exact)


@pytest.mark.parametrize("backend,device,dtype,num_tasks", MATRIX)
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_matches_float64(backend, device, dtype, num_tasks, numel, layout):
    grads, exact = make_task_gradients(num_tasks, numel, dtype, layout, device=device, seed=numel * num_tasks)
    weights = torch.randn(num_tasks, generator=torch.Generator().manual_seed(numel)).to(device)
    expected, scale = combine64(exact, weights)
    assert_combine_close(weighted_combine(grads, weights, backend=backend), expected, scale, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_accumulates_into_out(backend, device, dtype, layout):
    num_tasks, numel = 3, 1000
    grads, exact = make_task_gradients(num_tasks, numel, dtype, layout, device=device, seed=7)
    weights = torch.tensor([0.5, -2.0, 3.0], device=device)
    grads = grads if isinstance(grads, TaskGradients) else TaskGradients.from_matrix(grads)
    before = [torch.randn(size, dtype=torch.float64).to(dtype).to(device) for size in grads.sizes]
    out = [b.clone() for b in before]
    returned = weighted_combine(grads, weights, out=out, accumulate=True, backend=backend)
    assert all(r is o for r, o in zip(returned, out, strict=True))
    expected, scale = combine64(exact, weights)
    start = flat_output(before)
    assert_combine_close(out, expected + start, scale + start.abs(), dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_combine_into_noncontiguous_out(backend, device):
    grads, exact = make_task_gradients(4, 60, torch.float32, "matrix", device=device)
    weights = torch.linspace(-1, 1, 4, device=device)
    out = torch.zeros(10, 6, device=device).T  # 60 elements in a (6, 10) view, not contiguous
    returned = weighted_combine(grads, weights, out=out, backend=backend)
    assert returned is out
    expected, scale = combine64(exact, weights)
    assert_combine_close(out, expected, scale, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_combine_accumulates_into_parameter_shaped_grads(backend, device):
    """Destinations shaped like the parameters' ``.grad`` (contiguous, several dimensions) are
    written in place, each element where a flat view of it would put it."""
    sizes, shapes = (24, 5, 60), ((2, 3, 4), (5,), (6, 10))
    values, exact = make_task_gradients(3, sum(sizes), torch.float32, "matrix", device=device, seed=12)
    grads = TaskGradients([list(row.split(sizes)) for row in values])
    weights = torch.tensor([1.5, -0.5, 2.0], device=device)
    before = [torch.randn(shape, device=device) for shape in shapes]
    outs = [b.clone() for b in before]
    returned = weighted_combine(grads, weights, out=outs, accumulate=True, backend=backend)
    assert all(r is o and r.shape == shape for r, o, shape in zip(returned, outs, shapes, strict=True))
    expected, scale = combine64(exact, weights)
    start = flat_output(before)
    assert_combine_close(outs, expected + start, scale + start.abs(), torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_weight_rows_contribute_nothing_even_when_non_finite(backend, device, dtype):
    grads, exact = make_task_gradients(3, 777, dtype, "matrix", device=device, seed=3)
    grads[1, 5] = float("nan")
    grads[1, 9] = float("inf")
    weights = torch.tensor([2.0, 0.0, -1.0], device=device)
    expected, scale = combine64(torch.stack([exact[0], torch.zeros_like(exact[1]), exact[2]]), weights)
    assert_combine_close(weighted_combine(grads, weights, backend=backend), expected, scale, dtype)
    assert torch.equal(
        weighted_combine(grads, torch.zeros(3, device=device), backend=backend), torch.zeros_like(grads[0])
    )


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_shows_on_the_gram_diagonal(backend, device, bad):
    grads, _ = make_task_gradients(4, 301, torch.float32, "matrix", device=device, seed=4)
    grads[2, 150] = bad
    finite = torch.isfinite(task_gram(grads, backend=backend).diagonal()).cpu()
    assert finite.tolist() == [True, True, False, True]
    assert not torch.isfinite(task_sq_norms(grads, backend=backend)[2])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ops_are_deterministic(backend, device):
    grads, _ = make_task_gradients(8, 4099, torch.float32, "rows", device=device, seed=5)
    weights = torch.randn(8).to(device)
    assert torch.equal(task_gram(grads, backend=backend), task_gram(grads, backend=backend))
    assert torch.equal(
        flat_output(weighted_combine(grads, weights, backend=backend)),
        flat_output(weighted_combine(grads, weights, backend=backend)),
    )
