"""Weightings: (losses, Gram matrix) -> T task weights, computed on the device."""

from __future__ import annotations

from .base import GramUse, Weighting
from .emtl import EMTL, emtl_weights, relative_contributions
from .equal import Equal, equal_weights
from .gradnorm_scaling import GradNormScaling, gradnorm_scaling_weights

#: Weightings by the name ``MTLStep(weighting=...)`` accepts.
WEIGHTINGS: dict[str, type[Weighting]] = {
    "emtl": EMTL,
    "gradnorm_scaling": GradNormScaling,
    "equal": Equal,
}


def make_weighting(weighting: str | Weighting, **options) -> Weighting:
    """A :class:`Weighting` from a name in :data:`WEIGHTINGS` and its options, or the given one."""
    if isinstance(weighting, Weighting):
        if options:
            raise TypeError(f"options {sorted(options)} are for a weighting given by name, not an instance")
        return weighting
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}, or a Weighting")
    return WEIGHTINGS[weighting](**options)


__all__ = [
    "EMTL",
    "Equal",
    "GradNormScaling",
    "GramUse",
    "WEIGHTINGS",
    "Weighting",
    "emtl_weights",
    "equal_weights",
    "gradnorm_scaling_weights",
    "make_weighting",
    "relative_contributions",
]
