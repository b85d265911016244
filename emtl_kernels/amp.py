"""Mixed precision with ``torch.amp.GradScaler``: a scaled step whose weights are the unscaled ones.

GradScaler multiplies the losses by a factor S (2¹⁶ to start) so that float16 gradients do not
underflow, and divides the gradients by S before the optimiser steps. A weighting that is handed
the scaled losses sees S·L_i and the Gram matrix S²·G. The weightings that normalise G (MGDA, UPGrad,
CAGrad…) do not change under a common scale of the gradients; EMTL does: its weights
w_i = 1 + (2λ/T)(r_i − r̄)/‖g_i‖ divide by the gradient norms (r_i does not change), so each
weight's distance from 1 shrinks by S, and at S = 2¹⁶ EMTL is equal weighting in all but name.
An option that is an absolute size (an ``eps``, ``norm_eps``, Nash-MTL's ``max_norm``) would be
compared with S-scaled quantities too. So::

    scaler = torch.amp.GradScaler("cuda")
    step = MTLStep(trunk.parameters(), unscaled("emtl", scaler, lam=0.1))
    ...
    step.backward(scaler.scale(torch.stack(losses)))  # scaled gradients, unscaled weights
    scaler_step(step, scaler, optimizer)  # scaler.step(optimizer), a skipped step counted as an overflow
    scaler.update()

:func:`unscaled` hands the weighting L_i / S and G / S² (S is a power of two: exact), read from
the scaler as a device tensor, without a host sync. :func:`scaler_step` makes the step's skip
visible to the scaler, so that it backs its scale off, as it does after ``backward()`` overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .step import MTLStep
from .weightings import Weighting, make_weighting


class Unscaled(Weighting):
    """A weighting fed the losses and Gram matrix with a GradScaler's scale divided out; made by
    :func:`unscaled`. The step's own record (``step.last``) keeps the scaled losses and norms."""

    def __init__(self, weighting: Weighting, scaler: torch.amp.GradScaler):
        self.weighting = weighting
        self.scaler = scaler
        self.gram_use = weighting.gram_use
        self.reads_losses = weighting.reads_losses
        self.reads_gram = weighting.reads_gram

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        inverse = self._inverse_scale(losses)
        return self.weighting(losses * inverse, gram * (inverse * inverse).to(gram.dtype))

    def after_backward(self, losses: Tensor, skipped: Tensor) -> None:
        """The inner weighting's state sees the unscaled losses too. A learnable loss scale (UW,
        IMTL-L) gets its gradient unscaled: step it with an optimiser the scaler does not unscale."""
        self.weighting.after_backward(losses * self._inverse_scale(losses), skipped)

    def after_optimizer_step(self, losses: Tensor) -> None:
        """``losses``: measured after the optimiser step, unscaled (the scale may have changed since)."""
        self.weighting.after_optimizer_step(losses)

    def _inverse_scale(self, losses: Tensor) -> Tensor:
        # scaler.scale(1) is the current scale on the losses' device (1 when the scaler is disabled).
        inverse = 1 / self.scaler.scale(torch.ones((), dtype=torch.float32, device=losses.device))
        return inverse.to(losses.dtype)

    def __repr__(self) -> str:
        return f"unscaled({self.weighting!r})"


def unscaled(weighting: str | Weighting, scaler: torch.amp.GradScaler, **options) -> Unscaled:
    """``weighting`` (a name from :data:`~emtl_kernels.WEIGHTINGS` with its options, or an
    instance) computing its weights from the unscaled losses and Gram matrix, for a step that is
    given the losses scaled by ``scaler`` (``step.backward(scaler.scale(losses))``)."""
    return Unscaled(make_weighting(weighting, **options), scaler)


def scaler_step(step: MTLStep, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.step(optimizer)`` after ``step.backward(scaler.scale(losses))``, with a skipped
    step counted as an overflow.

    A step that sees a non-finite loss, norm or weight skips: it adds nothing to ``.grad``. The
    scaler learns of an overflow only from a non-finite gradient, so it would step the optimiser on
    those unchanged gradients and keep its scale. When the step was skipped, one NaN is added to one
    gradient of the optimiser's parameters (a tensor op: no host sync), so that the scaler skips
    ``optimizer.step()`` and, at ``scaler.update()``, backs its scale off.
    """
    record = step.last
    if record is None:
        raise RuntimeError("scaler_step() follows step.backward(): no backward() has run on this step yet")
    grad = _first_dense_gradient(optimizer)
    if grad is None:
        raise ValueError("none of the optimizer's parameters has a gradient: call step.backward() first")
    skipped = record.skipped.to(grad.device)
    grad[(0,) * grad.dim()] += torch.where(skipped, torch.nan, 0.0).to(grad.dtype)
    scaler.step(optimizer)


def _first_dense_gradient(optimizer: torch.optim.Optimizer) -> Tensor | None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is not None and grad.layout == torch.strided and grad.numel() > 0:
                return grad
    return None
