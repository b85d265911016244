"""RLW: random loss weighting (Lin et al., TMLR 2022, arXiv 2111.10603, Algorithm 2).

Each step draws w = softmax(ε), ε ~ N(0, I_T): positive weights summing to 1, TorchJD's
``scalarization.Random`` and LibMTL's ``RLW`` with its default ``dist='Normal'``. The draw is a
tensor op on the losses' device, from its default generator or a seeded one: no host round trip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting, check_weighting_inputs, compute_dtype
from .task_orders import SeededGenerators


def rlw_weights(
    losses: Tensor, gram: Tensor, *, generator: torch.Generator | None = None, draws: Tensor | None = None
) -> Tensor:
    """softmax of T standard normal draws ``[T]``, on the losses' device; neither G nor the losses
    are read. ``generator`` (on that device) defaults to the device's default generator;
    ``draws`` ``[T]`` are the draws to take instead (to replay a step), overriding it."""
    check_weighting_inputs(losses, gram)
    if draws is not None and draws.shape != losses.shape:
        raise ValueError(f"draws must be [T] = [{losses.numel()}], got {tuple(draws.shape)}")
    return _draw(losses, generator, draws)


def _draw(losses: Tensor, generator: torch.Generator | None, draws: Tensor | None = None) -> Tensor:
    dtype = compute_dtype(losses)
    if draws is None:
        draws = torch.randn(losses.numel(), generator=generator, dtype=dtype, device=losses.device)
    return torch.softmax(draws.to(dtype), dim=0)


class RLW(Weighting):
    """:func:`rlw_weights` with a seeded random source, as a :class:`Weighting`.

    Args:
        seed: seed of a ``torch.Generator`` made on the device of the first losses it sees (one
            per device, :class:`~emtl_kernels.weightings.task_orders.SeededGenerators`, which says
            how to capture it in a CUDA graph); None draws from the device's default generator.
    """

    gram_use = "diagonal"
    reads_gram = False
    function = staticmethod(rlw_weights)

    def __init__(self, seed: int | None = None):
        self.seed = seed
        #: The generator the draws on a device come from (None: the device's default).
        self.generator = SeededGenerators(seed)

    def random_source(self) -> SeededGenerators:
        return self.generator

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return _draw(losses, self.generator(losses.device))

    def __repr__(self) -> str:
        return f"RLW(seed={self.seed})"
