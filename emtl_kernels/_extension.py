"""The compiled extension ``emtl_kernels._C`` (csrc/), when it is built.

Importing it registers the custom ops ``torch.ops.emtl_kernels.*`` with their CPU (and, in a
CUDA build, CUDA) kernels. This module adds their fake implementations, which give the shape
and dtype of the results without computing them, so the ops trace under ``torch.compile``
(``fullgraph=True``) and pass ``torch.library.opcheck``.

The pieces of J go to the ops as one flat task-major list (``pieces[i*K + k]`` is task i's
gradient on shared tensor k) with ``num_tasks``:

- ``task_gram(Tensor[] pieces, int num_tasks) -> Tensor``: ``[T, T]`` float32.
- ``task_sq_norms(Tensor[] pieces, int num_tasks) -> Tensor``: ``[T]`` float32.
- ``weighted_combine_(Tensor[] pieces, int num_tasks, Tensor weights, Tensor(a!)[] outs,
  bool accumulate) -> ()``: writes (or adds) Σ_i weights[i]·pieces[i*K + k] into ``outs[k]``.
"""

from __future__ import annotations

import importlib.util

import torch


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
#: The instruction set of the CPU kernels picked on this machine ("avx2" or "baseline").
CPU_ISA = _C.cpu_isa if _C is not None else None


def _num_tensors(pieces, num_tasks: int) -> int:
    if num_tasks < 1 or not pieces or len(pieces) % num_tasks:
        raise RuntimeError(f"got {len(pieces)} pieces for {num_tasks} tasks; expected num_tasks * K of them")
    return len(pieces) // num_tasks


if _C is not None:

    @torch.library.register_fake("emtl_kernels::task_gram")
    def _task_gram_fake(pieces, num_tasks):
        _num_tensors(pieces, num_tasks)
        return pieces[0].new_empty((num_tasks, num_tasks), dtype=torch.float32)

    @torch.library.register_fake("emtl_kernels::task_sq_norms")
    def _task_sq_norms_fake(pieces, num_tasks):
        _num_tensors(pieces, num_tasks)
        return pieces[0].new_empty((num_tasks,), dtype=torch.float32)

    @torch.library.register_fake("emtl_kernels::weighted_combine_")
    def _weighted_combine_fake(pieces, num_tasks, weights, outs, accumulate):
        if len(outs) != _num_tensors(pieces, num_tasks):
            raise RuntimeError(f"got {len(outs)} outputs for {len(pieces) // num_tasks} shared tensors")
