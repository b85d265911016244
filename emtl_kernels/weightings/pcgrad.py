"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020, arXiv 2001.06782).

Algorithm 1 of the paper: each task gradient g_i is projected, one task at a time in a random
order of the other tasks j, onto the normal plane of every g_j it conflicts with:

    g_i^PC ← g_i^PC − (g_i^PC·g_j / ‖g_j‖²) g_j    whenever g_i^PC·g_j < 0,

and the update is Σ_i g_i^PC. Every g_i^PC stays a combination of the task gradients,
g_i^PC = Σ_m A_im g_m, so the projections are tracked on the T×T coefficients A alone:
g_i^PC·g_j = (A G)_ij, and a projection subtracts (A G)_ij / G_jj from A_ij. The weights are the
column sums of A. All T tasks take their k-th projection at once, so the T − 1 sequential steps are
T − 1 batched updates of A. As in the authors' code and TorchJD, each task draws its own order.
On a CPU, where the extension is built, the compiled op ``emtl_solvers::pcgrad_weights`` takes
the same draws (or orders) and runs the rows' projections one by one in double: the same
weights without some twenty small tensor ops a call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from .base import FunctionWeighting, check_weighting_inputs, compute_dtype
from .task_orders import SeededGenerators, check_seed, order_keys, other_tasks_in_order


def pcgrad_weights(
    losses: Tensor,
    gram: Tensor,
    *,
    generator: torch.Generator | None = None,
    orders: Tensor | None = None,
) -> Tensor:
    """PCGrad task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        generator: the random source of the projection orders, on the losses' device (the
            default generator of that device when None). Orders are drawn on the device, as the
            ranks of ``torch.rand(T, T)`` along each row: no host round trip.
        orders: ``[T, T]`` integer tensor, row i a permutation of 0..T−1: the order in which task
            i meets the others (its own index is skipped). Overrides ``generator``.

    Degenerate inputs: T = 1 and gradients that never conflict give weight 1 to every task (the
    plain sum). A task with a zero gradient is never projected onto and keeps weight 1. Under a
    common scale of all gradients the weights do not change.
    """
    check_weighting_inputs(losses, gram)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    device = losses.device
    if _compiled.runs_compiled(gram):
        keys = order_keys(num_tasks, device, dtype, generator, orders)
        return _compiled.ops().pcgrad_weights(losses, gram, keys)
    others = other_tasks_in_order(num_tasks, device, dtype, generator, orders)
    gram = gram.to(dtype)
    sq_norms = gram.diagonal()
    tasks = torch.arange(num_tasks, device=device)
    coefficients = torch.eye(num_tasks, dtype=dtype, device=device)
    for k in range(num_tasks - 1):
        other = others[:, k]
        inner = (coefficients * gram[other]).sum(1)
        conflicting = (inner < 0) & (sq_norms[other] > 0)
        amount = torch.where(conflicting, inner / torch.where(conflicting, sq_norms[other], 1), 0)
        coefficients = coefficients.index_put((tasks, other), -amount, accumulate=True)
    return coefficients.sum(0)


class PCGrad(FunctionWeighting):
    """:func:`pcgrad_weights` with a seeded random source, as a
    :class:`~emtl_kernels.weightings.Weighting`.

    Args:
        seed: seed of a ``torch.Generator`` made on the device of the first losses it sees (one
            per device, :class:`~emtl_kernels.weightings.task_orders.SeededGenerators`); each call
            draws new orders from it. None draws from the device's default generator.
    """

    function = staticmethod(pcgrad_weights)

    def __init__(self, seed: int | None = None):
        check_seed(seed)
        super().__init__()
        self.seed = seed
        #: The generator the orders on a device come from (None: the device's default).
        self.generator = SeededGenerators(seed)

    def random_source(self) -> SeededGenerators:
        return self.generator

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self.function(losses, gram, generator=self.generator(losses.device))

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"
