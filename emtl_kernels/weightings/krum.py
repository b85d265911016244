"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017).

Each task gradient is scored by the sum of its distances to its T − f − 2 nearest other gradients,
f the number of gradients that may be adversarial (``n_byzantine``); the ``n_selected`` gradients
of lowest score are averaged. The distances come from G alone:
‖g_i − g_j‖² = G_ii + G_jj − 2 G_ij. As TorchJD's ``KrumWeighting``, which this matches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FunctionWeighting, check_weighting_inputs, compute_dtype


def krum_weights(losses: Tensor, gram: Tensor, *, n_byzantine: int = 0, n_selected: int = 1) -> Tensor:
    """Krum task weights ``[T]``: 1 / ``n_selected`` for each selected task, 0 for the others; the
    losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        n_byzantine: f ≥ 0, how many gradients may be adversarial; T must be at least f + 3.
        n_selected: how many gradients are averaged (1: Krum; more: Multi-Krum), at most T.

    Ties between scores are broken as ``torch.topk`` breaks them. A zero gradient is a point at
    the origin like any other; a scale of all gradients changes no selection.
    """
    check_weighting_inputs(losses, gram)
    _check_options(n_byzantine, n_selected)
    _check_task_count(losses.numel(), n_byzantine, n_selected)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    gram = gram.to(dtype)
    sq_norms = gram.diagonal()
    distances = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0).sqrt()
    # The nearest "other" is the task itself, at distance 0: take one more and drop it.
    nearest = torch.topk(distances, k=num_tasks - n_byzantine - 1, largest=False).values[:, 1:]
    selected = torch.topk(nearest.sum(1), k=n_selected, largest=False).indices
    weights = torch.zeros(num_tasks, dtype=dtype, device=losses.device)
    return weights.index_fill(0, selected, 1 / n_selected)


def _check_options(n_byzantine: int, n_selected: int) -> None:
    for name, value, least in (("n_byzantine", n_byzantine, 0), ("n_selected", n_selected, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_task_count(num_tasks: int, n_byzantine: int, n_selected: int) -> None:
    needed = max(n_byzantine + 3, n_selected)
    if num_tasks < needed:
        raise ValueError(
            f"Krum with n_byzantine={n_byzantine}, n_selected={n_selected} "
            f"needs at least {needed} tasks, got {num_tasks}"
        )


class Krum(FunctionWeighting):
    """:func:`krum_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(krum_weights)

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1):
        _check_options(n_byzantine, n_selected)
        super().__init__(n_byzantine=n_byzantine, n_selected=n_selected)
