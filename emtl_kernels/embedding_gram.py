"""One embedding table's T×T Gram contribution from its indices and its T output gradients,
without the ``[T, V, d]`` table gradients.

An embedding Y = W[indices] (W ``[V, d]``, N indices) gets task i's table gradient by adding row n
of its output gradient D_i ``[N, d]`` into row ``indices[n]``: at most N of its V rows are not
zero. So its share of the Gram matrix is that of the task gradients restricted to the rows the
batch touches, each the sum of D_i over the repeats of its index.

The rows are merged in a form whose size does not depend on the data (no ``torch.unique``, whose
output size would need a host synchronisation): the indices are sorted, the r-th distinct index
takes row r of an ``[T, N, d]`` buffer, and the rows past the distinct count stay zero, adding
nothing to G. ``nn.Embedding``'s ``padding_idx`` (its row gets no gradient) and
``scale_grad_by_freq`` (each row divided by its index's count in the batch) scale the merged
rows; ``max_norm`` renormalises W in the forward only and leaves the gradient a plain sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import task_gram
from .task_gradients import SUPPORTED_DTYPES


def embedding_gram(
    indices: Tensor,
    output_grads: Tensor,
    *,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    backend: str = "auto",
) -> Tensor:
    """G_ij = ⟨dW_i, dW_j⟩: ``[T, T]`` float32, the Gram matrix of an embedding table's T
    gradients, formed on the rows the batch touches only.

    Args:
        indices: the looked-up rows, any shape (N indices in all), an integer tensor.
        output_grads: D, task i's gradient of the embedding's output in row i: ``[T, *indices.shape, d]``.
        padding_idx: the row that gets no gradient, as in ``nn.Embedding`` (None: none).
        scale_grad_by_freq: divide each row's gradient by its index's count in ``indices``.
        backend: the Gram pass's backend, as for :func:`emtl_kernels.task_gram`.
    """
    _check(indices, output_grads)
    num_tasks, width = output_grads.shape[0], output_grads.shape[-1]
    if output_grads.numel() == 0:
        return torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=output_grads.device)
    rows = output_grads.reshape(num_tasks, -1, width)
    merged = _merged_rows(indices.reshape(-1), rows, padding_idx, scale_grad_by_freq)
    return task_gram(merged.view(num_tasks, -1), backend=backend)


def _merged_rows(indices: Tensor, rows: Tensor, padding_idx: int | None, scale_grad_by_freq: bool) -> Tensor:
    """``[T, N, d]`` float32: row r holds the gradient of the r-th distinct index (in sorted
    order) of the N ``indices``, the rows after the last distinct index zero."""
    sorted_indices, order = torch.sort(indices, stable=True)
    starts = torch.ones_like(sorted_indices, dtype=torch.bool)
    starts[1:] = sorted_indices[1:] != sorted_indices[:-1]
    run_of_sorted = torch.cumsum(starts, 0) - 1
    run = torch.empty_like(run_of_sorted).scatter_(0, order, run_of_sorted)
    merged = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    merged.index_add_(1, run, rows.float())
    if padding_idx is None and not scale_grad_by_freq:
        return merged
    # One factor per merged row: 0 for the padding row, 1 over its index's count if scaled.
    factor = torch.ones(len(indices), dtype=torch.float32, device=rows.device)
    if scale_grad_by_freq:
        counts = torch.zeros_like(factor).index_add_(0, run, torch.ones_like(factor))
        factor = factor / counts.clamp_min(1)
    if padding_idx is not None:
        index_of_run = torch.full_like(indices, -1).scatter_(0, run_of_sorted, sorted_indices)
        factor = factor * (index_of_run != padding_idx)
    return merged.mul_(factor.unsqueeze(-1))


def _check(indices: Tensor, output_grads: Tensor) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if output_grads.dim() != indices.dim() + 2 or output_grads.shape[1:-1] != indices.shape:
        raise ValueError(
            f"an embedding's Gram matrix needs output gradients [T, *indices.shape, d], got indices "
            f"{tuple(indices.shape)} and output gradients {tuple(output_grads.shape)}"
        )
    if output_grads.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"output gradients must have a dtype among {SUPPORTED_DTYPES}, got {output_grads.dtype}")
    if indices.device != output_grads.device:
        raise ValueError(
            f"indices and output gradients must share a device, got {indices.device} and {output_grads.device}"
        )
