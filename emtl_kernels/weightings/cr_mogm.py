"""CR-MOGM: a moving average of another weighting's weights (Zhou et al., "On the Convergence of
Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022).

With λ̂_k the wrapped weighting's weights at step k, the weights used are

    λ_k = α λ_{k−1} + (1 − α) λ̂_k,   λ_0 = ``initial_weights``, or λ̂_1 when not given,

which makes the stochastic weights of MGDA-like methods converge (the paper's Corollary 1 lets α
grow toward 1 as the learning rate decays: set :attr:`CRMOGM.alpha` between steps). As TorchJD's
``CRMOGMWeighting``, which this matches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting, check_number
from .stateful import StatefulWeighting, continued_state, finite_inputs
from .task_orders import SeededGenerators


class CRMOGM(StatefulWeighting):
    """CR-MOGM around a weighting, as a :class:`~emtl_kernels.weightings.Weighting`.

    Args:
        weighting: the weighting whose weights are averaged: a name of
            :data:`~emtl_kernels.weightings.WEIGHTINGS` (with ``options``) or an instance
            (default "upgrad"; TorchJD has no default).
        alpha: in [0, 1], the weight of the previous average (TorchJD's default, 0.9); 0 gives
            the wrapped weights unchanged, 1 freezes λ_0.
        initial_weights: ``[T]`` λ_0, or None to start from the first wrapped weights.
        **options: options of a weighting given by name.

    State: λ_{k−1} (``smoothed``) and whether it is set (``started``), on the device. :meth:`reset`
    clears them and resets the wrapped weighting when it is stateful. The inputs are checked once,
    by the wrapped weighting.
    """

    def __init__(
        self,
        weighting: str | Weighting = "upgrad",
        alpha: float = 0.9,
        initial_weights: Tensor | None = None,
        **options,
    ):
        # The registry imports this module: look it up when a CR-MOGM is made.
        from . import make_weighting

        self.weighting = make_weighting(weighting, **options)
        self.alpha = alpha
        if initial_weights is not None and initial_weights.dim() != 1:
            raise ValueError(f"initial_weights must be a [T] tensor, got shape {tuple(initial_weights.shape)}")
        self.initial_weights = initial_weights
        self.gram_use = self.weighting.gram_use
        self.reads_losses = self.weighting.reads_losses
        self.reads_gram = self.weighting.reads_gram
        self.contribution_eps = self.weighting.contribution_eps
        #: ``[T]`` λ_{k−1}, or None before the first call.
        self.smoothed: Tensor | None = None
        #: 0-dim bool: whether ``smoothed`` holds an average yet (False until a usable step).
        self.started: Tensor | None = None

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        check_number("alpha", value)
        if value > 1:
            raise ValueError(f"alpha must be in [0, 1], got {value!r}")
        self._alpha = value

    def random_source(self) -> SeededGenerators | None:
        return self.weighting.random_source()

    def reset(self) -> None:
        self.smoothed = None
        self.started = None
        if isinstance(self.weighting, StatefulWeighting):
            self.weighting.reset()

    def __call__(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self.weights(losses, gram)

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        current = self.weighting(losses, gram)
        self.smoothed, fresh = continued_state(self.smoothed, tuple(current.shape), current.dtype, current.device)
        self.started, _ = continued_state(None if fresh else self.started, (), torch.bool, current.device)
        start = current if self.initial_weights is None else _initial(self.initial_weights, current)
        previous = torch.where(self.started, self.smoothed, start)
        smoothed = self.alpha * previous + (1 - self.alpha) * current
        # A skipped step (non-finite inputs or weights) neither moves the average nor starts it.
        usable = finite_inputs(losses, gram) & torch.isfinite(current).all()
        self.smoothed.copy_(torch.where(usable, smoothed, self.smoothed))
        self.started.copy_(self.started | usable)
        return smoothed

    def __repr__(self) -> str:
        return f"CRMOGM({self.weighting!r}, alpha={self.alpha})"


def _initial(initial_weights: Tensor, current: Tensor) -> Tensor:
    if initial_weights.shape != current.shape:
        raise ValueError(
            f"initial_weights has shape {tuple(initial_weights.shape)}, the weights {tuple(current.shape)}"
        )
    return initial_weights.to(dtype=current.dtype, device=current.device)
