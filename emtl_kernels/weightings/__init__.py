"""Weightings: (losses, Gram matrix) -> T task weights, computed on the device.

Each stateless method is a pure function ``<name>_weights(losses, gram, **options)`` and a small
:class:`Weighting` class holding its options; a method with state across steps (PCD, GradVac,
CR-MOGM, GradNorm, DWA, FAMO, UW, IMTL-L) is a :class:`StatefulWeighting` class holding it on
the device.
:data:`WEIGHTINGS` maps the names that ``MTLStep(weighting=...)`` accepts to the classes.
"""

from __future__ import annotations

from .aligned_mtl import AlignedMTL, aligned_mtl_weights
from .base import FunctionWeighting, GramUse, Weighting
from .cagrad import CAGrad, cagrad_weights
from .config import ConFIG, config_weights
from .cosmos import COSMOS, cosmos_weights
from .cr_mogm import CRMOGM
from .db_mtl import DBMTL, db_mtl_weights
from .dualproj import DualProj, dualproj_weights
from .dwa import DWA, dwa_weights
from .emtl import EMTL, emtl_weights, relative_contributions
from .equal import Equal, equal_weights
from .fairgrad import FairGrad, fairgrad_weights
from .famo import FAMO, famo_weights
from .gls import GLS, gls_weights
from .gradnorm import GradNorm
from .gradnorm_scaling import GradNormScaling, gradnorm_scaling_weights
from .gradvac import GradVac
from .imtl_g import IMTLG, imtl_g_weights
from .imtl_l import IMTLL, imtl_l_weights
from .krum import Krum, krum_weights
from .mgda import MGDA, mgda_weights
from .nash_mtl import NashMTL, nash_mtl_weights
from .pbi import PBI, pbi_weights
from .pcd import PCD
from .pcgrad import PCGrad, pcgrad_weights
from .rlw import RLW, rlw_weights
from .stateful import StatefulWeighting
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
    "fairgrad": FairGrad,
    "krum": Krum,
    "pcd": PCD,
    "gradvac": GradVac,
    "cr_mogm": CRMOGM,
    "gradnorm": GradNorm,
    "db_mtl": DBMTL,
    "config": ConFIG,
    # Loss-based: they read no gradients.
    "uw": UW,
    "dwa": DWA,
    "famo": FAMO,
    "gls": GLS,
    "imtl_l": IMTLL,
    "rlw": RLW,
    "stch": STCH,
    "cosmos": COSMOS,
    "pbi": PBI,
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
    "COSMOS",
    "CRMOGM",
    "DBMTL",
    "DWA",
    "EMTL",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "PBI",
    "PCD",
    "RLW",
    "STCH",
    "UW",
    "WEIGHTINGS",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "Equal",
    "FairGrad",
    "FunctionWeighting",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "GramUse",
    "Krum",
    "NashMTL",
    "PCGrad",
    "StatefulWeighting",
    "UPGrad",
    "Weighting",
    "aligned_mtl_weights",
    "cagrad_weights",
    "config_weights",
    "cosmos_weights",
    "db_mtl_weights",
    "dualproj_weights",
    "dwa_weights",
    "emtl_weights",
    "equal_weights",
    "fairgrad_weights",
    "famo_weights",
    "gls_weights",
    "gradnorm_scaling_weights",
    "imtl_g_weights",
    "imtl_l_weights",
    "krum_weights",
    "make_weighting",
    "mgda_weights",
    "nash_mtl_weights",
    "pbi_weights",
    "pcgrad_weights",
    "relative_contributions",
    "rlw_weights",
    "stch_weights",
    "upgrad_weights",
    "uw_weights",
]
