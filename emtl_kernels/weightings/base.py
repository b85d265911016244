"""What a weighting is: a map from (losses, Gram matrix) to T task weights, on the device."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

#: Which entries of the Gram matrix a weighting reads. "diagonal": the squared norms only;
#: "diagonal_and_total": those and the sum of all entries, 1ᵀG1 = ‖Σ_i g_i‖²; "full": all of G.
#: A step in memory mode never forms G: it hands a weighting that reads less than "full" a matrix
#: with the exact diagonal (and exact total), other entries undefined.
GramUse = Literal["diagonal", "diagonal_and_total", "full"]


class Weighting:
    """Base of the weightings: ``weighting(losses, gram) -> weights``.

    ``losses`` is ``[T]`` (detached), ``gram`` the ``[T, T]`` float32 Gram matrix of the task
    gradients on the shared parameters. The weights, ``[T]`` on the losses' device, are held
    constant by the step: the update is the gradient of Σ_i w_i L_i. Subclasses implement
    :meth:`weights` with tensor ops only (no ``.item()``, no data-dependent Python branch), so a
    step stays capturable in a CUDA graph, and declare :attr:`gram_use`.
    """

    gram_use: GramUse = "full"

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, losses: Tensor, gram: Tensor) -> Tensor:
        check_weighting_inputs(losses, gram)
        return self.weights(losses, gram)


def check_weighting_inputs(losses: Tensor, gram: Tensor) -> None:
    """Shape, dtype and device checks shared by every weighting (metadata only, no sync)."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor [T], got shape {tuple(losses.shape)}")
    num_tasks = losses.numel()
    if gram.shape != (num_tasks, num_tasks):
        raise ValueError(f"gram must be [T, T] = [{num_tasks}, {num_tasks}], got {tuple(gram.shape)}")
    if not (losses.is_floating_point() and gram.is_floating_point()):
        raise TypeError(f"losses and gram must be floating point, got {losses.dtype} and {gram.dtype}")
    if losses.device != gram.device:
        raise ValueError(f"losses are on {losses.device}, gram on {gram.device}")


def compute_dtype(losses: Tensor) -> torch.dtype:
    """Weights are computed in float32, or in float64 when the losses are float64."""
    return torch.promote_types(losses.dtype, torch.float32)


def task_norms(gram: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The gradient norms c_i = sqrt(G_ii) and the mask of tasks with c_i > 0.

    A task with c_i = 0 has no gradient on the shared parameters (no path to them, or an exactly
    zero gradient); the weightings leave it out of every task average and give it weight 1.
    """
    norms = gram.diagonal().to(dtype).clamp_min(0).sqrt()
    return norms, norms > 0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty), without a host sync."""
    count = mask.sum().clamp_min(1).to(values.dtype)
    return torch.where(mask, values, 0).sum() / count
