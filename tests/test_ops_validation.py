"""Bad input to the ops and to TaskGradients raises a clear error, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from emtl_kernels import TaskGradients, available_backends, task_gram, task_sq_norms, weighted_combine
from emtl_kernels.backends import backend_names, resolve


def test_task_gradients_views_the_pieces_it_is_given():
    matrix = torch.randn(3, 10)
    grads = TaskGradients.from_matrix(matrix)
    assert (grads.num_tasks, grads.numel, grads.sizes) == (3, 10, (10,))
    assert grads.rows[1][0].data_ptr() == matrix[1].data_ptr()
    blocks = [torch.randn(3, 2, 5), torch.randn(3, 4)]
    grads = TaskGradients.from_blocks(blocks)
    assert grads.sizes == (10, 4) and grads.numel == 14
    assert grads.rows[2][0].data_ptr() == blocks[0][2].data_ptr()
    assert [p.data_ptr() for p in grads.column(1)] == [b.data_ptr() for b in blocks[1]]


def test_task_gradients_copies_only_strided_pieces():
    strided = torch.randn(10, 3).T
    grads = TaskGradients.from_matrix(strided)
    assert all(row[0].is_contiguous() for row in grads.rows)
    assert torch.equal(torch.stack([row[0] for row in grads.rows]), strided)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: TaskGradients([]), ValueError, "at least one task"),
        (lambda: TaskGradients([[]]), ValueError, "at least one shared tensor"),
        (
            lambda: TaskGradients([[torch.ones(3)], [torch.ones(3), torch.ones(1)]]),
            ValueError,
            "one gradient per shared tensor",
        ),
        (lambda: TaskGradients([[torch.ones(3)], [torch.ones(4)]]), ValueError, "elements"),
        (lambda: TaskGradients([[torch.ones(3)], [torch.ones(3, dtype=torch.float16)]]), TypeError, "one dtype"),
        (lambda: TaskGradients([[torch.ones(3)], [torch.ones(3, device="meta")]]), ValueError, "one device"),
        (lambda: TaskGradients([[torch.ones(3, dtype=torch.int32)]]), TypeError, "supported storage dtypes"),
        (lambda: TaskGradients([[torch.ones(3, dtype=torch.float64)]]), TypeError, "supported storage dtypes"),
        (lambda: TaskGradients([[torch.ones(0)]]), ValueError, "no elements"),
        (lambda: TaskGradients([[[1.0, 2.0]]]), TypeError, "not a tensor"),
        (lambda: TaskGradients.from_matrix(torch.ones(3)), ValueError, r"\[T, P\]"),
        (lambda: TaskGradients.from_blocks([]), ValueError, "at least one block"),
        (lambda: TaskGradients.from_blocks([torch.ones(2, 3), torch.ones(3, 3)]), ValueError, "same T"),
    ],
)
def test_bad_task_gradients_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_op_input_raises():
    grads = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"\[T, P\] tensor or TaskGradients"):
        task_gram([[1.0]])
    with pytest.raises(ValueError, match="unknown backend"):
        task_sq_norms(grads, backend="fortran")
    with pytest.raises(ValueError, match="1-D tensor of T=3"):
        weighted_combine(grads, torch.ones(2))
    with pytest.raises(TypeError, match="floating point"):
        weighted_combine(grads, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights are on meta"):
        weighted_combine(grads, torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="accumulate=True needs an `out`"):
        weighted_combine(grads, torch.ones(3), accumulate=True)
    with pytest.raises(ValueError, match="one tensor per shared tensor"):
        weighted_combine(grads, torch.ones(3), out=[torch.empty(4), torch.empty(4)])
    with pytest.raises(ValueError, match="has 7 elements"):
        weighted_combine(grads, torch.ones(3), out=torch.empty(7))
    with pytest.raises(TypeError, match="dtype"):
        weighted_combine(grads, torch.ones(3), out=torch.empty(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="is on meta"):
        weighted_combine(grads, torch.ones(3), out=torch.empty(8, device="meta"))


def test_backend_registry():
    assert "reference" in available_backends("cpu")
    assert set(available_backends("cpu")) <= set(backend_names())
    assert resolve("reference", torch.device("cpu")).name == "reference"
    assert resolve("auto", torch.device("cpu")).name == "auto"
    with pytest.raises(ValueError, match="unknown backend 'cuda'; known: auto, triton, native, reference"):
        resolve("cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend 'native' cannot run on meta"):
        resolve("native", torch.device("meta"))
