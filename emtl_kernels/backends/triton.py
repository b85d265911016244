"""The Triton backend: the fused Gram/norm pass and the fused combination, one launch each over
every piece of J (GPU; on a CPU only through Triton's interpreter, for tests).

Under torch.compile each pass is a ``torch.library`` custom op, one opaque node of the graph (the
launch code reads tensor addresses, which a tracer cannot follow). Eagerly the passes are called
directly: a custom op's Python dispatch visits every one of the T×K pieces, which for a model of
a few hundred shared tensors cost milliseconds per call. Triton itself is imported on the first
launch, in :mod:`emtl_kernels.triton_kernels.passes`: importing this module costs nothing.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ..task_gradients import TaskGradients

NAME = "triton"

_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    # Triton reads this variable when it is first imported; the tests set it before that.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device) -> str | None:
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


def gram(grads: TaskGradients) -> Tensor:
    """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric; one read of J per 8 tasks."""
    if torch.compiler.is_compiling():
        return _reduce(grads.flat_pieces(), grads.num_tasks, False)
    return _passes().gram(grads)


def sq_norms(grads: TaskGradients) -> Tensor:
    """The squared row norms of J in float32, ``[T]``; one read of J per 32 tasks."""
    if torch.compiler.is_compiling():
        return _reduce(grads.flat_pieces(), grads.num_tasks, True)
    return _passes().sq_norms(grads)


def combine(grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; rows
    whose weight is exactly zero contribute nothing, even where they hold non-finite values."""
    if torch.compiler.is_compiling():
        _combine(grads.flat_pieces(), grads.num_tasks, weights, outs, accumulate)
    else:
        _passes().combine(grads, weights, outs, accumulate)


def _passes():
    return importlib.import_module("emtl_kernels.triton_kernels.passes")


@torch.library.custom_op("emtl_triton::reduce", mutates_args=())
def _reduce(pieces: list[Tensor], num_tasks: int, norms_only: bool) -> Tensor:
    grads = TaskGradients.from_checked_pieces(pieces, num_tasks)
    return _passes().sq_norms(grads) if norms_only else _passes().gram(grads)


@_reduce.register_fake
def _(pieces: list[Tensor], num_tasks: int, norms_only: bool) -> Tensor:
    shape = (num_tasks,) if norms_only else (num_tasks, num_tasks)
    return pieces[0].new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("emtl_triton::combine", mutates_args=("outs",))
def _combine(pieces: list[Tensor], num_tasks: int, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    _passes().combine(TaskGradients.from_checked_pieces(pieces, num_tasks), weights, outs, accumulate)


@_combine.register_fake
def _(pieces: list[Tensor], num_tasks: int, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    return None
