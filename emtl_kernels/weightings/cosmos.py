"""COSMOS: the cosine-penalised linear scalarisation (Ruchte & Grabocka, ICDM 2021, "Scalable
Pareto Front Approximation for Deep Multi-Objective Learning", arXiv 2103.13392).

The objective is the preference-weighted sum of the losses less λ times their cosine with the
preference r, which pulls the loss vector toward the preference ray:

    S = rᵀL − λ cos(r, L),    cos(r, L) = rᵀL / (‖r‖ ‖L‖),

TorchJD's ``scalarization.COSMOS(lambda_, weights=r)``. Our weights are its gradient by the losses,

    w = ∂S/∂L = r − λ (r̂ − cos(r, L) L̂) / ‖L‖,    r̂ = r / ‖r‖,  L̂ = L / ‖L‖,

so Σ_i w_i ∇L_i is the gradient of their scalarised loss. The paper draws r from a Dirichlet
distribution at every step (and feeds it to the model too): give it as a tensor on the losses'
device and overwrite it in place between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FunctionWeighting, Vector, check_number, check_vector, check_weighting_inputs, compute_dtype


def cosmos_weights(losses: Tensor, gram: Tensor, *, lam: float = 1.0, preference: Vector | None = None) -> Tensor:
    """COSMOS weights ``[T]``, the gradient of the cosine-penalised scalarisation; G unread.

    Args:
        losses: ``[T]`` task losses, not all zero.
        gram: ``[T, T]``, not read.
        lam: λ ≥ 0, the weight of the cosine; 0 leaves the linear scalarisation rᵀL.
        preference: r ``[T]``; 1/T for every task (the mean of the paper's Dirichlet draws) when None.
    """
    check_weighting_inputs(losses, gram)
    check_number("lam", lam)
    check_vector("preference", preference, losses.numel())
    dtype = compute_dtype(losses)
    values = losses.detach().to(dtype)
    if preference is None:
        preference = torch.full_like(values, 1 / losses.numel())
    else:
        preference = torch.as_tensor(preference, dtype=dtype, device=losses.device)
    loss_norm = values.norm()
    unit_preference, unit_losses = preference / preference.norm(), values / loss_norm
    cosine = unit_preference @ unit_losses
    return preference - lam * (unit_preference - cosine * unit_losses) / loss_norm


class COSMOS(FunctionWeighting):
    """:func:`cosmos_weights` with fixed options, as a :class:`Weighting` (reads the losses only)."""

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(cosmos_weights)

    def __init__(self, lam: float = 1.0, preference: Vector | None = None):
        check_number("lam", lam)
        check_vector("preference", preference, None)
        super().__init__(lam=lam, preference=preference)
