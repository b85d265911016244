"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", arXiv 2406.16232).

Each task gradient g_i is projected onto the dual cone of the task gradients,
C = {x : g_j·x ≥ 0 for every j}, the directions that conflict with no task, and the projections
are averaged. The projection of Jᵀu is Jᵀv with v the solution of a non-negative QP on G alone
(the paper's Proposition 1):

    v(u) = argmin_v vᵀ G v  subject to  v ≥ u,

so with u = e_i / T for task i the weights are α = Σ_i v(e_i / T). Every projection lies in C, so
the update conflicts with no task: (G α)_i ≥ 0. As in TorchJD (``UPGradWeighting``, which this
matches), the QP is solved on G / tr(G) + reg_eps · I, in float64 whatever the dtype of G. TorchJD
solves it with quadprog on the host; here, on a CPU tensor, a compiled exact active-set method
solves it (``torch.ops.emtl_solvers.project_onto_dual_cone``), and on other devices (or without
the extension) an interior-point method solves all T problems at once with tensor ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import IPM_ITERATIONS, project_onto_dual_cone
from .base import FunctionWeighting, check_count, check_number, check_weighting_inputs, compute_dtype


def upgrad_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    iterations: int = IPM_ITERATIONS,
) -> Tensor:
    """UPGrad task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        norm_eps: a trace of G below it is treated as G = 0 (weights 1/T). TorchJD's default is
            1e-4, which makes its UPGrad the plain mean whenever Σ_i ‖g_i‖² < 1e-4, small
            gradients included; the default 0 keeps the weights independent of a common scale.
        reg_eps: ≥ 0, added to the diagonal of G / tr(G) (TorchJD's default, 1e-4): it makes the
            QP strictly convex, so its solution is unique when G is singular. With it the update
            conflicts with no task up to that ridge and the rounding one, T·eps, beside it:
            (G α)_i ≥ −(reg_eps + T·eps) · tr(G) · α_i.
        iterations: interior-point iterations of the tensor-op solver (default
            :data:`IPM_ITERATIONS` = 30, which bring the weights to about 1e-10 of quadprog's);
            the compiled CPU solver is exact and ignores it. Both solve in float64: float32
            weights are quadprog's float64 optimum rounded to float32.

    Degenerate inputs: T = 1 gives weight 1; G = 0 gives 1/T each. A task with a zero gradient
    takes no part in any projection but its own, and gets weight 1/T. Identical gradients share
    the weight evenly; rank-deficient G is handled by reg_eps.
    """
    check_weighting_inputs(losses, gram)
    _check_options(norm_eps, reg_eps, iterations)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    preferences = torch.eye(num_tasks, dtype=dtype, device=losses.device) / num_tasks
    return dual_cone_projections(gram, preferences, norm_eps, reg_eps, iterations).sum(0)


def dual_cone_projections(
    gram: Tensor, preferences: Tensor, norm_eps: float, reg_eps: float, iterations: int
) -> Tensor:
    """The weights ``[B, T]`` of the projections of Jᵀu onto the dual cone, one per row u of
    ``preferences``, in their dtype: compiled on a CPU tensor, tensor ops elsewhere."""
    if _compiled.runs_compiled(gram):
        return _compiled.ops().project_onto_dual_cone(gram, preferences, norm_eps, reg_eps)
    return project_onto_dual_cone(gram, preferences, norm_eps=norm_eps, reg_eps=reg_eps, iterations=iterations)


def _check_options(norm_eps: float, reg_eps: float, iterations: int) -> None:
    check_number("norm_eps", norm_eps)
    check_number("reg_eps", reg_eps)
    check_count("iterations", iterations)


class DualConeWeighting(FunctionWeighting):
    """Base of the weightings that project onto the dual cone of the task gradients, with their
    options ``norm_eps``, ``reg_eps`` and ``iterations`` (see :func:`upgrad_weights`)."""

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 1e-4, iterations: int = IPM_ITERATIONS):
        _check_options(norm_eps, reg_eps, iterations)
        super().__init__(norm_eps=norm_eps, reg_eps=reg_eps, iterations=iterations)


class UPGrad(DualConeWeighting):
    """:func:`upgrad_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(upgrad_weights)
