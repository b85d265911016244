"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018,
arXiv 1711.02257).

The task weights w are parameters trained, beside the model, to give every task a gradient norm
that follows its relative training rate:

    L_grad = Σ_i | w_i ‖g_i‖ − mean_j(w_j ‖g_j‖) · r_i^α |,   r_i = L̃_i / mean_j L̃_j,
    L̃_i = L_i / L_i(first step),

with the target mean_j(w_j ‖g_j‖) r_i^α held constant (the paper's Section 3.2). Everything it reads is
the losses and the diagonal of G, so ∂L_grad/∂w has a closed form, accumulated into the parameters'
``.grad`` by each call for the optimiser to apply. As LibMTL's ``GradNorm``, the weights are
w = T · softmax(θ) with θ the parameters: positive and summing to T (the paper renormalises them
to sum to T after each update instead).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .base import check_number, compute_dtype, task_norms
from .stateful import StatefulWeighting, check_num_tasks, continued_state, finite_inputs


class GradNorm(StatefulWeighting):
    """GradNorm task weights ``[T]``, as a :class:`~emtl_kernels.weightings.Weighting`.

    Args:
        num_tasks: T, to make the parameters at once (so that they can be handed to an optimiser
            before the first step); None makes them at the first call, on the losses' device.
        alpha: ≥ 0, the strength of the pull toward a common training rate (the paper's α;
            LibMTL's default 1.5).
        device: where parameters made at once live (default: the CPU).

    Parameters: :meth:`parameters` (θ ``[T]``, float32, zero at first: weights 1); give them to an
    optimiser, whose step after each :class:`~emtl_kernels.MTLStep` backward applies ∂L_grad/∂θ
    (accumulated into ``θ.grad``, so clear it with the model's). The paper uses a learning rate of
    its own for them (an optimiser parameter group).

    State: the first step's losses, L_i(0) (``initial_losses``; a task's first positive finite
    loss); :meth:`reset` forgets them (the next step's losses become L_i(0)) and leaves θ. A call
    with a non-finite loss or G adds no gradient and records no L_i(0). LibMTL takes L_i(0) as the mean loss of the
    first epoch, training with w = 1 meanwhile; here it is the first step's.
    """

    gram_use = "diagonal"
    reads_losses = True

    def __init__(self, num_tasks: int | None = None, alpha: float = 1.5, device: torch.device | str | None = None):
        check_num_tasks(num_tasks)
        check_number("alpha", alpha)
        self.alpha = alpha
        #: θ ``[T]``, the trained logits of the weights, or None before the first call.
        self.logits: Tensor | None = None
        if num_tasks is not None:
            self.logits = torch.zeros(num_tasks, device=device, requires_grad=True)
        #: ``[T]`` L_i(0), or None before the first call.
        self.initial_losses: Tensor | None = None

    def parameters(self) -> Iterator[Tensor]:
        """The trained parameters, θ, for the optimiser (an iterator, as ``nn.Module``'s)."""
        if self.logits is None:
            raise RuntimeError("GradNorm(num_tasks=None) makes its parameters at the first step: pass num_tasks")
        return iter([self.logits])

    def reset(self) -> None:
        self.initial_losses = None

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        num_tasks = losses.numel()
        dtype = compute_dtype(losses)
        if self.logits is None:
            self.logits = torch.zeros(num_tasks, device=losses.device, requires_grad=True)
        if self.logits.shape != (num_tasks,) or self.logits.device != losses.device:
            raise ValueError(
                f"GradNorm's parameters are [{self.logits.numel()}] on {self.logits.device}; "
                f"the losses [{num_tasks}] on {losses.device}"
            )
        finite = finite_inputs(losses, gram)
        losses = losses.detach().to(dtype)
        self.initial_losses, _ = continued_state(self.initial_losses, (num_tasks,), dtype, losses.device)
        # L_i(0) is the first positive finite loss of task i (0 until there is one).
        recorded = self.initial_losses > 0
        self.initial_losses.copy_(torch.where(recorded | ~finite | (losses <= 0), self.initial_losses, losses))
        weights = num_tasks * torch.softmax(self.logits.detach().to(dtype), 0)
        norms, has_gradient = task_norms(gram, dtype)
        # A task with no L_i(0) yet has no training rate: it counts as on pace.
        started = self.initial_losses > 0
        rates = torch.where(started, losses / torch.where(started, self.initial_losses, 1), 1)
        mean_rate = rates.mean()
        rates = torch.where(mean_rate > 0, rates / torch.where(mean_rate > 0, mean_rate, 1), 1)
        weighted_norms = weights * norms
        targets = weighted_norms.mean() * rates.clamp_min(0) ** self.alpha
        # ∂L_grad/∂w_i = sign(w_i c_i − target_i) c_i, through w = T softmax(θ):
        # ∂w_i/∂θ_j = w_i (δ_ij − w_j / T).
        by_weight = torch.sign(weighted_norms - targets) * norms
        by_logit = weights * (by_weight - (by_weight * weights).sum() / num_tasks)
        by_logit = torch.where(finite & has_gradient.any(), by_logit, 0).to(self.logits.dtype)
        if self.logits.grad is None:
            self.logits.grad = by_logit
        else:
            self.logits.grad.add_(by_logit)
        return weights

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha})"
