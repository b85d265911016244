"""Learnable per-task loss scales trained beside the model: the common part of UW and IMTL-L.

Both minimise J(θ, s) = Σ_i c (e^{σ s_i} L_i(θ) − σ s_i) over the model θ and one scale s_i a
task (UW: σ = −1, c = ½; IMTL-L: σ = +1, c = 1). The step writes the gradient of Σ_i w_i L_i with
the weights held constant, so the weights are ∂J/∂L_i = c e^{σ s_i} and the update on θ is
∂J/∂θ. The scales are not reached by that backward: their gradient, in closed form,

    ∂J/∂s_i = σ (w_i L_i − c),

is added to ``s.grad`` by :meth:`~LearnedLossScales.after_backward`, after the step has decided
whether it is skipped (nothing is added then). The scales are an ``nn.Parameter``: give
:meth:`~LearnedLossScales.parameters` to the optimiser with the model's, and one
``optimizer.step()`` moves θ and s along ∂J, as a backward of J would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from .base import check_weighting_inputs, compute_dtype
from .stateful import StatefulWeighting, check_matches, check_num_tasks


def scaled_weights(losses: Tensor, gram: Tensor, scales: Tensor | None, sign: float, factor: float) -> Tensor:
    """c·e^{σ s_i} ``[T]`` in the losses' compute dtype; s = 0 (c for every task) when None."""
    check_weighting_inputs(losses, gram)
    return _scaled(losses, scales, sign, factor)


def _scaled(losses: Tensor, scales: Tensor | None, sign: float, factor: float) -> Tensor:
    dtype = compute_dtype(losses)
    if scales is None:
        return torch.full_like(losses, factor, dtype=dtype)
    check_matches(scales, losses, "scales")
    return factor * torch.exp(sign * scales.detach().to(dtype))


class LearnedLossScales(StatefulWeighting):
    """A :class:`StatefulWeighting` holding one learnable scale a task (see the module docstring).

    The scales are an optimiser's parameters: a call for another T or device raises, and
    :meth:`reset` writes ``init`` into them in place, so that the optimiser's reference stays
    valid (their ``.grad`` and the optimiser's own state, such as Adam's moments, are left).

    Subclasses set :attr:`sign`, :attr:`factor` and their public ``function``.
    """

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    sign: float
    factor: float

    def __init__(self, num_tasks: int | None = None, init: float = 0.0):
        check_num_tasks(num_tasks)
        if not isinstance(init, (int, float)) or isinstance(init, bool) or not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.init = float(init)
        #: The scales s, ``[T]``: float32 when made now; with ``num_tasks`` None a lazy parameter
        #: that the first call makes on the losses' device, in their compute dtype (an optimiser
        #: may hold it before).
        self.scales: Tensor = (
            UninitializedParameter() if num_tasks is None else nn.Parameter(torch.full((num_tasks,), self.init))
        )

    def parameters(self) -> Iterator[Tensor]:
        """The learnable scales, for the optimiser."""
        yield self.scales

    def reset(self) -> None:
        """The scales back to ``init``, in place (nothing to do before they are made)."""
        if isinstance(self.scales, UninitializedParameter):
            return
        with torch.no_grad():
            self.scales.fill_(self.init)

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        if isinstance(self.scales, UninitializedParameter):
            with torch.no_grad():
                self.scales.materialize((losses.numel(),), device=losses.device, dtype=compute_dtype(losses))
                self.scales.fill_(self.init)
        return _scaled(losses, self.scales, self.sign, self.factor)

    def after_backward(self, losses: Tensor, skipped: Tensor) -> None:
        scales = self.scales
        if isinstance(scales, UninitializedParameter):  # no call has weighed a step with them yet
            return
        check_matches(scales, losses, type(self).__name__)
        with torch.no_grad():
            weights = self.factor * torch.exp(self.sign * scales)
            grad = self.sign * (weights * losses.detach().to(scales.dtype) - self.factor)
            grad = torch.where(skipped.to(scales.device), 0.0, grad)
            if scales.grad is None:
                scales.grad = grad
            else:
                scales.grad += grad

    def __repr__(self) -> str:
        size = None if isinstance(self.scales, UninitializedParameter) else self.scales.numel()
        return f"{type(self).__name__}(num_tasks={size}, init={self.init})"
