"""EMTL: equitable multi-task learning (Yuan & Zhang, arXiv 2306.09373).

The relative contribution of task i is r_i = L_i / c_i, its loss over its raw gradient norm on
the shared parameters (c_i held constant through the step). EMTL adds λ·Var(r) to Σ_i L_i, which
pulls the relative contributions together. With c constant, the derivative of the objective by
L_i is the weight of task i in the update:

    w_i = 1 + (2λ / T) · (r_i − r̄) / c_i

``eps`` is added to c_i in every division. A task with c_i = 0 has no relative contribution: it is
left out of r̄, of the variance and of T, and keeps w_i = 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import FunctionWeighting, check_number, check_weighting_inputs, compute_dtype, masked_mean, task_norms


def relative_contributions(losses: Tensor, gram: Tensor, *, eps: float = 1e-8) -> Tensor:
    """r_i = L_i / (c_i + eps), ``[T]``; NaN where c_i = 0 (not defined there)."""
    check_weighting_inputs(losses, gram)
    dtype = compute_dtype(losses)
    norms, has_gradient = task_norms(gram, dtype)
    ratios = losses.detach().to(dtype) / (norms + eps)
    return torch.where(has_gradient, ratios, math.nan)


def emtl_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    lam: float = 0.1,
    eps: float = 1e-8,
    min_weight: float | None = 0.0,
) -> Tensor:
    """EMTL task weights ``[T]`` from the losses and the Gram matrix (only its diagonal is read).

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        lam: λ ≥ 0, strength of the variance regulariser; 0 gives equal weighting.
        eps: ≥ 0, added to every gradient norm it divides by.
        min_weight: lower clamp of the weights; the default 0 means no task is ever trained by
            gradient ascent. None keeps the exact gradient of the regularised objective.
    """
    check_weighting_inputs(losses, gram)
    _check_hyperparameters(lam, eps, min_weight)
    dtype = compute_dtype(losses)
    norms, has_gradient = task_norms(gram, dtype)
    ratios = losses.detach().to(dtype) / (norms + eps)
    mean_ratio = masked_mean(ratios, has_gradient)
    num_counted = has_gradient.sum().clamp_min(1).to(dtype)
    weights = 1 + (2 * lam / num_counted) * (ratios - mean_ratio) / (norms + eps)
    weights = torch.where(has_gradient, weights, 1.0)
    if min_weight is not None:
        weights = weights.clamp_min(min_weight)
    return weights


def _check_hyperparameters(lam: float, eps: float, min_weight: float | None) -> None:
    check_number("lam", lam)
    check_number("eps", eps)
    if min_weight is not None and not (isinstance(min_weight, (int, float)) and math.isfinite(min_weight)):
        raise ValueError(f"min_weight must be a finite number or None, got {min_weight!r}")


class EMTL(FunctionWeighting):
    """:func:`emtl_weights` with fixed hyperparameters, as a :class:`Weighting`."""

    gram_use = "diagonal"
    reads_losses = True
    function = staticmethod(emtl_weights)

    def __init__(self, lam: float = 0.1, eps: float = 1e-8, min_weight: float | None = 0.0):
        _check_hyperparameters(lam, eps, min_weight)
        super().__init__(lam=lam, eps=eps, min_weight=min_weight)
        self.contribution_eps = eps
