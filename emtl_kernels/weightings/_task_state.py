"""State kept per task by the stateful loss-based weightings, made at their first call.

T and the device are known from the first losses a weighting sees; from then on its state
(a loss history, learnable scales, FAMO's logits) is updated in place, so that a step that
reads it can be captured in a CUDA graph after a first, eager call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_num_tasks(num_tasks: object) -> None:
    """Raise unless ``num_tasks`` is None (sized by the first call) or an int ≥ 1."""
    if num_tasks is not None and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1):
        raise ValueError(f"num_tasks must be an integer >= 1 or None, got {num_tasks!r}")


def check_matches(state: Tensor, losses: Tensor, owner: str) -> None:
    """Raise where ``losses`` ``[T]`` are not for the T tasks and the device ``state`` was made for."""
    if losses.numel() != state.shape[-1]:
        raise ValueError(f"{owner} holds state for T={state.shape[-1]} tasks, got {losses.numel()} losses")
    if losses.device != state.device:
        raise ValueError(f"{owner} holds its state on {state.device}, the losses are on {losses.device}")


def masked_copy_(state: Tensor, update: Tensor, keep: Tensor) -> None:
    """``state`` ← ``update`` in place, unless ``keep`` (a 0-dim bool tensor): no host sync."""
    state.copy_(torch.where(keep, state, update))
