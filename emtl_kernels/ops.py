"""The three ops of a multi-task step, behind one interface for every backend.

- :func:`task_gram`: G = J Jᵀ, all T(T+1)/2 dot products of the task gradients in one pass.
- :func:`task_sq_norms`: the diagonal of G alone, ‖g_i‖².
- :func:`weighted_combine`: g = Jᵀw, written straight into its destination.

Each takes the task gradients as a ``[T, P]`` tensor or a :class:`TaskGradients`, and a keyword
``backend``: "auto" (default) or a backend name from :func:`emtl_kernels.available_backends`.
Reductions accumulate in float32 whatever the storage dtype. Checks here look only at shapes,
dtypes and devices, never at values, so no op waits on the device.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from .task_gradients import TaskGradients

GradsLike = Tensor | TaskGradients

_DTYPE_OF = operator.attrgetter("dtype")
_DEVICE_OF = operator.attrgetter("device")


def as_task_gradients(grads: GradsLike) -> TaskGradients:
    """``grads`` as a :class:`TaskGradients` (a ``[T, P]`` tensor is wrapped without a copy)."""
    if isinstance(grads, TaskGradients):
        return grads
    if isinstance(grads, Tensor):
        return TaskGradients.from_matrix(grads)
    raise TypeError(f"task gradients must be a [T, P] tensor or TaskGradients, got {type(grads).__name__}")


def task_gram(grads: GradsLike, *, backend: str = "auto") -> Tensor:
    """The Gram matrix G = J Jᵀ of the task gradients: ``[T, T]`` float32, symmetric, with the
    squared norms on its diagonal. A non-finite value anywhere in J makes its row's diagonal entry
    non-finite (inf or NaN), so ``torch.isfinite(G.diagonal())`` checks all of J at O(T) cost."""
    grads = as_task_gradients(grads)
    return backends.resolve(backend, grads.device).gram(grads)


def task_sq_norms(grads: GradsLike, *, backend: str = "auto") -> Tensor:
    """The squared norms ‖g_i‖² of the task gradients: ``[T]`` float32."""
    grads = as_task_gradients(grads)
    return backends.resolve(backend, grads.device).sq_norms(grads)


def weighted_combine(
    grads: GradsLike,
    weights: Tensor,
    *,
    out: Tensor | Sequence[Tensor] | None = None,
    accumulate: bool = False,
    backend: str = "auto",
) -> Tensor | list[Tensor]:
    """The weighted combination g = Jᵀw = Σ_i w_i g_i, accumulated in float32.

    Args:
        grads: a ``[T, P]`` tensor or a :class:`TaskGradients` with K shared tensors.
        weights: ``[T]`` floating tensor on the gradients' device. A task whose weight is exactly
            zero contributes nothing, even where its gradient holds inf or NaN.
        out: destination in the gradients' dtype and device. For a ``[T, P]`` input a tensor of P
            elements; for :class:`TaskGradients` a sequence of K tensors, tensor k holding
            ``sizes[k]`` elements in any shape (a parameter's ``.grad``, say). Allocated when None.
        accumulate: add g to what ``out`` holds (as ``loss.backward()`` adds to ``.grad``)
            instead of overwriting it; the sum is formed in float32 and rounded once.
        backend: "auto" or a backend name.

    Returns:
        ``out``: a ``[P]`` tensor for a ``[T, P]`` input, else the list of K destinations.
    """
    matrix_input = isinstance(grads, Tensor)
    grads = as_task_gradients(grads)
    weights = _checked_weights(weights, grads)
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` to accumulate into")
        outs = [torch.empty(size, dtype=grads.dtype, device=grads.device) for size in grads.sizes]
    else:
        outs = [out] if isinstance(out, Tensor) else list(out)
        _check_outs(outs, grads)
    # The kernels write contiguous memory; a strided destination gets a contiguous stand-in
    # (holding its values when accumulating) that is copied back.
    # (torch.compile cannot trace the C-level passes of the eager checks: it takes the
    # element-by-element paths, which do the same.)
    eager = not torch.compiler.is_compiling()
    dense = outs if eager and all(map(Tensor.is_contiguous, outs)) else [target.contiguous() for target in outs]
    backends.resolve(backend, grads.device).combine(grads, weights, dense, accumulate)
    if dense is not outs:
        for target, written in zip(outs, dense, strict=True):
            if written is not target:
                target.copy_(written)
    return outs[0] if matrix_input else outs


def _checked_weights(weights: Tensor, grads: TaskGradients) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() != grads.num_tasks:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a 1-D tensor of T={grads.num_tasks} entries, got {shape}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if weights.device != grads.device:
        raise ValueError(f"weights are on {weights.device}, the task gradients on {grads.device}")
    if weights.requires_grad:
        weights = weights.detach()
    return weights.to(torch.float32).contiguous()


def _check_outs(outs: list[Tensor], grads: TaskGradients) -> None:
    if len(outs) != len(grads.sizes):
        raise ValueError(f"out needs one tensor per shared tensor ({len(grads.sizes)}), got {len(outs)}")
    # A step passes hundreds of destinations: one C-level pass per property when all is well,
    # the destination-by-destination search for the message only when it is not.
    if not torch.compiler.is_compiling() and _all_like(outs, grads):
        return
    for k, target in enumerate(outs):
        if target.numel() != grads.sizes[k]:
            raise ValueError(f"out[{k}] has {target.numel()} elements, the gradients {grads.sizes[k]}")
        if target.dtype != grads.dtype:
            raise TypeError(f"out[{k}] has dtype {target.dtype}, the gradients {grads.dtype}")
        if target.device != grads.device:
            raise ValueError(f"out[{k}] is on {target.device}, the gradients on {grads.device}")


def _all_like(outs: list[Tensor], grads: TaskGradients) -> bool:
    """Whether every destination has its shared tensor's size and the gradients' dtype and device."""
    try:
        return (
            tuple(map(Tensor.numel, outs)) == grads.sizes
            and set(map(_DTYPE_OF, outs)) == {grads.dtype}
            and set(map(_DEVICE_OF, outs)) == {grads.device}
        )
    except TypeError:  # not all tensors: the element-by-element checks say which
        return False
