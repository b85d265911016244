"""The Triton backend: the fused Gram/norm pass and the fused combination, one launch each over
every piece of J (GPU; on a CPU only through Triton's interpreter, for tests).

Under torch.compile each pass is a custom op of :data:`~emtl_kernels.backends.contract.OPS`,
``torch.ops.emtl_triton.*``, one opaque node of the graph (the launch code reads tensor
addresses, which a tracer cannot follow). Eagerly the passes are called directly: a custom op's
Python dispatch visits every one of the T×K pieces, which for a model of a few hundred shared
tensors cost milliseconds per call. Triton itself is imported on the first
launch, in :mod:`emtl_kernels.triton_kernels.passes`: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch
from torch import Tensor

from ..task_gradients import TaskGradients
from .contract import define_ops

#: The namespace of this backend's custom ops.
OP_NAMESPACE = "emtl_triton"

_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    # Triton reads this variable when it is first imported; the tests set it before that.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class Triton:
    """The Triton passes: called directly when eager, through this backend's custom ops when
    torch.compile traces them."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why the Triton kernels cannot run on ``device`` here (None: they can)."""
        if not _TRITON_FOUND:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            if _interpreting():
                return "TRITON_INTERPRET=1 runs kernels on the host, which cannot read CUDA memory"
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if torch.version.hip is not None:
                return "the kernels are written and checked for NVIDIA GPUs, not ROCm"
            if torch.cuda.get_device_capability(device) < (8, 0):
                # bfloat16 loads and conversions, as the kernels issue them, need Ampere.
                return "the kernels need an NVIDIA GPU of compute capability 8.0 (Ampere) or newer"
            return None
        if device.type == "cpu":
            if _interpreting():
                return None
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1 before importing triton)"
        return f"Triton kernels here target CUDA devices, not {device.type}"

    def gram(self, grads: TaskGradients) -> Tensor:
        """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric; one read of J per 8 tasks."""
        if torch.compiler.is_compiling():
            return torch.ops.emtl_triton.task_gram(grads.flat_pieces(), grads.num_tasks)
        return _passes().gram(grads)

    def sq_norms(self, grads: TaskGradients) -> Tensor:
        """The squared row norms of J in float32, ``[T]``; one read of J per 32 tasks."""
        if torch.compiler.is_compiling():
            return torch.ops.emtl_triton.task_sq_norms(grads.flat_pieces(), grads.num_tasks)
        return _passes().sq_norms(grads)

    def combine(self, grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
        """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; rows
        whose weight is exactly zero contribute nothing, even where they hold non-finite values."""
        if torch.compiler.is_compiling():
            torch.ops.emtl_triton.weighted_combine_(grads.flat_pieces(), grads.num_tasks, weights, outs, accumulate)
        else:
            _passes().combine(grads, weights, outs, accumulate)


BACKEND = Triton()


@functools.cache
def _passes():
    return importlib.import_module("emtl_kernels.triton_kernels.passes")


def _task_gram(pieces: list[Tensor], num_tasks: int) -> Tensor:
    return _passes().gram(TaskGradients.from_checked_pieces(pieces, num_tasks))


def _task_sq_norms(pieces: list[Tensor], num_tasks: int) -> Tensor:
    return _passes().sq_norms(TaskGradients.from_checked_pieces(pieces, num_tasks))


def _weighted_combine_(
    pieces: list[Tensor], num_tasks: int, weights: Tensor, outs: list[Tensor], accumulate: bool
) -> None:
    _passes().combine(TaskGradients.from_checked_pieces(pieces, num_tasks), weights, outs, accumulate)


define_ops(
    OP_NAMESPACE,
    {"task_gram": _task_gram, "task_sq_norms": _task_sq_norms, "weighted_combine_": _weighted_combine_},
)
