"""UW: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv 1705.07115).

Each task has a learnable log-variance s_i = log σ_i²; the objective is
J = Σ_i ½ (e^{−s_i} L_i + s_i), TorchJD's ``scalarization.UW`` and LibMTL's ``UW`` alike. Our
weights are ∂J/∂L_i = ½ e^{−s_i}, so Σ_i w_i ∇L_i is the gradient of their scalarised loss on the
model, and ``after_backward`` adds ∂J/∂s_i = ½ − w_i L_i to ``s.grad`` (see
:mod:`._learned_scales`). LibMTL starts from s = −0.5, TorchJD from s = 0 (``init``).
"""

from __future__ import annotations

from torch import Tensor

from ._learned_scales import LearnedLossScales, scaled_weights


def uw_weights(losses: Tensor, gram: Tensor, *, log_vars: Tensor | None = None) -> Tensor:
    """UW weights ½ e^{−s_i} ``[T]`` for the log-variances ``log_vars`` (s = 0 when None); G unread."""
    return scaled_weights(losses, gram, log_vars, -1.0, 0.5)


class UW(LearnedLossScales):
    """Uncertainty weighting with learnable log-variances :attr:`scales` (s_i = log σ_i²).

    Args:
        num_tasks: T, to make the log-variances now; None makes them at the first call (a lazy
            ``nn.Parameter`` that an optimiser may already hold).
        init: the log-variances' start value (TorchJD: 0; LibMTL: −0.5).

    Train them with the model: ``torch.optim.Adam([*model.parameters(), *uw.parameters()])``.
    """

    sign = -1.0
    factor = 0.5
    function = staticmethod(uw_weights)
