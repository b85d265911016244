"""Equal weighting: w_i = 1, the plain gradient of Σ_i L_i."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FunctionWeighting, check_weighting_inputs, compute_dtype


def equal_weights(losses: Tensor, gram: Tensor) -> Tensor:
    """All-ones weights ``[T]``: the baseline every other weighting is measured against."""
    check_weighting_inputs(losses, gram)
    return torch.ones_like(losses, dtype=compute_dtype(losses))


class Equal(FunctionWeighting):
    """:func:`equal_weights` as a :class:`Weighting` (reads nothing of G)."""

    gram_use = "diagonal"
    reads_gram = False
    function = staticmethod(equal_weights)
