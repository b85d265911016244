"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022, arXiv 2202.01017).

The update Σ_i α_i g_i is the Nash bargaining solution among the tasks; the paper's Theorem 5.1
characterises it by

    (G α)_i = 1 / α_i  for every i,   α > 0,

which is the stationarity condition of the strictly convex φ(α) = ½ αᵀGα − Σ_i log α_i. The
paper (and its code, through cvxpy) approaches it by a sequence of convex programs; here φ is
minimised directly by Newton's method. φ is self-concordant, so the damped step Δ/(1 + λ) (λ the
Newton decrement; a full step once λ < 1/4) never leaves α > 0 and converges from any start; each
step is followed by the exact minimisation of φ along the ray t·α, t = √(T / αᵀGα).

As in the authors' code, G is first divided by its Frobenius norm, so the weights do not change
under a common scale of the gradients. A solution exists only when no combination of the
gradients with positive coefficients vanishes; ``reg_eps`` · I is added to G / ‖G‖_F so that one
always exists. The update then stays bounded: ‖Jᵀα‖² = ‖G‖_F (T − reg_eps ‖α‖²) ≤ T ‖G‖_F.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._solvers import spd_solve, trace_normalized
from .base import (
    FunctionWeighting,
    check_count,
    check_number,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    task_norms,
)

#: Newton steps of :func:`nash_mtl_weights`. From the start used, linearly independent gradients
#: need under 10 (then convergence is quadratic); gradients with 0 in their positive hull, whose
#: regularised solution lies far out (α ~ reg_eps^(-1/2)), need up to about 35 damped steps.
#: With 40 the relative residual ‖G̃α − 1/α‖ / ‖1/α‖ is below 1e-10 in float64 and 1e-6 in
#: float32 on the tests' full-rank inputs (float32 on the far-out case: about 1e-1, as
#: G / ‖G‖_F + 1e-6 · I has a condition number near 1e6).
NEWTON_ITERATIONS = 40


def nash_mtl_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    reg_eps: float = 1e-6,
    max_norm: float | None = None,
    iterations: int = NEWTON_ITERATIONS,
) -> Tensor:
    """Nash-MTL task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        reg_eps: > 0, added to the diagonal of G / ‖G‖_F so that the bargaining solution exists
            for any G (see the module docstring); it shifts the solution by O(reg_eps).
        max_norm: if set, the weights are scaled down so that the update norm ‖Jᵀα‖ = √(αᵀGα)
            is at most ``max_norm`` (the authors' code clips the shared gradient to 1.0 this way;
            TorchJD's ``NashMTL`` does too). None (default) does not clip.
        iterations: Newton steps (default :data:`NEWTON_ITERATIONS` = 40).

    Degenerate inputs: T = 1 gives 1/√(1 + reg_eps). Identical gradients share the weight evenly.
    A task with a zero gradient cannot satisfy (Gα)_i = 1/α_i: it is left out of the solve and
    gets the mean weight of the others. With opposite gradients (no bargaining solution) the
    weights grow like reg_eps^(-1/2) while the update stays bounded as above.
    The direction of the update does not change when one task's gradient is scaled (α_i scales
    inversely), as the paper states; with reg_eps > 0 this holds up to O(reg_eps · ‖G‖_F / min_i G_ii)
    (the ridge weighs more beside a task whose gradient is small).
    """
    check_weighting_inputs(losses, gram)
    _check_options(reg_eps, max_norm, iterations)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    gram = gram.to(dtype)
    _, has_gradient = task_norms(gram, dtype)
    eye = torch.eye(num_tasks, dtype=dtype, device=losses.device)
    # Through G / tr(G) first: |G_ij| ≤ tr(G) and ‖G / tr(G)‖_F ≥ 1/√T, so the squares neither
    # overflow nor underflow in float32 whatever the scale of the gradients.
    by_trace = trace_normalized(gram)
    frobenius = by_trace.square().sum().sqrt()
    normalized = by_trace / torch.where(frobenius > 0, frobenius, 1)
    both = has_gradient[:, None] & has_gradient[None, :]
    # A gradient-less task is decoupled (a unit diagonal entry): its α is solved for, then replaced.
    bargaining = torch.where(both, normalized, eye) + reg_eps * eye
    alpha = _scaled_to_ray_minimum(bargaining.diagonal().rsqrt(), bargaining)
    for _ in range(iterations):
        gradient = bargaining @ alpha - 1 / alpha
        step, ok = spd_solve(bargaining + torch.diag(alpha**-2), -gradient[:, None])
        step = step[:, 0]
        decrement = (-(gradient * step).sum()).clamp_min(0).sqrt()
        damping = torch.where(decrement < 0.25, 1.0, 1 / (1 + decrement))
        alpha = torch.where(ok, _scaled_to_ray_minimum(alpha + damping * step, bargaining), alpha)
    weights = fill_zero_gradient_tasks(torch.where(has_gradient, alpha, 0), has_gradient, neutral=1.0)
    if max_norm is not None:
        update_norm = (weights @ gram @ weights).clamp_min(0).sqrt()
        weights = weights * torch.clamp(max_norm / torch.where(update_norm > 0, update_norm, 1), max=1)
    return weights


def _scaled_to_ray_minimum(alpha: Tensor, bargaining: Tensor) -> Tensor:
    """t·α with t = √(T / αᵀGα), the minimiser of φ(tα) over t > 0: never increases φ."""
    curvature = alpha @ bargaining @ alpha
    return alpha * (alpha.numel() / curvature).sqrt()


def _check_options(reg_eps: float, max_norm: float | None, iterations: int) -> None:
    check_number("reg_eps", reg_eps, positive=True)
    if max_norm is not None:
        check_number("max_norm", max_norm, positive=True)
    check_count("iterations", iterations)


class NashMTL(FunctionWeighting):
    """:func:`nash_mtl_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`.

    Stateless: each call solves from scratch (the authors' code warm-starts from the previous
    step's α and can skip steps, ``update_weights_every``; a full solve here costs a fixed
    number of T×T Newton steps on the device).
    """

    function = staticmethod(nash_mtl_weights)

    def __init__(self, reg_eps: float = 1e-6, max_norm: float | None = None, iterations: int = NEWTON_ITERATIONS):
        _check_options(reg_eps, max_norm, iterations)
        super().__init__(reg_eps=reg_eps, max_norm=max_norm, iterations=iterations)
