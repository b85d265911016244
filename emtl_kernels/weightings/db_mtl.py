"""DB-MTL: dual-balancing multi-task learning (Lin et al., "Dual-Balancing for Multi-Task
Learning", arXiv 2308.12029), at one step.

DB-MTL balances the losses' scales by training on log L_i, whose gradient is g_i / L_i, then the
gradients' magnitudes by scaling every log-loss gradient to the largest norm among them:

    u_i = ‖g_i‖ / (L_i + ε_L),   w_i = (max_j u_j / (u_i + ε)) / (L_i + ε_L),

so that Σ_i w_i g_i = Σ_i (max_j u_j / u_i) ∇ log(L_i + ε_L), every term of norm max_j u_j.
What differs from LibMTL's ``DB_MTL``: LibMTL averages the log-loss gradients themselves over the
steps (``DB_beta``, ``DB_beta_sigma``: g̃_i ← g_i + β / k^σ (g̃_i − g_i)), a per-coordinate state
that no function of the Gram matrix can hold; here the weights are those of its β = 0, from the
current losses and gradient norms. LibMTL also gives a task whose gradient is zero a weight of
max_j u_j / ε; here it gets the mean weight of the others (its head then trains at a typical scale).
"""

from __future__ import annotations

from torch import Tensor

from .base import (
    FunctionWeighting,
    check_number,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    task_norms,
)


def db_mtl_weights(losses: Tensor, gram: Tensor, *, loss_eps: float = 1e-8, eps: float = 1e-8) -> Tensor:
    """DB-MTL task weights ``[T]`` from the losses and the diagonal of G.

    Args:
        losses: ``[T]`` task losses (≥ 0, as the logarithm needs; LibMTL's 1e-8 is added).
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters (its diagonal).
        loss_eps: ≥ 0, ε_L added to each loss inside the logarithm (LibMTL's 1e-8).
        eps: ≥ 0, added to the log-loss gradient norms it divides by (LibMTL's 1e-8).

    Under a common scale of the gradients the weights change only through ``eps``.
    """
    check_weighting_inputs(losses, gram)
    _check_options(loss_eps, eps)
    dtype = compute_dtype(losses)
    norms, has_gradient = task_norms(gram, dtype)
    shifted = losses.to(dtype) + loss_eps
    log_norms = norms / shifted
    weights = log_norms.max() / (log_norms + eps) / shifted
    return fill_zero_gradient_tasks(weights, has_gradient, neutral=1.0)


def _check_options(loss_eps: float, eps: float) -> None:
    check_number("loss_eps", loss_eps)
    check_number("eps", eps)


class DBMTL(FunctionWeighting):
    """:func:`db_mtl_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(db_mtl_weights)
    gram_use = "diagonal"
    reads_losses = True

    def __init__(self, loss_eps: float = 1e-8, eps: float = 1e-8):
        _check_options(loss_eps, eps)
        super().__init__(loss_eps=loss_eps, eps=eps)
