"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv 2110.14048).

CAGrad takes the update d that maximises the worst task improvement min_i g_i·d within a ball
around the mean gradient g_0 = Jᵀπ (π = 1/T):

    max_d min_i g_i·d   subject to   ‖d − g_0‖ ≤ r = c‖g_0‖.

The paper solves its dual over the simplex, min_w g_wᵀg_0 + r‖g_w‖, and sets
d = g_0 + (r/‖g_w*‖) g_w*. That dual has a kink wherever g_w = 0, which stalls Newton-type
solvers near Pareto-stationary points, so the primal is solved instead, on G alone. With
G̃ = G/tr(G) + T·eps·I = L Lᵀ (Cholesky), a shift u = Jᵀβ of the ball's centre has coordinates
y = Lᵀβ: g_i·u = (L y)_i and ‖u‖ = ‖y‖. The primal becomes the convex QCQP

    max_{y, t} t   subject to   b + L y ≥ t·1,   ‖y‖² ≤ r²,      b = G̃π (b_i = g_i·g_0),

and the weights are α = π + L⁻ᵀ y. The multipliers of the task constraints are the paper's w*,
and α equals its π + (r/‖g_w*‖) w* whenever g_w* ≠ 0. That interior-point solve, in tensor ops, is
the path of devices other than the CPU (and of a CPU without the compiled extension).

On a CPU tensor a compiled solver (``torch.ops.emtl_solvers.cagrad_weights``) solves the paper's
dual exactly instead: min_w bᵀw + r‖g_w‖ is min over s > 0 of the simplex QPs
min_w bᵀw + (r/2s)‖g_w‖², whose solution w(s) is the dual's where ‖g_w(s)‖ = s. On a fixed free
set w(s) is affine in s and ‖g_w(s)‖² = q0 + s²·E, so the fixed point is s² = q0 / (1 − E) there;
s is bracketed and each QP solved by an active-set method (csrc/README.md). Both solve in float64.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import _compiled
from ._solvers import (
    SOLVE_DTYPE,
    TO_BOUNDARY,
    cholesky_apply,
    kept_eigenvalues,
    rounding_ridge,
    step_to_boundary,
    symmetric_eigh,
    trace_normalized,
)
from .base import FunctionWeighting, check_count, check_number, check_weighting_inputs, compute_dtype, task_norms

#: Iterations of the primal-dual interior point of :func:`cagrad_weights` (centering 0.1, so the
#: duality measure falls about tenfold per iteration once the slacks are feasible). With 40 the
#: worst improvement min_i g_i·d is within 1e-8·tr(G) of the dual optimum (solved in float64) on
#: the tests' random, rank-deficient, correlated and 1e-6..1e6-scaled inputs of T ≤ 32 given in
#: float64 (given in float32: 1e-5·tr(G), 1e-3·tr(G) for rank-deficient G, where the ridge of
#: float32's rounding moves the solution), and d stays in the ball to rounding.
CAGRAD_ITERATIONS = 40
_CENTERING = 0.1

Rescale = Literal["none", "1+c^2", "1+c"]
_RESCALES = ("none", "1+c^2", "1+c")


def cagrad_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    c: float = 0.5,
    rescale: Rescale = "none",
    iterations: int = CAGRAD_ITERATIONS,
) -> Tensor:
    """CAGrad task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        c: ≥ 0, radius of the ball around g_0 relative to ‖g_0‖ (the paper's c; 0.5 is the
            authors' default). c = 0 gives the mean gradient, weights 1/T.
        rescale: divide the weights by 1 + c² or 1 + c, as the authors' code does (its
            ``rescale=1`` and ``rescale=2``); "none" (default) is the paper's Algorithm 1 and
            TorchJD's ``CAGrad``.
        iterations: interior-point iterations of the tensor-op solver (default
            :data:`CAGRAD_ITERATIONS` = 40); the compiled CPU solver is exact and ignores it.

    The problem is solved in float64 on G / tr(G): the weights do not change when every gradient
    is scaled by one factor.

    Degenerate inputs: T = 1 gives 1 + c. A task with a zero gradient has no constraint (it
    would cap the worst improvement at 0) and keeps its share 1/T of g_0. If g_0 = 0 the ball is
    the point g_0 and the weights are π. If the ball holds a point that conflicts with no task
    while 0 is in the convex hull of the gradients, the best worst improvement is 0, the optimal d
    are many and the paper's weights are undefined (g_w* = 0; TorchJD returns 0, whose d = 0 lies
    outside the ball for c < 1): the weights are those of one optimal d, with no part in the null
    space of G.
    """
    check_weighting_inputs(losses, gram)
    _check_options(c, rescale, iterations)
    if _compiled.runs_compiled(gram):
        weights = _compiled.ops().cagrad_weights(losses, gram, c)
    else:
        weights = _solve_by_interior_point(gram, c, iterations).to(compute_dtype(losses))
    return weights if rescale == "none" else weights / _RESCALE_DIVISORS[rescale](c)


def _solve_by_interior_point(gram: Tensor, c: float, iterations: int) -> Tensor:
    """The tensor-op solve of :func:`cagrad_weights` (before any rescale), in float64."""
    dtype = SOLVE_DTYPE
    num_tasks = gram.shape[-1]
    # The ridge of G's own dtype: a float32 G may be indefinite by its rounding, which the
    # Cholesky factor L must not see. It blurs tasks whose squared gradient norm is below about
    # T·eps·tr(G) of that dtype.
    ridge = rounding_ridge(num_tasks, gram.dtype)
    _, has_gradient = task_norms(gram, dtype)
    eye = torch.eye(num_tasks, dtype=dtype, device=gram.device)
    normalized = trace_normalized(gram.to(dtype))
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=dtype, device=gram.device)
    toward_mean = normalized @ mean
    radius = c * (mean @ toward_mean).clamp_min(0).sqrt()
    factor, info = torch.linalg.cholesky_ex(normalized + ridge * eye)
    shift, multipliers = _best_shift_in_ball(factor, toward_mean, radius, has_gradient, iterations)
    weights = _recovered_weights(shift, multipliers, factor, normalized, radius, has_gradient, ridge)
    usable = (radius > 0) & (info == 0) & torch.isfinite(weights).all()
    return torch.where(usable, weights, mean)


def _recovered_weights(
    shift: Tensor, multipliers: Tensor, factor: Tensor, gram: Tensor, radius: Tensor, active: Tensor, ridge: float
) -> Tensor:
    """α from the solution, as π + L⁻ᵀy (less its drift along the null space of G) or as the
    paper's π + (r/‖g_w‖) w (w: the multipliers).

    Both give the solution d in exact arithmetic; the better feasible one is kept. The shift is the
    accurate one near a cancellation (g_w ≈ 0, where the paper's form divides by ~0), the
    multipliers where rounding of a near-singular G bends the ball in L's coordinates.
    """
    eps = torch.finfo(gram.dtype).eps
    mean = torch.full_like(shift, 1 / shift.numel())
    w = torch.where(active, multipliers, 0)
    combined_norm = (w @ gram @ w).clamp_min(0).sqrt()
    cancelled = combined_norm <= eps**0.5 * (w * gram.diagonal().clamp_min(0).sqrt()).sum()
    from_multipliers = mean + radius / torch.where(cancelled, 1, combined_norm) * w
    shift_weights = torch.linalg.solve_triangular(factor.mT, shift[:, None], upper=True)[:, 0]
    # The paper's weights spend a share of r² of order T·eps/‖g_w‖² on the ridge; a drift, most of it.
    drifted = ridge * (shift_weights @ shift_weights) > radius * radius / 2
    from_shift = mean + torch.where(drifted, _without_null_space(shift_weights, gram), shift_weights)
    worst_s, inside_s = _worst_improvement(from_shift, gram, radius, active)
    worst_m, _ = _worst_improvement(from_multipliers, gram, radius, active)
    prefer_multipliers = ~cancelled & ((worst_m >= worst_s) | ~inside_s)
    return torch.where(prefer_multipliers, from_multipliers, from_shift)


def _without_null_space(weights: Tensor, gram: Tensor) -> Tensor:
    """``weights`` less their part in the null space of G (the eigenvalues cut by
    :func:`kept_eigenvalues`), which moves d by nothing.

    With the ridge, ‖y‖² = ‖u‖² + T·eps·‖β‖²: a shift β along that null space costs only its
    ridge term of the ball. Where the ball is not active (at a cancellation, g_w* = 0) the
    interior point drifts there until that term takes most of r², and the tasks whose gradients
    cancel get weights of order r/√(T·eps)."""
    values, vectors = symmetric_eigh(gram)
    return vectors @ torch.where(kept_eigenvalues(values), vectors.mT @ weights, 0)


def _worst_improvement(weights: Tensor, gram: Tensor, radius: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """min over the active tasks of g_i·d for d = Jᵀα, and whether d lies in the ball (to √eps)."""
    worst = torch.where(active, gram @ weights, torch.inf).amin()
    offset = weights - 1 / weights.numel()
    inside = (offset @ gram @ offset).clamp_min(0).sqrt() <= radius * (1 + torch.finfo(gram.dtype).eps ** 0.5)
    return worst, inside


def _best_shift_in_ball(
    factor: Tensor, toward_mean: Tensor, radius: Tensor, active: Tensor, iterations: int
) -> tuple[Tensor, Tensor]:
    """(y, w): y maximising t subject to b_i + (L y)_i ≥ t for the active tasks and ‖y‖² ≤ r², and w the
    multipliers of the task constraints (on the simplex at the solution).

    Primal-dual interior point with slacks (constraints f(x) + s = 0, s ≥ 0, so that a step is
    limited only by s, λ ≥ 0 and never by the curved ball), from y = 0, t = 0, s = λ = 1, with
    the complementarity target 0.1 μ and steps 0.995 of the way to the boundary. It stops
    moving once μ = sᵀλ/m is below 1e-3·eps, where the Newton systems lose accuracy.
    """
    dtype, device = factor.dtype, factor.device
    num_tasks = factor.shape[0]
    count = num_tasks + 1  # one constraint per task, and the ball
    stalled = 1e-3 * torch.finfo(dtype).eps
    eye = torch.eye(num_tasks, dtype=dtype, device=device)
    # Rows ∂f_i/∂(y, t) of the task constraints f_i = t − b_i − (L y)_i ≤ 0 (zero when inactive).
    task_rows = torch.cat([-factor, torch.ones(num_tasks, 1, dtype=dtype, device=device)], 1) * active[:, None]
    # Maximise t: minimise −t. Built by a cat, not by `tensor[-1] = -1`, whose Python scalar is
    # copied from the host: a CUDA graph cannot capture that copy.
    objective_gradient = torch.cat(
        [torch.zeros(num_tasks, dtype=dtype, device=device), -torch.ones(1, dtype=dtype, device=device)]
    )
    y = torch.zeros(num_tasks, dtype=dtype, device=device)
    t = torch.zeros((), dtype=dtype, device=device)
    slack = torch.ones(count, dtype=dtype, device=device)
    multiplier = torch.ones(count, dtype=dtype, device=device)
    for _ in range(iterations):
        tasks = torch.where(active, t - toward_mean - factor @ y, -1.0)
        constraints = torch.cat([tasks, (y @ y - radius * radius)[None]])
        ball_row = torch.cat([2 * y, torch.zeros(1, dtype=dtype, device=device)])
        jacobian = torch.cat([task_rows, ball_row[None]], 0)
        dual_residual = objective_gradient + jacobian.mT @ multiplier
        primal_residual = constraints + slack
        mu = (slack @ multiplier) / count
        complementarity = slack * multiplier - _CENTERING * mu
        system = jacobian.mT @ ((multiplier / slack)[:, None] * jacobian)
        system[:num_tasks, :num_tasks] += 2 * multiplier[-1] * eye  # the ball's curvature
        factor_k, info = torch.linalg.cholesky_ex(system)
        rhs = -dual_residual - jacobian.mT @ ((multiplier * primal_residual - complementarity) / slack)
        step_x = cholesky_apply(factor_k, rhs[:, None])[:, 0]
        step_slack = -primal_residual - jacobian @ step_x
        step_multiplier = (-complementarity - multiplier * step_slack) / slack
        reach = step_to_boundary(slack, multiplier, step_slack, step_multiplier)
        moving = (info == 0) & (mu > stalled) & torch.isfinite(step_x).all() & torch.isfinite(step_multiplier).all()
        step = torch.where(moving, TO_BOUNDARY * reach, 0)
        y = y + step * step_x[:num_tasks].nan_to_num()
        t = t + step * step_x[-1].nan_to_num()
        slack = slack + step * step_slack.nan_to_num()
        multiplier = multiplier + step * step_multiplier.nan_to_num()
    return y, multiplier[:num_tasks]


_RESCALE_DIVISORS = {"none": lambda c: 1.0, "1+c^2": lambda c: 1 + c * c, "1+c": lambda c: 1 + c}


def _check_options(c: float, rescale: str, iterations: int) -> None:
    check_number("c", c)
    if rescale not in _RESCALES:
        raise ValueError(f"rescale must be one of {_RESCALES}, got {rescale!r}")
    check_count("iterations", iterations)


class CAGrad(FunctionWeighting):
    """:func:`cagrad_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(cagrad_weights)

    def __init__(self, c: float = 0.5, rescale: Rescale = "none", iterations: int = CAGRAD_ITERATIONS):
        _check_options(c, rescale, iterations)
        super().__init__(c=c, rescale=rescale, iterations=iterations)
