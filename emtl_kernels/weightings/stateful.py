"""Weightings that keep state across steps, and the helpers they share.

The state (moving averages, targets, first losses, a loss history, learned scales or logits)
is a set of tensors on the losses' device, updated in place with tensor ops, so that a step
that reads it can be captured in a CUDA graph after a first, eager call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting


class StatefulWeighting(Weighting):
    """A :class:`Weighting` whose weights depend on the calls before.

    Its state is a set of tensors on the device of the losses, updated in place by each call with
    tensor ops (no host sync): a CUDA graph that captures a step replays the update on the same
    tensors. :meth:`reset` puts the state back to its start; the next call weighs as a fresh
    instance's first call does. A call whose losses or Gram matrix hold a value that is not
    finite leaves the state as it was (:func:`finite_inputs`, or the step's ``skipped``): the
    step skips it, and it must not poison the steps after.

    A call on another problem than the state's (another number of tasks T, dtype or device)
    meets one of two policies:

    - **restart** (PCD, GradVac, CR-MOGM, GradNorm's first losses): the state starts afresh
      (:func:`continued_state`), a change of problem and not a continuation, as TorchJD's
      stateful weightings do;
    - **raise** (the loss-based ones: DWA, FAMO, and UW / IMTL-L's learned scales): the state is
      made for the T and device of the first call and a mismatch raises (:func:`check_matches`),
      since learned parameters are held by an optimiser, whose references a new tensor would
      leave behind. Their :meth:`reset` writes the start values in place for the same reason.
    """

    def reset(self) -> None:
        """Put the state back to its start (the next call is as a fresh instance's first)."""
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
