"""IMTL-L: the loss-balancing half of impartial multi-task learning (Liu et al., ICLR 2021).

Each task has a learnable scale s_i; the objective is J = Σ_i (e^{s_i} L_i − s_i), TorchJD's
``scalarization.IMTLL`` (its −s_i keeps s_i from −∞; it is 2·UW at −s). Our weights are
∂J/∂L_i = e^{s_i}, so Σ_i w_i ∇L_i is the gradient of their scalarised loss on the model, and
``after_backward`` adds ∂J/∂s_i = w_i L_i − 1 to ``s.grad`` (see :mod:`._learned_scales`).
LibMTL's ``IMTL`` scales the losses by e^{s_i} the same way, then applies the gradient half
(IMTL-G, :mod:`.imtl_g`) to the scaled losses' gradients.
"""

from __future__ import annotations

from torch import Tensor

from ._learned_scales import LearnedLossScales, scaled_weights


def imtl_l_weights(losses: Tensor, gram: Tensor, *, log_scales: Tensor | None = None) -> Tensor:
    """IMTL-L weights e^{s_i} ``[T]`` for the scales ``log_scales`` (s = 0 when None); G unread."""
    return scaled_weights(losses, gram, log_scales, 1.0, 1.0)


class IMTLL(LearnedLossScales):
    """IMTL-L with learnable scales :attr:`scales` (the loss L_i is weighed by e^{s_i}).

    Args:
        num_tasks: T, to make the scales now; None makes them at the first call (a lazy
            ``nn.Parameter`` that an optimiser may already hold).
        init: the scales' start value (0 in TorchJD and LibMTL).

    Train them with the model: ``torch.optim.Adam([*model.parameters(), *imtl_l.parameters()])``.
    """

    sign = 1.0
    factor = 1.0
    function = staticmethod(imtl_l_weights)
