"""Which backends of emtl-kernels a run measures on a device: discovered, never listed here.

A backend is measured on a device type when it can run there and the registry lists it as a fast
choice for that type (``emtl_kernels.backends.AUTO_ORDER``): Triton on a CPU runs only in its
interpreter, which is correct and never fast, so it is left out there with that reason.
"""

from __future__ import annotations

import torch

from emtl_kernels import backends


def measured_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends to measure on ``device``, and for each known one left out, why."""
    fast_on = dict(backends.AUTO_ORDER)
    measured, left_out = [], {}
    for name in backends.backend_names():
        reason = backends.unavailable_reason(name, device)
        if reason is None and device.type not in fast_on.get(name, ()):
            reason = f"it is not a fast choice on {device.type} (the registry's AUTO_ORDER)"
        if reason is None:
            measured.append(name)
        else:
            left_out[name] = reason
    return measured, left_out
