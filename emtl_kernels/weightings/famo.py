"""FAMO: fast adaptive multitask optimisation (Liu et al., NeurIPS 2023, arXiv 2306.03792).

FAMO keeps logits ξ ``[T]`` and task weights z = softmax(ξ). Its scalarised loss (TorchJD's
``scalarization.FAMO``, LibMTL's ``FAMO``) is Σ_i (z_i / c) log(L_i − b_i + ε) with
c = Σ_j z_j / (L_j − b_j + ε) held constant, whose gradient by L_i is our weight:

    w_i = z_i / (c (L_i − b_i + ε)),   Σ_i w_i = 1,

so Σ_i w_i ∇L_i is the gradient of their scalarised loss. After the optimiser has stepped, the
losses of the same batch are measured again and ξ takes one Adam step (learning rate ``lr``, L2
``weight_decay``, β = (0.9, 0.999), ε = 1e-8, as ``torch.optim.Adam``) along the Jacobian of the
softmax times δ_i = log(L_i⁻ − b_i + ε) − log(L_i⁺ − b_i + ε): call
``MTLStep.after_optimizer_step(new_losses)`` (or :meth:`FAMO.after_optimizer_step`).

The Adam step is written out in tensor ops, not ``torch.optim.Adam``, so that a step the
``MTLStep`` skipped leaves ξ and its moments as they were, with no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import check_number, check_weighting_inputs, compute_dtype
from .stateful import StatefulWeighting, check_matches, masked_copy_

#: Added to L_i − b_i before the logarithm and the division, as the paper's code does.
EPS = 1e-8
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def famo_weights(
    losses: Tensor, gram: Tensor, *, logits: Tensor | None = None, min_losses: Sequence[float] | Tensor | None = None
) -> Tensor:
    """FAMO weights ``[T]`` for the ``logits`` ξ (0 when None: z uniform) and the lower bounds
    ``min_losses`` b (0 when None) of the losses, which must exceed them; G is unread."""
    check_weighting_inputs(losses, gram)
    dtype = compute_dtype(losses)
    if logits is None:
        logits = torch.zeros_like(losses, dtype=dtype)
    check_matches(logits, losses, "logits")
    bounds = 0.0 if min_losses is None else torch.as_tensor(min_losses, dtype=dtype, device=losses.device)
    return _weights(losses, logits, bounds)


def _weights(losses: Tensor, logits: Tensor, bounds: Tensor | float) -> Tensor:
    dtype = compute_dtype(losses)
    shifted = losses.detach().to(dtype) - bounds + EPS
    scaled = torch.softmax(logits.to(dtype), dim=0) / shifted
    return scaled / scaled.sum()


class FAMO(StatefulWeighting):
    """FAMO with its logits and their Adam state, as a :class:`StatefulWeighting` (reads the
    losses only).

    Args:
        lr: ≥ 0, the logits' Adam learning rate (0.025 in the paper, LibMTL and TorchJD).
        weight_decay: ≥ 0, its L2 decay (1e-3 in LibMTL and TorchJD, the paper's Algorithm 2).
        min_losses: the lower bounds b ``[T]`` of the losses (0 when None).

    Each step: ``step.backward(losses)``, ``optimizer.step()``, then the losses of the same batch
    from the updated model into ``step.after_optimizer_step(new_losses)``.

    The state is made for the T and device of the first call; another T or device raises.
    :meth:`reset` puts the logits and Adam's moments back to their start, in place.
    """

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(famo_weights)

    def __init__(self, lr: float = 0.025, weight_decay: float = 1e-3, min_losses: Sequence[float] | None = None):
        check_number("lr", lr)
        check_number("weight_decay", weight_decay)
        if min_losses is not None and not isinstance(min_losses, (Sequence, Tensor)):
            raise ValueError(f"min_losses must be a sequence of T numbers or None, got {min_losses!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.min_losses = min_losses
        # Made by the first call: logits ξ, Adam's moments and step count, the bounds b, the
        # losses the last unskipped step was weighed with, and whether they await their update.
        self.logits: Tensor | None = None
        self._state: dict[str, Tensor] = {}

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        if self.logits is None:
            self._make_state(losses)
        assert self.logits is not None
        check_matches(self.logits, losses, "FAMO")
        return _weights(losses, self.logits, self._state["bounds"])

    def after_backward(self, losses: Tensor, skipped: Tensor) -> None:
        if self.logits is None:  # no call has weighed a step yet
            return
        check_matches(self.logits, losses, "FAMO")
        state = self._state
        masked_copy_(state["before"], losses.detach().to(self.logits.dtype), skipped)
        state["pending"].copy_(~skipped)

    def after_optimizer_step(self, losses: Tensor) -> None:
        """One Adam step of the logits from the change of the losses across the optimiser step:
        ``losses`` ``[T]`` are those of the same batch, measured after it. Nothing moves when the
        step was skipped, or when no backward came since the last call."""
        if self.logits is None:
            raise RuntimeError("FAMO.after_optimizer_step follows a step weighed by FAMO: none has run yet")
        check_matches(self.logits, losses, "FAMO")
        logits, state = self.logits, self._state
        bounds = state["bounds"]
        change = torch.log(state["before"] - bounds + EPS) - torch.log(losses.detach().to(logits.dtype) - bounds + EPS)
        weights = torch.softmax(logits, dim=0)
        grad = weights * (change - (weights * change).sum()) + self.weight_decay * logits
        keep = ~state["pending"]
        step = state["step"] + 1
        first = BETAS[0] * state["first"] + (1 - BETAS[0]) * grad
        second = BETAS[1] * state["second"] + (1 - BETAS[1]) * grad * grad
        denominator = (second / (1 - BETAS[1] ** step)).sqrt() + ADAM_EPS
        masked_copy_(logits, logits - self.lr / (1 - BETAS[0] ** step) * first / denominator, keep)
        masked_copy_(state["first"], first, keep)
        masked_copy_(state["second"], second, keep)
        masked_copy_(state["step"], step, keep)
        state["pending"].fill_(False)

    def reset(self) -> None:
        """Logits ξ, Adam's moments and step count back to their start (z uniform), in place; the
        bounds b stay, and the losses of a backward not yet followed by an update are dropped."""
        if self.logits is None:
            return
        state = self._state
        self.logits.zero_()
        state["before"].fill_(1)
        for name in ("first", "second", "step"):
            state[name].zero_()
        state["pending"].fill_(False)

    def _make_state(self, losses: Tensor) -> None:
        dtype, device, num_tasks = compute_dtype(losses), losses.device, losses.numel()
        bounds = torch.zeros(num_tasks, dtype=dtype, device=device)
        if self.min_losses is not None:
            if len(self.min_losses) != num_tasks:
                raise ValueError(f"min_losses has {len(self.min_losses)} entries, for T={num_tasks} losses")
            bounds.copy_(torch.as_tensor(self.min_losses, dtype=dtype))
        self.logits = torch.zeros(num_tasks, dtype=dtype, device=device)
        self._state = {
            "bounds": bounds,
            "before": torch.ones(num_tasks, dtype=dtype, device=device),
            "first": torch.zeros(num_tasks, dtype=dtype, device=device),
            "second": torch.zeros(num_tasks, dtype=dtype, device=device),
            "step": torch.zeros((), dtype=dtype, device=device),
            "pending": torch.zeros((), dtype=torch.bool, device=device),
        }

    def __repr__(self) -> str:
        return f"FAMO(lr={self.lr}, weight_decay={self.weight_decay}, min_losses={self.min_losses!r})"
