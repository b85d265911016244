"""The compiled extension ``emtl_kernels._C`` (csrc/), when it is built.

Importing it registers the custom ops ``torch.ops.emtl_kernels.*`` with their CPU (and, in a
CUDA build, CUDA) kernels: the ops of :data:`emtl_kernels.backends.contract.OPS`, whose fake
kernels (for ``torch.compile`` and ``torch.library.opcheck``) the native backend registers.
"""

from __future__ import annotations

import importlib.util

import torch  # libtorch must be loaded before _C, which links against it


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
#: The widest instruction set the CPU kernels run on here ("avx512", "avx2" or "baseline"):
#: the CPU's widest, capped by EMTL_CPU_ISA. A pass may run on a narrower one
#: (:func:`cpu_pass_isa`).
CPU_ISA = _C.cpu_isa if _C is not None else None


def cpu_pass_isa(kernel_pass: str, dtype: torch.dtype, num_tasks: int) -> str:
    """The instruction set the CPU kernels of ``kernel_pass`` ("gram", "sq_norms" or "combine")
    run on for a J of ``dtype`` with ``num_tasks`` rows: :data:`CPU_ISA`, or a narrower variant
    where the extension's per-pass table measured it faster on this CPU (the table is set aside
    where EMTL_CPU_ISA names a variant, which then runs every pass)."""
    if _C is None:
        raise RuntimeError(f"the native extension is not loaded: {LOAD_ERROR}")
    return _C.cpu_pass_isa(kernel_pass, str(dtype).removeprefix("torch."), num_tasks)
