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

:class:`AutogramStep` is TorchJD's other route, its autogram engine: hooks on the trunk's modules
compute the Gramian of the per-task losses in one vectorised backward without forming the
Jacobian, the weights come from it, and one backward of Σ_i w_i L_i writes the update (the heads
weighted, as MTLStep's default). Its hooks act in every forward of the modules they are on, so it
runs a copy of the model of its own.

TorchJD is optional (the ``bench`` extra): import this module only where it is installed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torchjd.aggregation
from torch import Tensor, nn
from torchjd.autogram import Engine
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


class AutogramStep:
    """``forward(batch)`` on a copy of ``model`` whose trunk the autogram engine hooks, then
    ``backward(losses)``: the Gramian, ``weighting``'s weights, one backward of Σ_i w_i L_i.
    The copy's ``.grad`` are reset before each forward, as a training loop's ``zero_grad``."""

    def __init__(self, model: nn.Module, weighting: str | Weighting, **weighting_options):
        self.model = copy.deepcopy(model)
        # batch_dim=None: the losses are per task, not per sample.
        self.engine = Engine(self.model.trunk, batch_dim=None)
        self.weighting = make_weighting(weighting, **weighting_options)

    def forward(self, batch) -> tuple[Tensor, list[Tensor]]:
        self.model.zero_grad(set_to_none=True)
        return self.model(batch)

    def backward(self, losses: Sequence[Tensor]) -> None:
        stacked = torch.stack(list(losses))
        gramian = self.engine.compute_gramian(stacked)
        weights = self.weighting(stacked.detach(), gramian)
        stacked.backward(weights)


class _GramianWeighting(torchjd.aggregation.Weighting):
    """An emtl-kernels weighting as a TorchJD ``Weighting`` of the Gramian."""

    def __init__(self, weighting: Weighting):
        super().__init__()
        self.inner = weighting
        self.losses: Tensor | None = None

    def forward(self, gramian: Tensor) -> Tensor:
        return self.inner(self.losses, gramian)
