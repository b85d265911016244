"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022, arXiv 2202.01017).

The update Σ_i α_i g_i is the Nash bargaining solution among the tasks; the paper's Theorem 5.1
characterises it by

    α_i (G α)_i = 1  for every i,   α > 0,

which is the stationarity condition of the strictly convex φ(α) = ½ αᵀGα − Σ_i log α_i. At the
solution ‖Jᵀα‖² = αᵀGα = T whatever the scale of the gradients. The paper (and its code, through
cvxpy) approaches it by a sequence of convex programs; here φ is minimised directly by Newton's
method. φ is self-concordant, so the damped step Δ/(1 + λ) (λ the Newton decrement; a full step
once λ < 1/4) never leaves α > 0 and converges from any start; each step is followed by the exact
minimisation of φ along the ray t·α, t = √(T / αᵀGα).

The authors' code and both its ports (TorchJD's ``NashMTL``, LibMTL's ``Nash_MTL``) divide G by
its Frobenius norm before their solve and put the factor back into its constraints
(−log(α_i ‖G‖_F) − log((G/‖G‖_F α)_i) ≤ 0), so their α solves α_i (Gα)_i = 1 on G itself. Here
too: α̃ solves α̃_i (Bα̃)_i = 1 on B = (G + reg_eps · diag(G)) / ‖G‖_F (well scaled whatever the
gradients' scale) and α = α̃ / √‖G‖_F. A solution exists only when no combination of the
gradients with positive coefficients vanishes; the ridge ``reg_eps`` · diag(G) makes one always
exist. Sized by each task's own G_ii rather than by a norm of G, it moves every α_i (Gα)_i off 1 by
at most reg_eps · G_ii α_i², O(reg_eps) whatever the spread of the gradients' norms, and keeps the
paper's invariance: scaling one task's gradient scales its α_i inversely and changes nothing
else. Then, as the peers do by default, the update is clipped to ``max_norm`` = 1.0.

On a CPU tensor a compiled solver runs the Newton iterations
(``torch.ops.emtl_solvers.nash_mtl_weights``, stopping once the decrement is at rounding level);
elsewhere tensor ops run exactly ``iterations`` of them. Both in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import SOLVE_DTYPE, rounding_ridge, spd_solve, trace_normalized
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
#: regularised solution lies far out (α̃ ~ reg_eps^(-1/2)), need about 20 damped steps at the
#: default reg_eps. With 40 the relative residual ‖Bα̃ − 1/α̃‖ / ‖1/α̃‖ is below 1e-10 (float64).
NEWTON_ITERATIONS = 40
#: The default ``reg_eps``: it moves each α_i (Gα)_i off 1 by reg_eps · G_ii α_i² (up to 6e-7 on
#: the tests' definite inputs of T ≤ 32; 1e-7 moved it by 6e-5). Where no solution exists, B's
#: condition number is about 1/reg_eps, and float64 Newton steps reach a residual near 1e-7.
REG_EPS = 1e-9
#: The default ``max_norm``: the peers' (TorchJD's and LibMTL's ``max_norm=1.0``).
MAX_NORM = 1.0


def nash_mtl_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    reg_eps: float = REG_EPS,
    max_norm: float | None = MAX_NORM,
    iterations: int = NEWTON_ITERATIONS,
) -> Tensor:
    """Nash-MTL task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        reg_eps: > 0, the ridge reg_eps · diag(G) added to G so that the bargaining solution
            exists for any G (see the module docstring; default :data:`REG_EPS` = 1e-9). A float32 (or 16-bit) G
            gets 2·T·eps of its dtype more: its rounding can make G indefinite by that much of diag(G).
        max_norm: if set (default 1.0, as TorchJD's ``NashMTL`` and LibMTL's ``Nash_MTL``), the
            weights are scaled down so that the update norm ‖Jᵀα‖ = √(αᵀGα) is at most
            ``max_norm``: TorchJD scales its weights so; LibMTL clips the shared parameters'
            gradient after the backward pass, which leaves the heads' gradients unclipped. None
            does not clip (the peers' ``max_norm=0``). At the solution αᵀGα = T, so 1.0 clips
            every update of two or more tasks.
        iterations: Newton steps of the tensor-op solver (default :data:`NEWTON_ITERATIONS` =
            40); the compiled CPU solver stops earlier once converged.

    Degenerate inputs: T = 1 gives 1/√(G_11 (1 + reg_eps)) before clipping. Identical gradients
    share the weight evenly. A task with a zero gradient cannot satisfy α_i (Gα)_i = 1: it is left
    out of the solve and gets the mean weight of the others (1 each when no task has a
    gradient). With opposite gradients (no bargaining solution) the weights grow like
    reg_eps^(-1/2) while the update stays bounded: ‖Jᵀα‖² = T − reg_eps Σ_i G_ii α_i² ≤ T.
    The direction of the update does not change when one task's gradient is scaled (α_i scales
    inversely), as the paper states, exactly: the ridge scales with that task's G_ii.
    """
    check_weighting_inputs(losses, gram)
    _check_options(reg_eps, max_norm, iterations)
    if _compiled.runs_compiled(gram):
        return _compiled.ops().nash_mtl_weights(losses, gram, reg_eps, max_norm, iterations)
    return _solve_by_newton(gram, reg_eps, max_norm, iterations).to(compute_dtype(losses))


def _solve_by_newton(gram: Tensor, reg_eps: float, max_norm: float | None, iterations: int) -> Tensor:
    """The tensor-op solve of :func:`nash_mtl_weights`, in float64."""
    dtype, input_dtype = SOLVE_DTYPE, gram.dtype
    num_tasks = gram.shape[-1]
    gram = gram.to(dtype)
    _, has_gradient = task_norms(gram, dtype)
    eye = torch.eye(num_tasks, dtype=dtype, device=gram.device)
    # Through G / tr(G) first: |G_ij| ≤ tr(G) and ‖G / tr(G)‖_F ≥ 1/√T, so the squares neither
    # overflow nor underflow whatever the scale of the gradients.
    by_trace = trace_normalized(gram)
    frobenius = by_trace.square().sum().sqrt()
    normalized = by_trace / torch.where(frobenius > 0, frobenius, 1)
    both = has_gradient[:, None] & has_gradient[None, :]
    # A gradient-less task is decoupled (a unit diagonal entry): its α is solved for, then replaced.
    # The ridge is relative to each diagonal entry (see REG_EPS).
    ridge = reg_eps + rounding_ridge(2 * num_tasks, input_dtype)
    bargaining = torch.where(both, normalized, eye) * (1 + ridge * eye)
    alpha = _scaled_to_ray_minimum(bargaining.diagonal().rsqrt(), bargaining)
    for _ in range(iterations):
        gradient = bargaining @ alpha - 1 / alpha
        step, ok = spd_solve(bargaining + torch.diag(alpha**-2), -gradient[:, None])
        step = step[:, 0]
        decrement = (-(gradient * step).sum()).clamp_min(0).sqrt()
        damping = torch.where(decrement < 0.25, 1.0, 1 / (1 + decrement))
        alpha = torch.where(ok, _scaled_to_ray_minimum(alpha + damping * step, bargaining), alpha)
    # α̃ solves α̃_i (Bα̃)_i = 1 for B ≈ G / ‖G‖_F: α̃ / √‖G‖_F solves it for G.
    gram_norm = gram.diagonal().sum() * frobenius
    alpha = alpha * torch.where(gram_norm > 0, gram_norm, 1).rsqrt()
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

    def __init__(
        self, reg_eps: float = REG_EPS, max_norm: float | None = MAX_NORM, iterations: int = NEWTON_ITERATIONS
    ):
        _check_options(reg_eps, max_norm, iterations)
        super().__init__(reg_eps=reg_eps, max_norm=max_norm, iterations=iterations)
