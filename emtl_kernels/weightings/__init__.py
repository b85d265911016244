"""Weightings: (losses, Gram matrix) -> T task weights, computed on the device.

Each method is a pure function ``<name>_weights(losses, gram, **options)`` and a small
:class:`Weighting` class holding its options; :data:`WEIGHTINGS` maps the names that
``MTLStep(weighting=...)`` accepts to the classes.
"""

from __future__ import annotations

from .aligned_mtl import AlignedMTL, aligned_mtl_weights
from .base import FunctionWeighting, GramUse, Weighting
from .cagrad import CAGrad, cagrad_weights
from .dualproj import DualProj, dualproj_weights
from .dwa import DWA, dwa_weights
from .emtl import EMTL, emtl_weights, relative_contributions
from .equal import Equal, equal_weights
from .famo import FAMO, famo_weights
from .gls import GLS, gls_weights
from .gradnorm_scaling import GradNormScaling, gradnorm_scaling_weights
from .imtl_g import IMTLG, imtl_g_weights
from .imtl_l import IMTLL, imtl_l_weights
from .mgda import MGDA, mgda_weights
from .nash_mtl import NashMTL, nash_mtl_weights
from .pcgrad import PCGrad, pcgrad_weights
from .rlw import RLW, rlw_weights
from .stch import STCH, stch_weights
from .upgrad import UPGrad, upgrad_weights
from .uw import UW, uw_weights

#: Weightings by the name ``MTLStep(weighting=...)`` accepts.
WEIGHTINGS: dict[str, type[Weighting]] = {
    "emtl": EMTL,
    "gradnorm_scaling": GradNormScaling,
    "equal": Equal,
    "imtl_g": IMTLG,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "nash_mtl": NashMTL,
    # Loss-based: they read no gradients.
    "uw": UW,
    "dwa": DWA,
    "famo": FAMO,
    "gls": GLS,
    "imtl_l": IMTLL,
    "rlw": RLW,
    "stch": STCH,
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
    "DWA",
    "EMTL",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "STCH",
    "UW",
    "WEIGHTINGS",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "Equal",
    "FunctionWeighting",
    "GradNormScaling",
    "GramUse",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "Weighting",
    "aligned_mtl_weights",
    "cagrad_weights",
    "dualproj_weights",
    "dwa_weights",
    "emtl_weights",
    "equal_weights",
    "famo_weights",
    "gls_weights",
    "gradnorm_scaling_weights",
    "imtl_g_weights",
    "imtl_l_weights",
    "make_weighting",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad_weights",
    "relative_contributions",
    "rlw_weights",
    "stch_weights",
    "upgrad_weights",
    "uw_weights",
]
