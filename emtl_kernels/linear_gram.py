"""One linear layer's T×T Gram contribution from its input and its T output gradients, without
the ``[T, out, in]`` weight gradients.

A linear layer Y = X Wᵀ (X ``[N, in]``, W ``[out, in]``) gets task i's weight gradient
dW_i = D_iᵀ X from its output gradient D_i ``[N, out]``, so its share of the Gram matrix is
G_ij = ⟨D_iᵀ X, D_jᵀ X⟩. Two ways to form it, chosen by their multiply-adds:

- direct: dW tile by tile over rows of ``out``, each tile ``[T, r, in]`` reduced by the fused
  Gram pass and freed: T·N·out·in + T²/2·out·in, at most one tile in memory;
- ghost: with K = X Xᵀ ``[N, N]``, G_ij = ⟨D_i, K D_j⟩, tile by tile over columns of ``out``:
  N²·in + T·N²·out + T²·N·out, which pays where N is small next to ``in``.

Products accumulate in float32 whatever the storage dtype, as the Gram pass does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .ops import task_gram
from .task_gradients import SUPPORTED_DTYPES

Form = Literal["auto", "direct", "ghost"]

#: Elements of one tile when no budget is given and the layer's ``[N, out]`` slab is smaller.
MIN_TILE_ELEMENTS = 1 << 16


def linear_gram(
    inputs: Tensor,
    output_grads: Tensor,
    *,
    form: Form = "auto",
    tile_elements: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """G_ij = ⟨D_iᵀ X, D_jᵀ X⟩: ``[T, T]`` float32, the Gram matrix of a linear layer's T weight
    gradients, never forming them whole.

    Args:
        inputs: X, the layer's input ``[N, in]``.
        output_grads: D, task i's gradient of the layer's output in row i: ``[T, N, out]``.
        form: "direct", "ghost" or "auto" (the one of fewer multiply-adds, see :func:`cheaper_form`).
        tile_elements: the most elements a tile holds (a float32 ``[T, r, in]`` weight-gradient
            tile, or ``[T, N, c]`` of K D); by default one ``[N, out]`` slab, at least
            :data:`MIN_TILE_ELEMENTS`.
        backend: the Gram pass's backend, as for :func:`emtl_kernels.task_gram`.
    """
    _check(inputs, output_grads, form, tile_elements)
    num_tasks, rows, out_features = output_grads.shape
    in_features = inputs.shape[1]
    if output_grads.numel() == 0 or inputs.numel() == 0:
        return torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=inputs.device)
    budget = tile_elements if tile_elements is not None else max(rows * out_features, MIN_TILE_ELEMENTS)
    if form == "auto":
        form = cheaper_form(num_tasks, rows, in_features, out_features)
    if form == "direct":
        return _direct(inputs.float(), output_grads, budget, backend)
    return _ghost(inputs.float(), output_grads, budget)


def cheaper_form(num_tasks: int, rows: int, in_features: int, out_features: int) -> Literal["direct", "ghost"]:
    """The form of fewer multiply-adds for T tasks, N rows and an ``[out, in]`` weight."""
    direct = num_tasks * rows * out_features * in_features + num_tasks**2 * out_features * in_features // 2
    ghost = rows**2 * in_features + num_tasks * rows**2 * out_features + num_tasks**2 * rows * out_features
    return "ghost" if ghost < direct else "direct"


def _direct(inputs: Tensor, output_grads: Tensor, budget: int, backend: str) -> Tensor:
    num_tasks, _, out_features = output_grads.shape
    in_features = inputs.shape[1]
    gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=inputs.device)
    step = max(1, min(out_features, budget // (num_tasks * in_features)))
    for start in range(0, out_features, step):
        tile_grads = output_grads[:, :, start : start + step].float().transpose(1, 2)
        gram += task_gram(torch.matmul(tile_grads, inputs).view(num_tasks, -1), backend=backend)
    return gram


def _ghost(inputs: Tensor, output_grads: Tensor, budget: int) -> Tensor:
    num_tasks, rows, out_features = output_grads.shape
    kernel = inputs @ inputs.T
    gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=inputs.device)
    step = max(1, min(out_features, budget // (num_tasks * rows)))
    for start in range(0, out_features, step):
        tile_grads = output_grads[:, :, start : start + step].float()
        gram += torch.einsum("inc,jnc->ij", tile_grads, torch.matmul(kernel, tile_grads))
    # K is symmetric, its float32 products not quite: G keeps the symmetry the direct form has.
    return (gram + gram.T) / 2


def _check(inputs: Tensor, output_grads: Tensor, form: str, tile_elements: int | None) -> None:
    if form not in ("auto", "direct", "ghost"):
        raise ValueError(f"form must be 'auto', 'direct' or 'ghost', got {form!r}")
    if tile_elements is not None and tile_elements < 1:
        raise ValueError(f"tile_elements must be a positive number of elements, got {tile_elements}")
    if inputs.dim() != 2 or output_grads.dim() != 3:
        raise ValueError(
            f"a linear layer's Gram matrix needs inputs [N, in] and output gradients [T, N, out], "
            f"got {tuple(inputs.shape)} and {tuple(output_grads.shape)}"
        )
    if inputs.shape[0] != output_grads.shape[1]:
        raise ValueError(
            f"inputs and output gradients must have the same N rows, got {inputs.shape[0]} and {output_grads.shape[1]}"
        )
    for name, tensor in (("inputs", inputs), ("output gradients", output_grads)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a dtype among {SUPPORTED_DTYPES}, got {tensor.dtype}")
    if inputs.device != output_grads.device:
        raise ValueError(
            f"inputs and output gradients must share a device, got {inputs.device} and {output_grads.device}"
        )
