"""LibMTL interoperability: one line switches a LibMTL ``Trainer`` to :class:`~emtl_kernels.MTLStep`.

LibMTL (https://github.com/median-research-group/LibMTL) mixes the weighting class into the
model: ``Trainer._prepare_model`` builds ``class MTLmodel(architecture, weighting)`` and calls
``self.init_param()``; each training step then runs ``optimizer.zero_grad()``,
``w = model.backward(train_losses, **weight_args)`` (keeping ``w``, a length-T array, unless it
is None) and ``optimizer.step()``. The architecture provides ``get_share_params()``,
``zero_grad_share_params()``, ``rep_grad`` and ``task_num``. This is the convention of LibMTL
1.1.5 (``LibMTL/trainer.py``, ``LibMTL/weighting/abstract_weighting.py``, ``LibMTL/architecture/
abstract_arch.py``), the release on PyPI, which takes the weighting as a class::

    from emtl_kernels.adapters.libmtl import libmtl_weighting
    trainer = Trainer(..., weighting=libmtl_weighting("upgrad"), ...)

LibMTL's GitHub version (since March 2024) takes the weighting by name, looked up in the
``LibMTL.weighting`` module: register the class there first,
``LibMTL.weighting.UPGradStep = libmtl_weighting("upgrad")``, then ``Trainer(...,
weighting="UPGradStep", ...)``.

The class this returns needs nothing from LibMTL (it follows the protocol of ``AbsWeighting``
rather than inheriting from it): LibMTL 1.1.5 imports ``torchvision.models.utils``, gone from
torchvision since 0.13, so it often cannot be imported next to a current torch.

LibMTL's ``weight_args`` (the names of ``LibMTL/config.py``) are read: those of LibMTL's CAGrad,
MGDA, Nash_MTL and UPGrad are mapped onto the options of our weighting of the same method (see
:data:`LIBMTL_OPTIONS`); any other is refused by name, as is a value that asks for something our
weighting does not do. Options of ours go to :func:`libmtl_weighting`.

Differences from LibMTL's own weightings: none in the heads by default (they receive the
unweighted Σ_i ∇_φi L_i, as LibMTL's gradient-based weightings give them; ``head_gradients=
"weighted"`` gives them w_i ∇_φi L_i, :class:`~emtl_kernels.MTLStep`'s default); ``rep_grad=True``
(gradients with respect to the shared representation) is refused: LibMTL's architecture then
hands each head a detached copy of the representation, so the losses no longer reach the trunk
and MTLStep's features mode (``backward(losses, features=z)``, which takes the same gradients)
cannot follow them; outside a LibMTL Trainer, features mode is the rep_grad of every weighting. The weights returned
are those of the update (LibMTL's CAGrad returns the simplex weights of its dual problem instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..step import HeadGradients, Mode, MTLStep
from ..weightings import Weighting, make_weighting


@dataclass(frozen=True)
class Renamed:
    """A LibMTL option that is one of ours under another name, its value converted."""

    option: str
    convert: Callable[[object], object] = lambda value: value


@dataclass(frozen=True)
class OnlyAt:
    """A LibMTL option with no counterpart here, accepted only at the value that asks for what our
    weighting does anyway (LibMTL's default)."""

    value: object
    why: str


def _cagrad_rescale(value: object) -> object:
    rescales = {0: "none", 1: "1+c^2", 2: "1+c"}
    if isinstance(value, bool) or value not in rescales:
        raise ValueError(f"LibMTL's CAGrad takes rescale 0, 1 or 2, got {value!r}")
    return rescales[value]


#: LibMTL's ``weight_args`` by our weighting's name: how each maps onto our options.
LIBMTL_OPTIONS: dict[str, dict[str, Renamed | OnlyAt]] = {
    "cagrad": {
        "calpha": Renamed("c"),
        # LibMTL's rescale 0, 1, 2 divide the update by 1, 1 + c², 1 + c.
        "rescale": Renamed("rescale", _cagrad_rescale),
    },
    "mgda": {
        "mgda_gn": OnlyAt(
            "none",
            "LibMTL's MGDA can normalise the task gradients first ('l2', 'loss', 'loss+'); ours has no such option",
        ),
    },
    "nash_mtl": {
        # LibMTL clips the shared gradient to max_norm, 0 disabling it; here None disables it.
        "max_norm": Renamed("max_norm", lambda value: None if value == 0 else value),
        "update_weights_every": OnlyAt(1, "our Nash-MTL solves at every step"),
        "optim_niter": OnlyAt(
            20,
            "it caps the iterations of LibMTL's own solver; ours runs Newton's method to convergence "
            "(its option `iterations`)",
        ),
    },
    "upgrad": {"UPGrad_norm_eps": Renamed("norm_eps"), "UPGrad_reg_eps": Renamed("reg_eps")},
    "fairgrad": {"FairGrad_alpha": Renamed("p")},
    "gradnorm": {"alpha": Renamed("alpha")},
    "gradvac": {
        "GradVac_beta": Renamed("beta"),
        "GradVac_group_type": OnlyAt(0, "ours corrects whole-model gradients (G has no per-layer blocks)"),
    },
    "db_mtl": {
        "DB_beta": OnlyAt(
            0.0,
            "LibMTL's DB_MTL averages the task gradients over steps (default 0.9), a per-coordinate state "
            "that ours, on the Gram matrix, does not hold; ours is its DB_beta=0",
        ),
        "DB_beta_sigma": OnlyAt(0.0, "it shapes the gradient average, which ours does not hold"),
    },
}

REP_GRAD_UNSUPPORTED = (
    "rep_grad=True (task gradients with respect to the shared representation) is not supported: LibMTL's "
    "architecture then feeds each head a detached copy of the representation, cut from the graph that "
    "MTLStep's features mode walks. Use rep_grad=False here (the task gradients on the shared parameters), "
    "or, in your own loop, MTLStep's features mode, step.backward(losses, features=representation), which "
    "does what rep_grad does for every weighting"
)


def weighting_options(weighting: str | Weighting, options: dict, weight_args: dict) -> dict:
    """The options of our weighting: ``options`` with LibMTL's ``weight_args`` mapped onto them.

    Raises TypeError for a ``weight_args`` name that does not apply to the weighting, and
    ValueError for a value it cannot honour or one that contradicts ``options``.
    """
    if not weight_args:
        return options
    if not isinstance(weighting, str):
        raise TypeError(f"weight_args {sorted(weight_args)} apply to a weighting given by name, not to {weighting!r}")
    mapping = LIBMTL_OPTIONS.get(weighting, {})
    unknown = sorted(set(weight_args) - set(mapping))
    if unknown:
        known = ", ".join(mapping) or "none"
        raise TypeError(
            f"weight_args {unknown} are not LibMTL options of {weighting!r} (those mapped: {known}); "
            "give options of ours to libmtl_weighting()"
        )
    merged = dict(options)
    for name, value in weight_args.items():
        rule = mapping[name]
        if isinstance(rule, OnlyAt):
            if value != rule.value:
                raise ValueError(f"weight_args {name}={value!r} is not supported, only {rule.value!r}: {rule.why}")
            continue
        converted = rule.convert(value)
        if rule.option in options and options[rule.option] != converted:
            raise ValueError(
                f"weight_args {name}={value!r} asks for {rule.option}={converted!r}, but libmtl_weighting() "
                f"was given {rule.option}={options[rule.option]!r}"
            )
        merged[rule.option] = converted
    return merged


def libmtl_weighting(
    weighting: str | Weighting = "emtl",
    *,
    backend: str = "auto",
    mode: Mode = "speed",
    head_gradients: HeadGradients = "unweighted",
    return_weights: bool = True,
    **options,
) -> type[torch.nn.Module]:
    """A weighting class for LibMTL's ``Trainer(weighting=...)`` whose ``backward`` is an
    :class:`~emtl_kernels.MTLStep` on the model's shared parameters.

    Args:
        weighting: a name from :data:`~emtl_kernels.WEIGHTINGS` (with ``options``), or an
            instance (shared by every model made from the class).
        backend, mode: passed to :class:`~emtl_kernels.MTLStep`.
        head_gradients: passed to :class:`~emtl_kernels.MTLStep`; "unweighted" (default here) gives
            each task head its plain task gradient, as LibMTL's own gradient-based weightings do.
        return_weights: return the weights as a NumPy array, as LibMTL's weightings do (the
            Trainer records them; reading them waits for the step to finish). False returns
            None: no host sync.
        **options: options of a weighting given by name.

    The Trainer's ``weight_args`` reach ``backward``: LibMTL's names are mapped onto our options
    (:data:`LIBMTL_OPTIONS`: CAGrad's ``calpha`` and ``rescale``, Nash_MTL's ``max_norm``,
    UPGrad's ``UPGrad_norm_eps`` and ``UPGrad_reg_eps``, FairGrad's ``FairGrad_alpha``, GradNorm's
    ``alpha``, GradVac's ``GradVac_beta``, DB_MTL's ``DB_beta`` at 0), and anything else is refused
    by name.
    """
    # A step on a stand-in parameter checks the weighting, its options, the backend and the mode
    # together, so that a bad combination fails here, not at the first training step.
    MTLStep(
        [torch.zeros(1, requires_grad=True)],
        make_weighting(weighting, **options),
        backend=backend,
        mode=mode,
        head_gradients=head_gradients,
    )

    class EMTLKernelsWeighting(torch.nn.Module):
        """LibMTL weighting running :class:`~emtl_kernels.MTLStep` (see :func:`libmtl_weighting`)."""

        def init_param(self) -> None:
            self._mtl_step: MTLStep | None = None
            self._weight_args: dict | None = None

        def backward(self, losses: Tensor, **weight_args) -> object:
            if getattr(self, "rep_grad", False):
                raise ValueError(REP_GRAD_UNSUPPORTED)
            if not hasattr(self, "get_share_params"):
                raise TypeError(
                    "this weighting is mixed into a LibMTL model by Trainer(weighting=...); "
                    "the model must provide get_share_params()"
                )
            step = getattr(self, "_mtl_step", None)
            # LibMTL's weightings read weight_args at every call: a change takes effect at once.
            if step is None or weight_args != self._weight_args:
                share_params = self.get_share_params  # LibMTL's model method, mixed in beside this class
                step = self._mtl_step = MTLStep(
                    list(share_params()),  # type: ignore[operator]
                    make_weighting(weighting, **weighting_options(weighting, options, weight_args)),
                    backend=backend,
                    mode=mode,
                    head_gradients=head_gradients,
                )
                self._weight_args = dict(weight_args)
            weights = step.backward(losses)
            return weights.detach().cpu().numpy() if return_weights else None

    EMTLKernelsWeighting.__qualname__ = EMTLKernelsWeighting.__name__
    return EMTLKernelsWeighting
