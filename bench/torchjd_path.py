"""TorchJD 0.18's multi-task step (``torchjd.autojac.mtl_backward``, then ``jac_to_grad``), with the
closest aggregator: TorchJD's own :class:`~torchjd.aggregation.GramianWeightedAggregator` around
the very weighting the fused step uses, so both compute the same update on the shared parameters.

- ``mtl_backward`` backpropagates each loss through its head, accumulates the heads' gradients in
  their ``.grad`` (unweighted: TorchJD's semantics) and stores the T×P Jacobian of the shared
  parameters in their ``.jac`` fields, with one vectorised backward through the trunk.
- ``jac_to_grad`` concatenates those Jacobians into one T×P matrix, forms its Gramian, gets the
  weights from it, multiplies, splits and writes ``.grad`` (the post-backward part). With
  ``optimize_gramian_computation=True`` it sums per-parameter Gramians instead of concatenating:
  TorchJD's own memory-saving option, measured as its own variant.

TorchJD is optional (the ``bench`` extra): import this module only where it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchjd.aggregation
from torch import Tensor
from torchjd.autojac import jac_to_grad, mtl_backward

from emtl_kernels import Weighting, make_weighting

from .timing import Clock


class TorchJDStep:
    """``backward(features, losses)``: ``mtl_backward`` then ``jac_to_grad`` with a Gramian
    aggregator computing ``weighting``'s weights (see the module's notes)."""

    def __init__(
        self,
        shared_params,
        task_params: Sequence,
        weighting: str | Weighting,
        *,
        optimize_gramian_computation: bool = False,
        **weighting_options,
    ):
        self.shared = [p for p in shared_params if p.requires_grad]
        self.task_params = [list(params) for params in task_params]
        self.weighting = _GramianWeighting(make_weighting(weighting, **weighting_options))
        self.aggregator = torchjd.aggregation.GramianWeightedAggregator(self.weighting)
        self.optimize_gramian_computation = optimize_gramian_computation

    def backward(self, features: Tensor, losses: Sequence[Tensor], clock: Clock | None = None) -> list[tuple]:
        """Write the update into ``.grad``; returns the (start, end) timestamps of
        ``mtl_backward`` when given a clock (``jac_to_grad`` is the post-backward part)."""
        start = clock.now() if clock else None
        mtl_backward(list(losses), features, tasks_params=self.task_params, shared_params=self.shared)
        intervals = [(start, clock.now())] if clock else []
        # TorchJD hands a weighting only the Gramian; the losses it also needs are set beside it.
        self.weighting.losses = torch.stack([loss.detach() for loss in losses])
        jac_to_grad(self.shared, self.aggregator, optimize_gramian_computation=self.optimize_gramian_computation)
        return intervals


class _GramianWeighting(torchjd.aggregation.Weighting):
    """An emtl-kernels weighting as a TorchJD ``Weighting`` of the Gramian."""

    def __init__(self, weighting: Weighting):
        super().__init__()
        self.inner = weighting
        self.losses: Tensor | None = None

    def forward(self, gramian: Tensor) -> Tensor:
        return self.inner(self.losses, gramian)
