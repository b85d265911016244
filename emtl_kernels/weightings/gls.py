"""GLS: the geometric loss strategy (Chennupati et al., CVPR workshops 2019).

The objective is the geometric mean of the losses, M = (Π_i L_i)^{1/T}: TorchJD's
``scalarization.GeometricMean`` and LibMTL's ``GLS``. Our weights are its gradient by the losses,

    w_i = ∂M/∂L_i = M / (T L_i),

so Σ_i w_i ∇L_i is the gradient of their scalarised loss. M is formed in log space,
exp(mean_j log L_j − log L_i) / T, which neither overflows nor underflows where Π_i L_i would.
(LibMTL reports L_i / (T Π_j L_j) as its weights; its update is the gradient of M, as ours.)

The losses must be positive: a zero loss gives an infinite or undefined weight and a negative one
an undefined weight, so the step is skipped (reason "weight"), where TorchJD raises on the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import FunctionWeighting, check_weighting_inputs, compute_dtype


def gls_weights(losses: Tensor, gram: Tensor) -> Tensor:
    """w_i = (Π_j L_j)^{1/T} / (T L_i) ``[T]``, the gradient of the geometric mean; G unread."""
    check_weighting_inputs(losses, gram)
    log_losses = losses.detach().to(compute_dtype(losses)).log()
    return torch.exp(log_losses.mean() - log_losses - math.log(losses.numel()))


class GLS(FunctionWeighting):
    """:func:`gls_weights` as a :class:`Weighting` (reads the losses only)."""

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(gls_weights)
