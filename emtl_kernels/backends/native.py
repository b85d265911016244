"""The compiled backend: the C++ and CUDA kernels of csrc/, as the custom ops
``torch.ops.emtl_kernels.*`` of :data:`~emtl_kernels.backends.contract.OPS` (the extension
registers their schemas and kernels, this module their fake kernels).

On CPU it is the fast path where no GPU is present: multi-threaded, vectorised (AVX-512 or AVX2
where the CPU has it), float32 accumulation, and results that do not depend on the thread count.
On CUDA it runs the kernels of csrc/cuda when the extension was built against a CUDA torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..task_gradients import TaskGradients
from .contract import register_fakes

#: The namespace of the extension's ops.
OP_NAMESPACE = "emtl_kernels"

if _extension.LOAD_ERROR is None:
    register_fakes(OP_NAMESPACE)


class Native:
    """The extension's kernels, called through its custom ops."""

    name = "native"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (None: it can)."""
        if _extension.LOAD_ERROR is not None:
            return (
                f"the compiled extension is not built: pip install --no-build-isolation -e . ({_extension.LOAD_ERROR})"
            )
        if device.type == "cuda" and not _extension.WITH_CUDA:
            return "the extension was built without CUDA (torch had no CUDA or nvcc was not found at build time)"
        if device.type not in ("cpu", "cuda"):
            return f"it has kernels for cpu and cuda only, not {device.type}"
        return None

    def gram(self, grads: TaskGradients) -> Tensor:
        """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric."""
        return torch.ops.emtl_kernels.task_gram(grads.flat_pieces(), grads.num_tasks)

    def sq_norms(self, grads: TaskGradients) -> Tensor:
        """The squared row norms of J in float32, ``[T]``."""
        return torch.ops.emtl_kernels.task_sq_norms(grads.flat_pieces(), grads.num_tasks)

    def combine(self, grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
        """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; tasks
        whose weight is exactly zero are not read."""
        torch.ops.emtl_kernels.weighted_combine_(grads.flat_pieces(), grads.num_tasks, weights, outs, accumulate)


BACKEND = Native()
