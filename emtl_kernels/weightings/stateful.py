"""Weightings that keep state across steps (moving averages, targets, first losses)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting


class StatefulWeighting(Weighting):
    """A :class:`Weighting` whose weights depend on the calls before.

    Its state is a set of tensors on the device of the losses, updated in place by each call with
    tensor ops (no host sync): a CUDA graph that captures a step replays the update on the same
    tensors. :meth:`reset` forgets the state; the next call starts as the first one did. The state
    is also started afresh when a call's number of tasks, dtype or device differs from the last
    one's: a change of problem, not a continuation (TorchJD's stateful weightings do the same).
    A call whose losses or Gram matrix hold a value that is not finite leaves the state as it
    was (:func:`finite_inputs`): the step skips it, and it must not poison the steps after.
    """

    def reset(self) -> None:
        raise NotImplementedError


def continued_state(
    state: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, bool]:
    """The state tensor a call continues from, and whether it starts afresh: ``state`` when it
    has this shape, dtype and device, else a new zero tensor (metadata only, no sync)."""
    if state is not None and state.shape == shape and state.dtype == dtype and state.device == device:
        return state, False
    return torch.zeros(shape, dtype=dtype, device=device), True


def finite_inputs(losses: Tensor, gram: Tensor) -> Tensor:
    """0-dim bool tensor: whether every loss and every entry of G is finite (no sync)."""
    return torch.isfinite(losses).all() & torch.isfinite(gram).all()
