"""The compiled backend: the C++ and CUDA kernels of csrc/, as the custom ops
``torch.ops.emtl_kernels.*`` (see :mod:`emtl_kernels._extension`).

On CPU it is the fast path where no GPU is present: multi-threaded, vectorised (AVX2 where the
CPU has it), float32 accumulation, and results that do not depend on the thread count. On CUDA
it runs the kernels of csrc/cuda when the extension was built against a CUDA torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..task_gradients import TaskGradients

NAME = "native"


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` (None: it can)."""
    if _extension.LOAD_ERROR is not None:
        return f"the compiled extension is not built: pip install --no-build-isolation -e . ({_extension.LOAD_ERROR})"
    if device.type == "cuda" and not _extension.WITH_CUDA:
        return "the extension was built without CUDA (torch had no CUDA or nvcc was not found at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"it has kernels for cpu and cuda only, not {device.type}"
    return None


def gram(grads: TaskGradients) -> Tensor:
    """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric."""
    return torch.ops.emtl_kernels.task_gram(grads.flat_pieces(), grads.num_tasks)


def sq_norms(grads: TaskGradients) -> Tensor:
    """The squared row norms of J in float32, ``[T]``."""
    return torch.ops.emtl_kernels.task_sq_norms(grads.flat_pieces(), grads.num_tasks)


def combine(grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; tasks
    whose weight is exactly zero are not read."""
    torch.ops.emtl_kernels.weighted_combine_(grads.flat_pieces(), grads.num_tasks, weights, outs, accumulate)
