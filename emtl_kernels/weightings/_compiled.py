"""The compiled CPU solves of the weightings: the custom ops ``torch.ops.emtl_solvers.*``.

The extension (csrc/solvers/, csrc/cpu/solver_ops.cpp) registers their schemas and CPU kernels;
this module registers their fake kernels, so that ``torch.compile`` traces a weighting that calls
one as a single opaque node. Each solves in float64 whatever the dtype of G, by the exact methods
that csrc/README.md states, and returns the weights in :func:`~.base.compute_dtype` of the losses
(the preferences' dtype for the dual-cone projection). A weighting calls them where
:func:`runs_compiled` says so, and its tensor-op solver elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _extension
from .base import compute_dtype

#: The namespace of the solver ops (schemas in csrc/registration.cpp).
NAMESPACE = "emtl_solvers"


def runs_compiled(gram: Tensor) -> bool:
    """Whether a weighting on ``gram`` runs the compiled solve: on a CPU tensor, when the
    extension is built. A property of the device, never of the values."""
    return gram.device.type == "cpu" and _extension.LOAD_ERROR is None


def _fake_weights(losses: Tensor, gram: Tensor, *options) -> Tensor:
    return losses.new_empty((losses.numel(),), dtype=compute_dtype(losses))


def _fake_projection(gram: Tensor, preferences: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    return torch.empty_like(preferences)


def _fake_gradvac(losses: Tensor, gram: Tensor, order_keys: Tensor, targets: Tensor, beta: float, eps: float):
    return _fake_weights(losses, gram), torch.empty_like(targets)


#: The solver ops' fake kernels, by name.
FAKES: dict[str, Callable[..., object]] = {
    "project_onto_dual_cone": _fake_projection,
    "mgda_weights": _fake_weights,
    "cagrad_weights": _fake_weights,
    "nash_mtl_weights": _fake_weights,
    "fairgrad_weights": _fake_weights,
    "pcd_weights": _fake_weights,
    "imtl_g_weights": _fake_weights,
    "config_weights": _fake_weights,
    "aligned_mtl_weights": _fake_weights,
    "pcgrad_weights": _fake_weights,
    "gradvac_weights": _fake_gradvac,
}

if _extension.LOAD_ERROR is None:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake)


def ops():
    """``torch.ops.emtl_solvers`` (only where the extension is built)."""
    return getattr(torch.ops, NAMESPACE)
