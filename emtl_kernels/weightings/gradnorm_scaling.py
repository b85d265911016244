"""Gradient-norm loss scaling (arXiv 2509.23915): every task pulls on the shared parameters
with the same strength s.

    w_i = s / (c_i + eps),   s = mean_j c_j          (target="mean_norm", default)
                             s = ‖Σ_j g_j‖ = sqrt(1ᵀG1)   (target="sum_norm")

A task with c_i = 0 (no gradient on the shared parameters) keeps w_i = 1 and is left out of the
mean, as in EMTL: scaling it by s/eps would blow up its head's gradient and change nothing shared.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import FunctionWeighting, check_number, check_weighting_inputs, compute_dtype, masked_mean, task_norms

Target = Literal["mean_norm", "sum_norm"]
_TARGETS = ("mean_norm", "sum_norm")


def gradnorm_scaling_weights(
    losses: Tensor, gram: Tensor, *, target: Target = "mean_norm", eps: float = 1e-8
) -> Tensor:
    """Gradient-norm scaling weights ``[T]``.

    Args:
        losses: ``[T]`` task losses (only their device and dtype are used).
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        target: the common norm s every scaled task gradient gets: "mean_norm" (the mean of the
            task gradient norms; reads the diagonal of G) or "sum_norm" (the norm of the summed
            gradient; reads all of G).
        eps: ≥ 0, added to every gradient norm it divides by.
    """
    check_weighting_inputs(losses, gram)
    _check_options(target, eps)
    dtype = compute_dtype(losses)
    norms, has_gradient = task_norms(gram, dtype)
    if target == "mean_norm":
        common_norm = masked_mean(norms, has_gradient)
    else:
        common_norm = gram.to(dtype).sum().clamp_min(0).sqrt()
    return torch.where(has_gradient, common_norm / (norms + eps), 1.0)


def _check_options(target: str, eps: float) -> None:
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    check_number("eps", eps)


class GradNormScaling(FunctionWeighting):
    """:func:`gradnorm_scaling_weights` with fixed options, as a :class:`Weighting`."""

    function = staticmethod(gradnorm_scaling_weights)

    def __init__(self, target: Target = "mean_norm", eps: float = 1e-8):
        _check_options(target, eps)
        super().__init__(target=target, eps=eps)
        self.contribution_eps = eps
        self.gram_use = "diagonal" if target == "mean_norm" else "diagonal_and_total"
