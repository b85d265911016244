"""MGDA: the multiple-gradient descent algorithm as multi-task learning (Sener & Koltun,
NeurIPS 2018, arXiv 1810.04650; Désidéri 2012).

The update is the minimum-norm point of the convex hull of the task gradients:

    α = argmin_{α ∈ Δ} ‖Jᵀα‖² = argmin_{α ∈ Δ} αᵀ G α,    Δ = {α ≥ 0, Σ_i α_i = 1}.

Its optimality conditions make it conflict with no task: (Gα)_i ≥ αᵀGα ≥ 0 for every i, with
equality where α_i > 0. When 0 lies in the hull (the point is Pareto-stationary) the update is 0.
The paper solves the QP by Frank-Wolfe, which converges slowly and stops on a host-side test.
Here it is solved in float64 whatever the dtype of G: on a CPU tensor by a compiled exact
active-set method (``torch.ops.emtl_solvers.mgda_weights``), on other devices (or without the
extension) by an interior-point method with a fixed iteration count, in tensor ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import IPM_ITERATIONS, SOLVE_DTYPE, minimize_on_orthant, rounding_ridge, trace_normalized
from .base import (
    FunctionWeighting,
    check_count,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    task_norms,
)


def mgda_weights(losses: Tensor, gram: Tensor, *, iterations: int = IPM_ITERATIONS) -> Tensor:
    """MGDA task weights ``[T]`` on the simplex; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        iterations: interior-point iterations of the tensor-op solver (default
            :data:`IPM_ITERATIONS` = 30; the KKT residual, max_i (αᵀGα − (Gα)_i) relative to
            max_i G_ii, is then below about 1e-12); the compiled CPU solver is exact and
            ignores it.

    The QP is solved in float64 on G / tr(G): the weights do not change when all task gradients
    are scaled by one factor. The tensor-op solver adds T·eps₆₄·I so that rounding cannot make
    the matrix indefinite; the compiled one raises a pivot of its Cholesky factors that rounding
    took below 16·T·eps₆₄ of its diagonal entry to that floor.

    Degenerate inputs: T = 1 gives weight 1. A task with a zero gradient would make the minimum
    norm 0 on its own; it is left out of the simplex and gets the mean weight of the others.
    Identical gradients split their share of the weight evenly. With 0 in the hull the weights are
    a combination with Jᵀα ≈ 0 (the update vanishes, the task heads still train).
    """
    check_weighting_inputs(losses, gram)
    check_count("iterations", iterations)
    if _compiled.runs_compiled(gram):
        return _compiled.ops().mgda_weights(losses, gram)
    weights = _solve_by_interior_point(gram, iterations)
    return weights.to(compute_dtype(losses))


def _solve_by_interior_point(gram: Tensor, iterations: int) -> Tensor:
    """The tensor-op solve of :func:`mgda_weights`, in float64."""
    dtype = SOLVE_DTYPE
    num_tasks = gram.shape[-1]
    _, has_gradient = task_norms(gram, dtype)
    eye = torch.eye(num_tasks, dtype=dtype, device=gram.device)
    normalized = trace_normalized(gram.to(dtype)) + rounding_ridge(num_tasks, dtype) * eye
    # Gradient-less tasks get a unit cost and leave the simplex constraint: they go to zero.
    simplex = torch.where(has_gradient.any(), has_gradient.to(dtype), 1.0)
    exclusion_cost = 1 - simplex

    def objective(alpha: Tensor) -> tuple[Tensor, Tensor]:
        return alpha @ normalized + exclusion_cost, normalized

    alpha = minimize_on_orthant(
        objective, (num_tasks,), dtype=dtype, device=gram.device, equality=simplex, iterations=iterations
    )
    alpha = torch.where(has_gradient, alpha, 0)
    alpha = alpha / alpha.sum().clamp_min(torch.finfo(dtype).tiny)
    return fill_zero_gradient_tasks(alpha, has_gradient, neutral=1 / num_tasks)


class MGDA(FunctionWeighting):
    """:func:`mgda_weights` as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(mgda_weights)

    def __init__(self, iterations: int = IPM_ITERATIONS):
        check_count("iterations", iterations)
        super().__init__(iterations=iterations)
