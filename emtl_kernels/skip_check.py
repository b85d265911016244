"""Whether a step is skipped: the reasons, gathered as device flags and decided in one place.

A step is skipped, as ``GradScaler`` skips one, when anything it would add to a ``.grad`` is not
finite; it then adds nothing at all. Every check here is a tensor op whose result stays on the
device (a 0-dim bool tensor), so that the step never waits for the device and stays capturable
in a CUDA graph: the flag is read on the host only by whoever needs it (``optimizer_step``).

Two ways to know that the update on the shared parameters is finite, by cost:

- a certificate, free: |Σ_i w_i g_i| ≤ Σ_i |w_i| c_i elementwise (c_i = ‖g_i‖ = sqrt(G_ii)), so
  when every G_ii is finite (hence every g_i) and Σ_i |w_i| c_i stays below half the storage
  dtype's largest value (the half absorbs the float32 rounding of the sum of T terms), the
  combination cannot overflow. It fits float32 and bfloat16 (largest values ~3.4e38);
- the written values themselves, one more read of them: for float16, whose largest value
  (65504) ordinary gradients reach, and for weightings that read nothing of G, whose weights
  stay valid when G overflows float32 (a gradient norm beyond ~1.8e19).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

#: What ``StepRecord.skip_reasons`` flags, in order: a loss is not finite; a squared gradient
#: norm G_ii is not finite (only for weightings that read G: a task gradient holds inf or NaN, or
#: its norm is beyond float32's range, ~1.8e19); a weight is not finite; a value the step would
#: add to a ``.grad`` is not finite, or could overflow its dtype.
SKIP_REASONS = ("loss", "sq_norm", "weight", "update")


class SkipCheck:
    """The skip decision of one step.

    Made from what the weights were computed from; the step then adds what it learns about the
    values it would write (:meth:`require`, :meth:`require_finite`) and reads :attr:`skipped`
    before each write. Every flag is a device tensor: nothing here waits for the device.
    """

    def __init__(self, losses: Tensor, sq_norms: Tensor, weights: Tensor, *, reads_gram: bool):
        no = torch.zeros((), dtype=torch.bool, device=losses.device)
        self._inputs = [
            ~torch.isfinite(losses).all(),
            ~torch.isfinite(sq_norms).all() if reads_gram else no,
            ~torch.isfinite(weights).all(),
        ]
        self.update_finite = ~no

    def require(self, holds: Tensor) -> None:
        """Skip unless ``holds`` (a 0-dim bool tensor) about the values to write."""
        self.update_finite = self.update_finite & holds

    def require_finite(self, tensors: Iterable[Tensor | None]) -> None:
        """Skip unless every value of ``tensors`` is finite (sparse ones: their stored values;
        None entries are ignored)."""
        values = [_stored_values(t) for t in tensors if t is not None]
        values = [v for v in values if v.numel() > 0]
        if values:
            self.require(all_finite(values))

    @property
    def reasons(self) -> Tensor:
        """``[len(SKIP_REASONS)]`` bool: which of :data:`SKIP_REASONS` hold."""
        return torch.stack([*self._inputs, ~self.update_finite])

    @property
    def skipped(self) -> Tensor:
        """0-dim bool: whether the step adds nothing."""
        return self.reasons.any()


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool tensor: whether every value of the (dense, non-empty) ``tensors`` is finite,
    from one read of each (see :func:`extremes`)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for extreme in extremes(tensors):
        by_dtype.setdefault(extreme.dtype, []).append(extreme)
    # Stacked in their own dtype: a finite float64 value may be beyond float32's range.
    return torch.stack([torch.isfinite(torch.stack(group)).all() for group in by_dtype.values()]).all()


def extremes(tensors: list[Tensor]) -> list[Tensor]:
    """Values that are all finite exactly when every value of ``tensors`` is. On a GPU, one
    multi-tensor pass takes each one's largest magnitude: unlike a sum of squares it cannot
    overflow for finite values, and it carries inf and NaN. On a CPU, where that reduction is
    not vectorised (about ten times a plain read), each one's minimum and maximum, which carry
    NaN and either infinity alike."""
    if tensors[0].device.type == "cpu":
        return min_and_max(tensors)
    return largest_magnitudes(tensors)


def min_and_max(tensors: list[Tensor]) -> list[Tensor]:
    return [extreme for tensor in tensors for extreme in torch.aminmax(tensor)]


def largest_magnitudes(tensors: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_norm(tensors, ord=math.inf))


def combination_bounded(weights: Tensor, sq_norms: Tensor, dtype: torch.dtype, *, copies: int = 1) -> Tensor:
    """0-dim bool tensor: whether Σ_i w_i g_i is sure to stay finite in ``dtype``, from the
    certificate ``copies`` · Σ_i |w_i| sqrt(G_ii) ≤ max(dtype) / 2 (False for non-finite input).
    ``copies`` bounds a sum of that many such combinations (data-parallel ranks)."""
    bound = (weights.detach().abs().to(torch.float32) * sq_norms.clamp_min(0).sqrt()).sum() * copies
    return bound <= torch.finfo(dtype).max / 2


def _stored_values(tensor: Tensor) -> Tensor:
    return tensor._values() if tensor.is_sparse else tensor
