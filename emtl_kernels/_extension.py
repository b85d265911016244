"""The compiled extension ``emtl_kernels._C`` (csrc/), when it is built.

Importing it registers the custom ops ``torch.ops.emtl_kernels.*`` with their CPU (and, in a
CUDA build, CUDA) kernels: the ops of :data:`emtl_kernels.backends.contract.OPS`, whose fake
kernels (for ``torch.compile`` and ``torch.library.opcheck``) the native backend registers.
"""

from __future__ import annotations

import importlib.util

import torch  # noqa: F401  (libtorch must be loaded before _C, which links against it)


def _load():
    """(the module, None) or (None, why it cannot be loaded)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, f"{__package__}._C is not built"
    try:
        from . import _C
    except (ImportError, OSError) as error:  # e.g. built against another torch
        return None, f"{__package__}._C failed to load: {error}"
    return _C, None


#: The compiled module, and why it is missing (None when it is loaded).
_C, LOAD_ERROR = _load()

#: Whether the extension was built with its CUDA kernels.
WITH_CUDA = bool(_C is not None and _C.with_cuda)
#: The instruction set of the CPU kernels picked on this machine ("avx512", "avx2" or "baseline";
#: EMTL_CPU_ISA=avx2 or =baseline caps it).
CPU_ISA = _C.cpu_isa if _C is not None else None
