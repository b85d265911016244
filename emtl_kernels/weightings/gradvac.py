"""GradVac: gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021, arXiv 2010.05874).

Each task gradient g_i meets the others g_j in a random order. Where the cosine similarity φ_ij of
the (already corrected) g_i^PC with g_j is below a target φ̂_ij, a multiple of g_j is added to
g_i^PC so that the similarity becomes the target (the paper's Equation 3):

    g_i^PC ← g_i^PC + ‖g_i^PC‖ (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (‖g_j‖ √(1 − φ̂_ij²)) · g_j,

and each target follows the similarities seen, φ̂_ij ← (1 − β) φ̂_ij + β φ_ij, across steps. The
update is Σ_i g_i^PC. As in PCGrad, every g_i^PC = Σ_m C_im g_m is tracked on its T×T
coefficients, every similarity read from C and G, and the T tasks take their k-th correction at
once. This matches TorchJD's ``GradVacWeighting`` (same order convention, same ε placement), which
runs the T(T − 1) corrections one by one on the host. On a CPU, where the extension is built, the
compiled op ``emtl_solvers::gradvac_weights`` takes the same draws (or orders) and targets and
runs the rows' corrections one by one in double.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from .base import check_number, compute_dtype
from .stateful import StatefulWeighting, continued_state, finite_inputs
from .task_orders import SeededGenerators, order_keys, other_tasks_in_order


class GradVac(StatefulWeighting):
    """GradVac task weights ``[T]`` (the column sums of C); the losses give the device and dtype.

    Args:
        beta: in [0, 1], the rate of the targets' moving average (TorchJD's and LibMTL's
            default, 0.5).
        eps: ≥ 0, added to the denominators of the similarity and of the correction (TorchJD's
            1e-8, absolute).
        seed: seed of the generator of the orders, one per device, as in
            :class:`~emtl_kernels.weightings.PCGrad`; None draws from the device's default.

    State: the ``[T, T]`` targets φ̂, zero at first, on the device (``targets``). :meth:`reset`
    sets them back to zero. ``weights(losses, gram, orders=...)`` takes the orders (``[T, T]``,
    row i a permutation of 0..T−1 whose entry i is skipped) instead of drawing them.

    A task with a zero gradient is never corrected toward (TorchJD adds a multiple ‖g_i‖ φ̂_ij / ε
    of its zero gradient, harmless to the update but a huge weight on its own head); it keeps
    weight 1. Its similarities are 0, as in TorchJD.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None):
        check_number("beta", beta)
        if beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        check_number("eps", eps)
        self.beta = beta
        self.eps = eps
        self.generator = SeededGenerators(seed)
        #: ``[T, T]`` targets φ̂_ij of the cosine similarities, or None before the first call.
        self.targets: Tensor | None = None

    def random_source(self) -> SeededGenerators:
        return self.generator

    def reset(self) -> None:
        self.targets = None

    def weights(self, losses: Tensor, gram: Tensor, orders: Tensor | None = None) -> Tensor:
        dtype = compute_dtype(losses)
        num_tasks = losses.numel()
        device = losses.device
        self.targets, _ = continued_state(self.targets, (num_tasks, num_tasks), dtype, device)
        if _compiled.runs_compiled(gram):
            keys = order_keys(num_tasks, device, dtype, self.generator(device), orders)
            weights, moved = _compiled.ops().gradvac_weights(losses, gram, keys, self.targets, self.beta, self.eps)
        else:
            others = other_tasks_in_order(num_tasks, device, dtype, self.generator(device), orders)
            weights, moved = self._corrected(gram.to(dtype), others, self.targets)
        self.targets.copy_(torch.where(finite_inputs(losses, gram), moved, self.targets))
        return weights

    def _corrected(self, gram: Tensor, others: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The tensor-op corrections: the weights (column sums of C) and the moved targets."""
        num_tasks = gram.shape[0]
        norms = gram.diagonal().clamp_min(0).sqrt()
        tasks = torch.arange(num_tasks, device=gram.device)
        coefficients = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
        # (C G)_ij = g_i^PC · g_j, kept up to date with C.
        inner = gram.clone()
        for k in range(num_tasks - 1):
            other = others[:, k]
            own_norm = (inner * coefficients).sum(1).clamp_min(0).sqrt()
            similarity = inner[tasks, other] / (own_norm * norms[other] + self.eps)
            target = targets[tasks, other]
            below = (similarity < target) & (norms[other] > 0)
            sine = (1 - similarity.square()).clamp_min(0).sqrt()
            target_sine = (1 - target.square()).clamp_min(0).sqrt()
            amount = own_norm * (target * sine - similarity * target_sine) / (norms[other] * target_sine + self.eps)
            amount = torch.where(below, amount, 0)
            coefficients = coefficients.index_put((tasks, other), amount, accumulate=True)
            inner = inner + amount[:, None] * gram[other]
            moved = (1 - self.beta) * target + self.beta * similarity
            targets = targets.index_put((tasks, other), moved)
        return coefficients.sum(0), targets

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps}, seed={self.generator.seed})"
