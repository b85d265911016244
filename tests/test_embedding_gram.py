"""An embedding table's Gram contribution (:mod:`emtl_kernels.embedding_gram`) against its float64
twin: each task's whole ``[V, d]`` table gradient from PyTorch's own embedding backward, then
their dot products."""

from __future__ import annotations

import pytest
import torch
from _asserts import assert_within, gram64

from emtl_kernels.embedding_gram import embedding_gram

VOCAB = 11
# Beyond the Gram pass's own rounding, each merged row is a float32 sum of its repeats' rows.
EMBEDDING_GRAM_RTOL = 2e-5


def embedding_gram64(indices, output_grads, padding_idx=None, scale_grad_by_freq=False):
    """The float64 twin: every task's table gradient by ``aten.embedding_dense_backward``."""
    table_grads = [
        torch.ops.aten.embedding_dense_backward(
            grad.double(), indices, VOCAB, -1 if padding_idx is None else padding_idx, scale_grad_by_freq
        ).reshape(-1)
        for grad in output_grads
    ]
    return gram64(torch.stack(table_grads))


def lookups(num_tasks: int, shape: tuple[int, ...], width: int = 6, dtype=torch.float32, seed: int = 0):
    """Indices with repeats (N > V where N allows) and D with task gradients of different scales."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, VOCAB, shape, generator=generator)
    scales = torch.logspace(-2, 2, num_tasks).reshape(-1, *[1] * (len(shape) + 1))
    output_grads = (scales * torch.randn(num_tasks, *shape, width, generator=generator)).to(dtype)
    return indices, output_grads


def assert_gram_near(gram: torch.Tensor, expected: torch.Tensor, rtol: float = EMBEDDING_GRAM_RTOL) -> None:
    assert gram.dtype == torch.float32
    scale = expected.diagonal().sqrt()
    assert_within(gram, expected, rtol * torch.outer(scale, scale) + 1e-30, "Gram matrix")


@pytest.mark.parametrize("shape", [(), (7,), (4, 9), (2, 3, 5)], ids=["0-D", "1-D", "2-D", "3-D"])
@pytest.mark.parametrize("padding_idx", [None, 0, VOCAB - 1])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_the_gram_matrix_of_the_table_gradients(shape, padding_idx, scale_grad_by_freq):
    indices, output_grads = lookups(3, shape, seed=len(shape))
    if indices.numel() > 1 and padding_idx is not None:
        indices.view(-1)[:2] = padding_idx  # the padding row is looked up, and twice
    gram = embedding_gram(indices, output_grads, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    assert_gram_near(gram, embedding_gram64(indices, output_grads, padding_idx, scale_grad_by_freq))
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=0)


@pytest.mark.parametrize("num_tasks", [1, 2, 8, 17])
def test_any_task_count_and_int32_indices(num_tasks):
    indices, output_grads = lookups(num_tasks, (6, 8), seed=num_tasks)
    gram = embedding_gram(indices.int(), output_grads)
    assert_gram_near(gram, embedding_gram64(indices, output_grads))


def test_repeated_rows_are_summed_before_their_products():
    """Every lookup of one row: G is that of the summed rows, not the sum of each lookup's G."""
    indices = torch.full((5,), 4)
    _, output_grads = lookups(3, (5,))
    gram = embedding_gram(indices, output_grads)
    summed = output_grads.double().sum(dim=1)
    assert_gram_near(gram, summed @ summed.T)
    per_lookup = torch.einsum("inc,jnc->ij", output_grads.double(), output_grads.double())
    assert (gram.double() - per_lookup).abs().max() > 0.1 * per_lookup.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_are_summed_in_float32(dtype):
    indices, output_grads = lookups(4, (5, 7), dtype=dtype)
    assert_gram_near(embedding_gram(indices, output_grads), embedding_gram64(indices, output_grads))


def test_non_contiguous_output_gradients():
    indices, output_grads = lookups(3, (6, 5))
    strided = output_grads.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)[:, ::2]
    assert not strided.is_contiguous()
    assert_gram_near(embedding_gram(indices[::2], strided), embedding_gram64(indices[::2], output_grads[:, ::2]))


def test_no_lookup_contributes_zero():
    indices, output_grads = lookups(3, (0,))
    torch.testing.assert_close(embedding_gram(indices, output_grads), torch.zeros(3, 3), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("indices", "output_grads", "error", "match"),
    [
        (torch.zeros(4), torch.zeros(2, 4, 3), TypeError, "int64 or int32"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(2, 5, 3), ValueError, r"\[T, \*indices.shape, d\]"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, 3), ValueError, r"\[T, \*indices.shape, d\]"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(2, 4, 3, dtype=torch.float64), TypeError, "dtype among"),
    ],
)
def test_bad_input_is_refused_by_name(indices, output_grads, error, match):
    with pytest.raises(error, match=match):
        embedding_gram(indices, output_grads)
