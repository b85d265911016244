"""Features mode: the task gradients taken on the trunk's outputs instead of its parameters.

With z the features (the tensors the heads read), task i's gradient on the shared parameters is
g_i = (∂z/∂θ)ᵀ ∂L_i/∂z. Features mode takes the T gradients ∂L_i/∂z only, by T backward passes
through the heads, forms their Gram matrix G_z over the flattened ``[T, numel(z)]`` rows, derives
the weights from (L, G_z), and runs one backward of the trunk with the cotangent Σ_i w_i ∂L_i/∂z,
which is exactly the gradient of Σ_i w_i L_i on the shared parameters. It is MGDA-UB (Sener &
Koltun 2018) and LibMTL's ``rep_grad``, for every weighting: about one backward in all, T·numel(z)
extra memory. G_z approximates G: the weights differ from those of the exact step, the update is
exact for the weights it uses.

The graph is checked before anything runs (host-side walks, no device work): the features must
depend on the shared parameters, none may be computed from another (the passes through the heads
take total derivatives, which would then count a path twice), and no loss may reach the shared
parameters other than through the features, else the trunk's backward would miss part of its
gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .autograd_graph import depends_on, graph_leaves
from .ops import weighted_combine
from .task_gradients import SUPPORTED_DTYPES, TaskGradients


def checked_features(features: Tensor | Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """``features`` as a list of tensors, each computed (with a graph) on ``device``, once."""
    feature_list = [features] if isinstance(features, Tensor) else list(features)
    if not feature_list:
        raise ValueError("features is empty: give the tensors the task heads read")
    seen: set[int] = set()
    for k, feature in enumerate(feature_list):
        if not isinstance(feature, Tensor):
            raise TypeError(f"features[{k}] is a {type(feature).__name__}, not a tensor")
        if not feature.is_floating_point():
            raise TypeError(f"features[{k}] has dtype {feature.dtype}: features must be floating point")
        if feature.grad_fn is None:
            raise ValueError(
                f"features[{k}] has no autograd graph (a leaf, or computed without grad): features are "
                "the outputs of the trunk, computed from the shared parameters"
            )
        if feature.device != device:
            raise ValueError(f"features[{k}] is on {feature.device}, the shared parameters on {device}")
        if id(feature) in seen:
            raise ValueError(f"features[{k}] appears twice")
        seen.add(id(feature))
    return feature_list


def split_at_features(
    losses: Sequence[Tensor], features: Sequence[Tensor], shared_ids: set[int]
) -> tuple[list[Tensor], list[Tensor]]:
    """The leaves the losses reach above the features (the heads), and the leaves below them
    other than the shared parameters (parameters of the trunk not declared shared: they get the
    gradient of Σ_i w_i L_i with the shared ones).

    Raises where a feature is computed from another, where the features depend on no shared
    parameter, or where a loss reaches a shared parameter other than through the features
    (naming the loss).
    """
    for k, feature in enumerate(features):
        # The passes through the heads take total derivatives: one feature computed from another
        # would carry the other's part of the gradient twice into the trunk's backward.
        if len(features) > 1 and depends_on(feature, [other for other in features if other is not feature]):
            raise ValueError(
                f"features[{k}] is computed from another feature: give features none of which depends on another"
            )
    below = graph_leaves(features)
    if not any(id(leaf) in shared_ids for leaf in below):
        raise ValueError("the features do not depend on any of the shared parameters")
    heads: dict[int, Tensor] = {}
    for i, loss in enumerate(losses):
        for leaf in graph_leaves([loss], stop_at=features):
            if id(leaf) in shared_ids:
                raise ValueError(
                    f"loss {i} reaches the shared parameter of shape {tuple(leaf.shape)} other than through "
                    "the features: give every tensor the heads read from the trunk as a feature"
                )
            heads.setdefault(id(leaf), leaf)
    return list(heads.values()), [leaf for leaf in below if id(leaf) not in shared_ids]


def check_every_feature_reached(per_task: Sequence[Sequence[Tensor | None]], num_features: int) -> None:
    """Raise where no loss reaches a feature (``per_task[i][k]`` is None for every task i)."""
    for k in range(num_features):
        if all(grads[k] is None for grads in per_task):
            raise ValueError(f"no loss reaches features[{k}]: give only the tensors the task heads read")


def feature_jacobian(per_task: Sequence[Sequence[Tensor | None]], features: Sequence[Tensor]) -> TaskGradients:
    """J_z: row i holds ∂L_i/∂z on every feature (zeros where loss i does not reach one), in the
    features' dtype, or float32 where they have several or one the kernels do not store."""
    dtypes = {feature.dtype for feature in features}
    dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(SUPPORTED_DTYPES) else torch.float32
    rows = [
        [
            torch.zeros_like(feature, dtype=dtype) if grad is None else grad.to(dtype)
            for grad, feature in zip(grads[: len(features)], features, strict=True)
        ]
        for grads in per_task
    ]
    return TaskGradients(rows)


def weighted_cotangents(
    jacobian: TaskGradients, weights: Tensor, features: Sequence[Tensor], backend: str
) -> list[Tensor]:
    """Σ_i w_i ∂L_i/∂z on each feature, by the fused combine pass, shaped and typed as the feature."""
    combined = weighted_combine(jacobian, weights, backend=backend)
    return [piece.view_as(feature).to(feature.dtype) for piece, feature in zip(combined, features, strict=True)]
