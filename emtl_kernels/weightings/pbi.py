"""PBI: penalty-based boundary intersection (Zhang & Li, IEEE TEVC 2007, "MOEA/D: A
Multiobjective Evolutionary Algorithm Based on Decomposition").

The losses less a reference point z, f = L − z, are split along the unit preference direction
d = r / ‖r‖ and across it; the objective is the distance along it plus θ times the distance to it,

    S = d₁ + θ d₂,    d₁ = fᵀd,  d₂ = sqrt(‖f − d₁ d‖² + ε),  ε = 1e-12,

TorchJD's ``scalarization.PBI(theta, weights=r, reference=z)`` (ε theirs too: it keeps the
gradient finite on the preference ray). Our weights are its gradient by the losses,

    w = ∂S/∂L = d + θ (f − d₁ d) / d₂,

so Σ_i w_i ∇L_i is the gradient of their scalarised loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FunctionWeighting, Vector, check_number, check_vector, check_weighting_inputs, compute_dtype

#: ε under the square root of the distance to the preference ray, TorchJD's.
RAY_EPSILON = 1e-12


def pbi_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    theta: float = 5.0,
    preference: Vector | None = None,
    reference: Vector | None = None,
) -> Tensor:
    """PBI weights ``[T]``, the gradient of the penalty-based boundary intersection; G unread.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]``, not read.
        theta: θ ≥ 0, the penalty on the distance to the preference ray (the paper's 5).
        preference: r ``[T]``, non-negative, not all zero; the diagonal direction when None.
        reference: the ideal point z ``[T]``, a lower bound on the losses; the origin when None.
            Tensors on the losses' device keep the step capturable in a CUDA graph.
    """
    check_weighting_inputs(losses, gram)
    _check_options(theta, preference, reference, losses.numel())
    dtype = compute_dtype(losses)
    shifted = losses.detach().to(dtype)
    if reference is not None:
        shifted = shifted - torch.as_tensor(reference, dtype=dtype, device=losses.device)
    if preference is None:
        direction = torch.full_like(shifted, losses.numel() ** -0.5)
    else:
        direction = torch.as_tensor(preference, dtype=dtype, device=losses.device)
        direction = direction / direction.norm()
    across = shifted - (shifted @ direction) * direction
    return direction + theta * across / (across @ across + RAY_EPSILON).sqrt()


def _check_options(theta, preference, reference, num_tasks: int | None) -> None:
    check_number("theta", theta)
    check_vector("preference", preference, num_tasks)
    check_vector("reference", reference, num_tasks)


class PBI(FunctionWeighting):
    """:func:`pbi_weights` with fixed options, as a :class:`Weighting` (reads the losses only)."""

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(pbi_weights)

    def __init__(self, theta: float = 5.0, preference: Vector | None = None, reference: Vector | None = None):
        _check_options(theta, preference, reference, None)
        super().__init__(theta=theta, preference=preference, reference=reference)
