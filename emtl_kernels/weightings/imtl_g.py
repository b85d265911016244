"""IMTL-G: impartial multi-task learning, gradient balance (Liu et al., ICLR 2021,
"Towards Impartial Multi-task Learning", openreview.net/forum?id=IMPnRXEWpvr).

IMTL-G looks for the combination g = Σ_i α_i g_i, Σ_i α_i = 1, whose projections on the unit task
gradients u_i = g_i / c_i are all equal: g·u_i = k for every i. With D = diag(c) and the
correlation matrix C = D⁻¹ G D⁻¹ (C_ij = u_i·u_j), g·u_i = (G α)_i / c_i = (C D α)_i, so the
condition reads C (Dα) = k·1:

    α ∝ D⁻¹ C⁺ 1,    then divided by its sum.

When G is invertible this is the paper's closed form (α_{2..T} = g_1 Uᵀ (D Uᵀ)⁻¹ there) and
TorchJD's G⁻¹c (Quinton & Rey, arXiv 2406.16232). When it is not, C⁺ (eigenvalues at or below
T·eps·λ_max dropped) gives the minimum-norm least-squares solution of C β = 1: the direction
Uᵀ C⁺ 1 is the same as TorchJD's Jᵀ G⁺ c whenever equal projections exist, but working on C rather
than G keeps the solve accurate when the task gradients' norms differ by many orders of magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import EigenSolver, check_eigen_solver, pinv_apply
from .base import FunctionWeighting, check_weighting_inputs, compute_dtype, fill_zero_gradient_tasks, task_norms


def imtl_g_weights(losses: Tensor, gram: Tensor, *, eigen_solver: EigenSolver = "auto") -> Tensor:
    """IMTL-G task weights ``[T]`` (summing to 1) from the Gram matrix; the losses give the device
    and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        eigen_solver: how C⁺ is formed: "auto" (LAPACK on the CPU, Jacobi sweeps elsewhere, so
            that a CUDA step never waits on the host), "lapack" or "jacobi"; see
            :func:`~emtl_kernels.weightings._solvers.symmetric_eigh`. On a CPU tensor "auto" and
            "lapack" run the whole method compiled, in float64 (LAPACK's dsyevd); the rank cut
            stays that of the weights' dtype.

    Degenerate inputs: T = 1 gives weight 1. A task with a zero gradient is left out of C and gets
    the mean weight of the others. Identical (or parallel) gradients share the weight equally in
    the correlation metric. When no combination has equal projections (a rank-deficient G whose
    C does not hold 1 in its range), the projections are equal in the least-squares sense. When
    the entries of C⁺1 / c sum to zero (to rounding), no normalisation exists and every weight is
    0. Note that a sum below zero flips g into an ascent direction for every task; this follows
    the paper's normalisation, Σ α_i = 1, and happens only when some entry of C⁺1 is negative.
    """
    check_weighting_inputs(losses, gram)
    check_eigen_solver(eigen_solver)
    if eigen_solver != "jacobi" and _compiled.runs_compiled(gram):
        return _compiled.ops().imtl_g_weights(losses, gram)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    norms, has_gradient = task_norms(gram, dtype)
    safe_norms = torch.where(has_gradient, norms, 1)
    both = has_gradient[:, None] & has_gradient[None, :]
    correlation = torch.where(both, gram.to(dtype) / torch.outer(safe_norms, safe_norms), 0)
    solution, in_range = pinv_apply(correlation, has_gradient.to(dtype), method=eigen_solver)
    unnormalized = torch.where(has_gradient, solution, 0) / safe_norms
    total = unnormalized.sum()
    # Where 1 has no part in the range of C (the unit gradients cancel) C⁺1 = 0, and the
    # solution is rounding noise: normalising it would make weights of it.
    normalizable = in_range & (total.abs() > num_tasks * torch.finfo(dtype).eps * unnormalized.abs().sum())
    weights = torch.where(normalizable, unnormalized / torch.where(normalizable, total, 1), 0)
    return fill_zero_gradient_tasks(weights, has_gradient, neutral=1 / num_tasks)


class IMTLG(FunctionWeighting):
    """:func:`imtl_g_weights` as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(imtl_g_weights)

    def __init__(self, eigen_solver: EigenSolver = "auto"):
        check_eigen_solver(eigen_solver)
        super().__init__(eigen_solver=eigen_solver)
