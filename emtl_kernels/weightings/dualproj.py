"""DualProj: the mean gradient projected onto the dual cone of the task gradients (Quinton & Rey,
arXiv 2406.16232, after GEM's projection, Lopez-Paz & Ranzato 2017, arXiv 1706.08840).

The mean gradient Jᵀπ (π = 1/T) is projected onto C = {x : g_j·x ≥ 0 for every j}; the projection
is Jᵀv with (Proposition 1 of 2406.16232)

    v = argmin_v vᵀ G v  subject to  v ≥ π,

and the weights are α = v: the update conflicts with no task, (G α)_i ≥ 0. It is the single-QP
sibling of :mod:`~emtl_kernels.weightings.upgrad` (which projects every g_i and averages), and
matches TorchJD's ``DualProjWeighting`` (same normalisation and regularisation), solved in float64
by a compiled active-set method on a CPU tensor and by tensor ops on other devices, instead of by
quadprog on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._solvers import IPM_ITERATIONS
from .base import check_weighting_inputs, compute_dtype
from .upgrad import DualConeWeighting, _check_options, dual_cone_projections


def dualproj_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    iterations: int = IPM_ITERATIONS,
) -> Tensor:
    """DualProj task weights ``[T]``; the losses give the device and dtype only.

    Options, accuracy and degenerate inputs are those of :func:`~emtl_kernels.weightings.upgrad_weights`:
    ``norm_eps`` (default 0; TorchJD's 1e-4 turns small gradients into the plain mean),
    ``reg_eps`` (default 1e-4: conflict at most (reg_eps + T·eps) · tr(G) · α_i), ``iterations`` (default
    :data:`IPM_ITERATIONS` = 30). T = 1 gives 1; G = 0 gives 1/T each; a task with a zero
    gradient keeps its share 1/T.
    """
    check_weighting_inputs(losses, gram)
    _check_options(norm_eps, reg_eps, iterations)
    dtype = compute_dtype(losses)
    mean = torch.full((1, losses.numel()), 1 / losses.numel(), dtype=dtype, device=losses.device)
    return dual_cone_projections(gram, mean, norm_eps, reg_eps, iterations)[0]


class DualProj(DualConeWeighting):
    """:func:`dualproj_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(dualproj_weights)
