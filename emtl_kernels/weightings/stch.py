"""STCH: smooth Tchebycheff scalarisation (Lin et al., ICML 2024, arXiv 2402.19078).

The objective is a smooth maximum of the preference-weighted losses,

    S = μ log Σ_i exp(λ_i (f_i − z_i) / μ),

f_i = L_i (TorchJD's ``scalarization.STCH``, λ = 1/T by default) or f_i = log L_i with
``log_losses=True`` (LibMTL's ``STCH`` after its warm-up: λ = 1, z its nadir point, S times T).
Our weights are its gradient by the losses,

    w_i = ∂S/∂L_i = λ_i p_i · (1 or 1/L_i),   p = softmax(λ ⊙ (f − z) / μ),

so Σ_i w_i ∇L_i is the gradient of their scalarised loss (LibMTL's divided by T). The softmax
is the stable one: μ → 0 does not overflow. LibMTL measures its nadir point as the average loss
of its warm-up epochs; give it here as ``reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FunctionWeighting, Vector, check_number, check_vector, check_weighting_inputs, compute_dtype


def stch_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    mu: float = 1.0,
    preference: Vector | None = None,
    reference: Vector | None = None,
    log_losses: bool = False,
) -> Tensor:
    """STCH weights ``[T]``, the gradient of the smooth Tchebycheff scalarisation; G unread.

    Args:
        losses: ``[T]`` task losses (positive with ``log_losses``).
        gram: ``[T, T]``, not read.
        mu: μ > 0, the smoothing; smaller is closer to the maximum.
        preference: λ ``[T]``; 1/T for every task when None.
        reference: the ideal point z ``[T]`` subtracted from the losses (with ``log_losses``:
            the point the losses are divided by, LibMTL's nadir); none when None. Tensors on the
            losses' device keep the step capturable in a CUDA graph (a list is copied each call).
        log_losses: scalarise log L_i instead of L_i (LibMTL's form).
    """
    check_weighting_inputs(losses, gram)
    _check_options(mu, preference, reference, log_losses, losses.numel())
    dtype = compute_dtype(losses)
    values = losses.detach().to(dtype)
    objectives = values.log() if log_losses else values
    if reference is not None:
        reference = torch.as_tensor(reference, dtype=dtype, device=losses.device)
        objectives = objectives - (reference.log() if log_losses else reference)
    if preference is None:
        preference = torch.full_like(values, 1 / losses.numel())
    else:
        preference = torch.as_tensor(preference, dtype=dtype, device=losses.device)
    weights = preference * torch.softmax(preference * objectives / mu, dim=0)
    return weights / values if log_losses else weights


def _check_options(mu, preference, reference, log_losses, num_tasks: int | None) -> None:
    check_number("mu", mu, positive=True)
    check_vector("preference", preference, num_tasks)
    check_vector("reference", reference, num_tasks)
    if not isinstance(log_losses, bool):
        raise ValueError(f"log_losses must be a bool, got {log_losses!r}")


class STCH(FunctionWeighting):
    """:func:`stch_weights` with fixed options, as a :class:`Weighting` (reads the losses only)."""

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(stch_weights)

    def __init__(
        self,
        mu: float = 1.0,
        preference: Vector | None = None,
        reference: Vector | None = None,
        log_losses: bool = False,
    ):
        _check_options(mu, preference, reference, log_losses, None)
        super().__init__(mu=mu, preference=preference, reference=reference, log_losses=log_losses)
