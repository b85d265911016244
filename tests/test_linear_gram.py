"""A linear layer's Gram contribution (:mod:`emtl_kernels.linear_gram`) against its float64 twin,
which forms the T weight gradients D_iᵀ X and their dot products, and against the fused Gram pass
on the materialised float32 weight gradients."""

from __future__ import annotations

import pytest
import torch
from _asserts import assert_within, gram64

from bench.memory import cpu_peak_increase
from emtl_kernels.linear_gram import cheaper_form, linear_gram
from emtl_kernels.ops import task_gram

# Beyond the Gram pass's own rounding, each weight-gradient element is a float32 dot product of
# N terms (N up to 37 here), relative to sqrt(G_ii G_jj).
LINEAR_GRAM_RTOL = 2e-5


def linear_gram64(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """The float64 twin: every task's weight gradient D_iᵀ X, then their Gram matrix."""
    weight_grads = torch.einsum("tno,ni->toi", output_grads.double(), inputs.double())
    return gram64(weight_grads.reshape(len(output_grads), -1))


def materialised_gram(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """The fused Gram pass on the whole float32 ``[T, out, in]`` block."""
    weight_grads = torch.einsum("tno,ni->toi", output_grads.float(), inputs.float())
    return task_gram(weight_grads.reshape(len(output_grads), -1))


def layer(num_tasks: int, rows: int, in_features: int, out_features: int, dtype=torch.float32, seed: int = 0):
    """X and D with task gradients of different scales, so that G's entries span decades."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, in_features, generator=generator).to(dtype)
    scales = torch.logspace(-2, 2, num_tasks).reshape(-1, 1, 1)
    output_grads = (scales * torch.randn(num_tasks, rows, out_features, generator=generator)).to(dtype)
    return inputs, output_grads


def assert_gram_near(gram: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert gram.dtype == torch.float32
    scale = expected.diagonal().double().sqrt()
    assert_within(gram, expected.double(), rtol * torch.outer(scale, scale) + 1e-30, "Gram matrix")


@pytest.mark.parametrize("form", ["direct", "ghost", "auto"])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 17])
def test_both_forms_give_the_float64_gram_matrix_of_the_weight_gradients(form, num_tasks):
    inputs, output_grads = layer(num_tasks, rows=37, in_features=23, out_features=29, seed=num_tasks)
    gram = linear_gram(inputs, output_grads, form=form)
    assert_gram_near(gram, linear_gram64(inputs, output_grads), LINEAR_GRAM_RTOL)
    assert_gram_near(gram, materialised_gram(inputs, output_grads).double(), LINEAR_GRAM_RTOL)
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["direct", "ghost"])
@pytest.mark.parametrize("tile_elements", [1, 97, 10**6])
def test_any_tile_size_gives_the_same_gram_matrix(form, tile_elements):
    """From one row (or column) of ``out`` a tile to the whole layer in one tile."""
    inputs, output_grads = layer(3, rows=11, in_features=13, out_features=19)
    gram = linear_gram(inputs, output_grads, form=form, tile_elements=tile_elements)
    assert_gram_near(gram, linear_gram64(inputs, output_grads), LINEAR_GRAM_RTOL)


@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_non_contiguous_inputs_and_output_gradients(form):
    inputs, output_grads = layer(5, rows=17, in_features=9, out_features=14)
    strided_inputs = inputs.T.contiguous().T
    strided_grads = output_grads.permute(2, 0, 1).contiguous().permute(1, 2, 0)[:, ::2]
    assert not strided_inputs.is_contiguous() and not strided_grads.is_contiguous()
    gram = linear_gram(strided_inputs[::2], strided_grads, form=form, tile_elements=50)
    assert_gram_near(gram, linear_gram64(inputs[::2], output_grads[:, ::2]), LINEAR_GRAM_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_half_precision_layers_accumulate_in_float32(dtype, form):
    """Half-precision X and D widen exactly: the float64 twin of their values is the reference,
    and the float32 products keep the float32 bound (rounding each weight gradient to the storage
    dtype first would miss it)."""
    inputs, output_grads = layer(4, rows=31, in_features=21, out_features=10, dtype=dtype)
    gram = linear_gram(inputs, output_grads, form=form)
    assert_gram_near(gram, linear_gram64(inputs, output_grads), LINEAR_GRAM_RTOL)


def test_the_ghost_form_is_chosen_where_rows_are_few_next_to_the_features():
    assert cheaper_form(8, rows=4, in_features=256, out_features=256) == "ghost"
    assert cheaper_form(8, rows=512, in_features=256, out_features=1024) == "direct"
    assert cheaper_form(1, rows=1, in_features=1, out_features=1) == "direct"


@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_a_tile_bounds_the_memory_instead_of_the_weight_gradients(form):
    """The ``[T, out, in]`` block is 8 MiB here; the direct form's tiles hold 64 Ki float32
    elements, the ghost form's ``[T, N, c]`` too, besides the [N, N] kernel."""
    num_tasks, rows, in_features, out_features = 8, 64, 256, 1024
    inputs, output_grads = layer(num_tasks, rows, in_features, out_features)
    block_bytes = num_tasks * out_features * in_features * 4
    tile_elements = 1 << 16
    peak = cpu_peak_increase(lambda: linear_gram(inputs, output_grads, form=form, tile_elements=tile_elements))
    # The float32 tile, its transposed copy of D in the product, and the ghost form's kernel.
    assert peak <= 3 * tile_elements * 4 + rows * rows * 4 + 4096 < block_bytes / 8


def test_a_layer_without_rows_or_features_contributes_zero():
    for rows, in_features, out_features in [(0, 3, 4), (5, 0, 4), (5, 3, 0)]:
        inputs, output_grads = layer(3, rows, in_features, out_features)
        torch.testing.assert_close(linear_gram(inputs, output_grads), torch.zeros(3, 3), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("inputs", "output_grads", "options", "error", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(2, 4, 5), {"form": "fast"}, ValueError, "form must be"),
        (torch.zeros(4, 3), torch.zeros(2, 4, 5), {"tile_elements": 0}, ValueError, "tile_elements"),
        (torch.zeros(4, 3, 1), torch.zeros(2, 4, 5), {}, ValueError, r"inputs \[N, in\]"),
        (torch.zeros(4, 3), torch.zeros(4, 5), {}, ValueError, r"\[T, N, out\]"),
        (torch.zeros(4, 3), torch.zeros(2, 6, 5), {}, ValueError, "same N rows"),
        (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(2, 4, 5), {}, TypeError, "inputs must have a dtype"),
        (torch.zeros(4, 3), torch.zeros(2, 4, 5, dtype=torch.int32), {}, TypeError, "output gradients must"),
    ],
)
def test_bad_input_is_refused_by_name(inputs, output_grads, options, error, match):
    with pytest.raises(error, match=match):
        linear_gram(inputs, output_grads, **options)
