"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019, arXiv 1803.10704).

A task whose loss fell less over the last period weighs more:

    w_i = T softmax_i(r / τ),   r_i = L̄_i(t−1) / L̄_i(t−2),

L̄(t) the average loss of period t, τ the temperature (2 in the paper). Until two periods have
ended, every weight is 1. The weights read the losses' history only, so Σ_i w_i ∇L_i is the
gradient of the scalarised loss Σ_i w_i L_i of TorchJD's ``scalarization.DWA`` and LibMTL's
``DWA``.

**Period.** The paper, LibMTL and TorchJD average the losses over an epoch: with the default
``period="epoch"``, call :meth:`DWA.end_epoch` at the end of each (TorchJD's ``step()``); without
it the weights stay 1. ``period="step"`` makes every step a period (r_i the ratio of the last two
steps' losses): no call to make, but the ratio of two batches' losses is noisy. The history stays
on the device and is updated in place by the step (``after_backward``), leaving out a step it
skipped.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import check_number, check_weighting_inputs, compute_dtype
from .stateful import StatefulWeighting, check_matches, masked_copy_

Period = Literal["epoch", "step"]


def dwa_weights(losses: Tensor, gram: Tensor, *, history: Tensor | None = None, temperature: float = 2.0) -> Tensor:
    """DWA weights ``[T]`` from ``history``, ``[2, T]`` the average losses of the two periods
    before (the older first); all 1 when None. The losses give T, device and dtype; G is unread."""
    check_weighting_inputs(losses, gram)
    check_number("temperature", temperature, positive=True)
    return _weights(losses, history, temperature)


def _weights(losses: Tensor, history: Tensor | None, temperature: float) -> Tensor:
    dtype = compute_dtype(losses)
    if history is None:
        return torch.ones_like(losses, dtype=dtype)
    check_matches(history, losses, "history")
    rates = history[1].to(dtype) / history[0].to(dtype)
    return losses.numel() * torch.softmax(rates / temperature, dim=0)


class DWA(StatefulWeighting):
    """DWA with its loss history, as a :class:`StatefulWeighting` (reads the losses only).

    The history is made for the T and device of the first call; another T or device raises.
    :meth:`reset` forgets it (in place: every weight is 1 again until two periods have ended).

    Args:
        temperature: τ > 0; larger is closer to equal weighting.
        period: "epoch" (the paper's, LibMTL's and TorchJD's: call :meth:`end_epoch`) or "step".
    """

    gram_use = "diagonal"
    reads_gram = False
    reads_losses = True
    function = staticmethod(dwa_weights)

    def __init__(self, temperature: float = 2.0, period: Period = "epoch"):
        check_number("temperature", temperature, positive=True)
        if period not in ("epoch", "step"):
            raise ValueError(f"period must be 'epoch' or 'step', got {period!r}")
        self.temperature = temperature
        self.period: Period = period
        # Made by the first call: the two last periods' averages [2, T], the running sum [T] and
        # step count of this period, the number of periods ended (counted up to 2).
        self._history: Tensor | None = None
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._ended: Tensor | None = None

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        if self._history is None:
            self._make_state(losses)
        assert self._history is not None and self._ended is not None
        weights = _weights(losses, self._history, self.temperature)
        return torch.where(self._ended >= 2, weights, 1.0)

    def after_backward(self, losses: Tensor, skipped: Tensor) -> None:
        if self._sum is None or self._count is None:  # no call has weighed a step yet
            return
        check_matches(self._sum, losses, "DWA")
        values = losses.detach().to(self._sum.dtype)
        masked_copy_(self._sum, self._sum + values, skipped)
        masked_copy_(self._count, self._count + 1, skipped)
        if self.period == "step":
            self.end_epoch()

    def end_epoch(self) -> None:
        """End the period: its average loss joins the history (a period without an unskipped step
        is left out). Tensor ops on the device: no host sync."""
        if self._history is None or self._sum is None or self._count is None or self._ended is None:
            return
        empty = self._count == 0
        average = self._sum / self._count.clamp_min(1)
        masked_copy_(self._history, torch.stack([self._history[1], average]), empty)
        masked_copy_(self._ended, (self._ended + 1).clamp_max(2), empty)
        self._sum.zero_()
        self._count.zero_()

    def reset(self) -> None:
        """Forget the loss history: the periods ended and the one under way (in place)."""
        if self._history is None or self._sum is None or self._count is None or self._ended is None:
            return
        self._history.fill_(1)
        self._sum.zero_()
        self._count.zero_()
        self._ended.zero_()

    def _make_state(self, losses: Tensor) -> None:
        dtype, device = compute_dtype(losses), losses.device
        self._history = torch.ones(2, losses.numel(), dtype=dtype, device=device)
        self._sum = torch.zeros(losses.numel(), dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=dtype, device=device)
        self._ended = torch.zeros((), dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, period={self.period!r})"
