"""LibMTL interoperability: one line switches a LibMTL ``Trainer`` to :class:`~emtl_kernels.MTLStep`.

LibMTL (https://github.com/median-research-group/LibMTL) takes the weighting as a class and mixes
it into the model: ``Trainer._prepare_model`` builds ``class MTLmodel(architecture, weighting)``
and calls ``self.init_param()``; each training step then runs ``optimizer.zero_grad()``,
``w = model.backward(train_losses, **weight_args)`` (keeping ``w``, a length-T array, unless it
is None) and ``optimizer.step()``. The architecture provides ``get_share_params()``,
``zero_grad_share_params()``, ``rep_grad`` and ``task_num``. This is the convention of LibMTL
1.1.5 (``LibMTL/trainer.py``, ``LibMTL/weighting/abstract_weighting.py``, ``LibMTL/architecture/
abstract_arch.py``), the release on PyPI.

So::

    from emtl_kernels.adapters.libmtl import libmtl_weighting
    trainer = Trainer(..., weighting=libmtl_weighting("upgrad"), ...)

The class this returns needs nothing from LibMTL (it follows the protocol of ``AbsWeighting``
rather than inheriting from it): LibMTL 1.1.5 imports ``torchvision.models.utils``, gone from
torchvision since 0.13, so it often cannot be imported next to a current torch.

Differences from LibMTL's own weightings: the task heads receive w_i ∇_φi L_i (LibMTL's gradient-
based weightings give them the unweighted Σ_i ∇_φi L_i); ``rep_grad=True`` (gradients with respect
to the shared representation) is not supported; ``weight_args`` are not read (options are given
to :func:`libmtl_weighting`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..step import Mode, MTLStep
from ..weightings import Weighting, make_weighting


def libmtl_weighting(
    weighting: str | Weighting = "emtl",
    *,
    backend: str = "auto",
    mode: Mode = "speed",
    return_weights: bool = True,
    **options,
) -> type[torch.nn.Module]:
    """A weighting class for LibMTL's ``Trainer(weighting=...)`` whose ``backward`` is an
    :class:`~emtl_kernels.MTLStep` on the model's shared parameters.

    Args:
        weighting: a name from :data:`~emtl_kernels.WEIGHTINGS` (with ``options``), or an
            instance (shared by every model made from the class).
        backend, mode: passed to :class:`~emtl_kernels.MTLStep`.
        return_weights: return the weights as a NumPy array, as LibMTL's weightings do (the
            Trainer records them; reading them waits for the step to finish). False returns
            None: no host sync.
        **options: options of a weighting given by name.
    """
    # A step on a stand-in parameter checks the weighting, its options, the backend and the mode
    # together, so that a bad combination fails here, not at the first training step.
    MTLStep([torch.zeros(1, requires_grad=True)], make_weighting(weighting, **options), backend=backend, mode=mode)

    class EMTLKernelsWeighting(torch.nn.Module):
        """LibMTL weighting running :class:`~emtl_kernels.MTLStep` (see :func:`libmtl_weighting`)."""

        def init_param(self) -> None:
            self._mtl_step: MTLStep | None = None

        def backward(self, losses: Tensor, **weight_args) -> object:
            if getattr(self, "rep_grad", False):
                raise ValueError("emtl-kernels weightings work on the shared parameters: use rep_grad=False")
            if not hasattr(self, "get_share_params"):
                raise TypeError(
                    "this weighting is mixed into a LibMTL model by Trainer(weighting=...); "
                    "the model must provide get_share_params()"
                )
            step = getattr(self, "_mtl_step", None)
            if step is None:
                share_params = self.get_share_params  # LibMTL's model method, mixed in beside this class
                step = self._mtl_step = MTLStep(
                    list(share_params()),  # type: ignore[operator]
                    make_weighting(weighting, **options),
                    backend=backend,
                    mode=mode,
                )
            weights = step.backward(losses)
            return weights.detach().cpu().numpy() if return_weights else None

    EMTLKernelsWeighting.__qualname__ = EMTLKernelsWeighting.__name__
    return EMTLKernelsWeighting
