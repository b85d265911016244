"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, ICML 2024, arXiv 2402.15638).

The update Σ_i α_i g_i gives every task the α-fair share of progress; Equation 4 of the paper
characterises the weights by

    (G α)_i = α_i^(-1/p)  for every i,   α > 0,

p the fairness exponent (the paper's α; p = 1 is proportional fairness, Nash-MTL's condition, and
p → ∞ approaches max-min fairness). This is the stationarity condition of the strictly convex

    φ(α) = ½ αᵀGα − Σ_i h(α_i),   h(a) = a^(1 − 1/p) / (1 − 1/p)   (log a for p = 1),

which is minimised here by Newton's method in float64, for a fixed number of steps. TorchJD's
``FairGradWeighting`` (like the authors' code) solves the same equations with SciPy's
``least_squares`` on the host. G is divided by its trace first: with G̃ = G / s the solution is
α = s^(−p/(p+1)) α̃, α̃ solving G̃ α̃ = α̃^(−1/p), so the solve never sees the scale of the gradients.
A solution exists when no combination of the gradients with positive coefficients vanishes; a
ridge ``reg_eps`` · G̃_ii on each diagonal entry makes one exist for any G.

On a CPU tensor a compiled solver runs the same Newton steps
(``torch.ops.emtl_solvers.fairgrad_weights``, stopping once every equation holds to the rounding
of its terms); elsewhere tensor ops run exactly ``iterations`` of them. Both in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import rounding_ridge
from .base import (
    FunctionWeighting,
    check_count,
    check_number,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    task_norms,
)

#: Newton steps of :func:`fairgrad_weights`. Measured, to a residual |(G̃α)_i − α_i^(−1/p)| below
#: 1e-11 of Σ_j |G̃_ij| α_j: with p ≤ 5, at most 21 on random G of T ≤ 32 with norms six orders
#: apart, opposite, dependent and rank-one gradients; with p = 20, 25 on the random ones and 73 on
#: rank-one G (7e-5 after 50), whose solution is 1e6 out along a null direction.
NEWTON_ITERATIONS = 50
#: Step lengths :func:`fairgrad_weights` tries along each Newton direction: 1, 1/2, ..., 2^-11,
#: and 0 (so that φ never increases).
LENGTHS = torch.cat([0.5 ** torch.arange(12, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
#: Largest change of log α_i in one step: far from the solution the Newton step can ask for
#: factors beyond float64's range (30, e^30 ≈ 1e13, needed the fewest steps of 3, 10 and 30).
MAX_LOG_STEP = 30.0


def fairgrad_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    p: float = 1.0,
    reg_eps: float = 1e-8,
    iterations: int = NEWTON_ITERATIONS,
) -> Tensor:
    """FairGrad task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        p: > 0, the fairness exponent (the paper's and TorchJD's ``alpha``, LibMTL's
            ``FairGrad_alpha``: its default 1.0; TorchJD has none).
        reg_eps: ≥ 0, each diagonal entry G̃_ii is multiplied by 1 + reg_eps, so that a solution
            exists for any G with a positive diagonal; it shifts the weights by about reg_eps
            times the condition number of the Newton system. The rounding of G's entries can
            leave G indefinite by up to T·eps of its diagonal (eps of G's dtype: a float32 G of
            nearly dependent gradients), beyond that ridge: the equations then have no solution
            and the Newton steps diverge. Where the solve gives non-finite weights, a second
            solve with the ridge reg_eps + 2·T·eps gives them.
        iterations: Newton steps of the tensor-op solver (default :data:`NEWTON_ITERATIONS` =
            50); the compiled CPU solver stops earlier once converged.

    The weights are not normalised (as in the paper and TorchJD): a common scale s of the
    gradients scales them by s^(−2p/(p+1)). Degenerate inputs: T = 1 gives G_11^(−p/(p+1)) up to
    the ridge. A task with a zero gradient cannot satisfy its equation: it is left out of the
    solve and gets the mean weight of the others (1 when every gradient is zero). With opposite
    gradients (no solution without the ridge) the weights grow like reg_eps^(−p/(p+1)).
    """
    check_weighting_inputs(losses, gram)
    _check_options(p, reg_eps, iterations)
    # The second solve's ridge, 2·T·eps of G's dtype on top, makes the ridged G̃ positive definite
    # whatever G's rounding did.
    fallback_reg_eps = reg_eps + rounding_ridge(2 * gram.shape[-1], gram.dtype)
    if _compiled.runs_compiled(gram):
        return _compiled.ops().fairgrad_weights(losses, gram, p, reg_eps, fallback_reg_eps, iterations)
    # Tensor ops cannot take the second solve only where the first failed: both run.
    first = _solve_by_newton(gram, p, reg_eps, iterations)
    second = _solve_by_newton(gram, p, fallback_reg_eps, iterations)
    return torch.where(torch.isfinite(first).all(), first, second).to(compute_dtype(losses))


def _solve_by_newton(gram: Tensor, p: float, reg_eps: float, iterations: int) -> Tensor:
    """The tensor-op solve of :func:`fairgrad_weights`, in float64."""
    num_tasks = gram.shape[-1]
    # Float64 throughout: the solution's scale, s^(−p/(p+1)), and the ridge's far-out solutions
    # are outside what float32 resolves, and the T×T solve costs the same either way.
    gram = gram.to(torch.float64)
    _, has_gradient = task_norms(gram, torch.float64)
    trace = torch.where(has_gradient, gram.diagonal(), 0).sum()
    scale = torch.where(trace > 0, trace, 1)
    eye = torch.eye(num_tasks, dtype=torch.float64, device=gram.device)
    both = has_gradient[:, None] & has_gradient[None, :]
    # A gradient-less task is decoupled (a unit diagonal entry): its α is solved for, then replaced.
    fair = torch.where(both, gram / scale, eye)
    fair = fair + reg_eps * torch.diag(fair.diagonal())
    # The solution of the diagonal part of the equations, then the best multiple of it.
    alpha = _scaled_to_ray_minimum(fair.diagonal() ** (-p / (p + 1)), fair, p)
    for _ in range(iterations):
        gradient = fair @ alpha - alpha ** (-1 / p)
        hessian = fair + torch.diag(alpha ** (-1 / p - 1) / p)
        factor, info = torch.linalg.cholesky_ex(hessian)
        step = torch.cholesky_solve(-gradient[:, None], factor)[:, 0]
        decrement = (-(gradient * step).sum()).clamp_min(0).sqrt()
        # The step is taken in log α, so that no length leaves α > 0, shortened as a whole (it
        # stays a descent direction of φ in log α), and its length is the best of LENGTHS for φ:
        # h is self-concordant only for p = 1, so Nesterov's damping does not apply. Close to the
        # solution (decrement < 1/4) the full step, α·exp(Δ/α) = α + Δ to second order:
        # convergence stays quadratic.
        log_step = step / alpha
        log_step = log_step * (MAX_LOG_STEP / log_step.abs().max().clamp_min(MAX_LOG_STEP))
        trials = alpha * torch.exp(LENGTHS.to(alpha)[:, None] * log_step)
        best = trials.index_select(0, _objective(trials, fair, p).argmin().reshape(1))[0]
        candidate = _scaled_to_ray_minimum(torch.where(decrement < 0.25, trials[0], best), fair, p)
        usable = (info == 0) & torch.isfinite(candidate).all()
        alpha = torch.where(usable, candidate, alpha)
    weights = alpha * scale ** (-p / (p + 1))
    return fill_zero_gradient_tasks(torch.where(has_gradient, weights, 0), has_gradient, neutral=1.0)


def _scaled_to_ray_minimum(alpha: Tensor, fair: Tensor, p: float) -> Tensor:
    """t·α with t minimising φ(tα) over t > 0: t^(1 + 1/p) = Σ_i α_i^(1 − 1/p) / αᵀG̃α. Never
    increases φ, and puts α at the scale of the solution in one step."""
    curvature = alpha @ fair @ alpha
    return alpha * ((alpha ** (1 - 1 / p)).sum() / curvature) ** (p / (p + 1))


def _objective(alpha: Tensor, fair: Tensor, p: float) -> Tensor:
    """φ(α) = ½ αᵀG̃α − Σ_i h(α_i) for each row of ``alpha [K, T]``."""
    barrier = alpha.log() if p == 1 else alpha ** (1 - 1 / p) / (1 - 1 / p)
    return 0.5 * ((alpha @ fair) * alpha).sum(-1) - barrier.sum(-1)


def _check_options(p: float, reg_eps: float, iterations: int) -> None:
    check_number("p", p, positive=True)
    check_number("reg_eps", reg_eps)
    check_count("iterations", iterations)


class FairGrad(FunctionWeighting):
    """:func:`fairgrad_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(fairgrad_weights)

    def __init__(self, p: float = 1.0, reg_eps: float = 1e-8, iterations: int = NEWTON_ITERATIONS):
        _check_options(p, reg_eps, iterations)
        super().__init__(p=p, reg_eps=reg_eps, iterations=iterations)
