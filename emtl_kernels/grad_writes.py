"""Writing into ``.grad`` as ``backward()`` does (adding to what is there), or, when the step is
skipped, leaving every ``.grad`` as it was. The skip flag is a device tensor, so "nothing" is
written as a masked update, never decided on the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .skip_check import SkipCheck


def grad_destinations(params: list[Tensor]) -> tuple[list[Tensor], bool]:
    """Each parameter's ``.grad`` to write into, and whether to add to it. Missing gradients are
    allocated uninitialised when none exists (nothing to add to: no fill pass), zeroed otherwise.
    Raises, before allocating any, where a ``.grad`` is sparse: the combine pass writes dense memory."""
    for k, p in enumerate(params):
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(
                f"the shared parameter of shape {tuple(p.shape)} (number {k} the losses reach) holds a sparse "
                ".grad, which the fused update cannot add to: zero it (optimizer.zero_grad()) first"
            )
    missing = [p.grad is None for p in params]
    for p, is_missing in zip(params, missing, strict=True):
        if is_missing:
            p.grad = torch.empty_like(p) if all(missing) else torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None], not all(missing)


def accumulate_grad(param: Tensor, grad: Tensor | None, skipped: Tensor) -> None:
    """``param.grad += grad``, or nothing at all (not even NaN) when the step is skipped; a
    sparse gradient (``nn.Embedding(sparse=True)``) is added as ``backward()`` adds it."""
    if grad is not None:
        _add_into_grad(param, _unless(skipped, grad).to(param.dtype))


def _add_into_grad(param: Tensor, grad: Tensor) -> None:
    """``param.grad += grad`` as ``backward()`` adds: in place into a dense ``.grad``."""
    if param.grad is None:
        param.grad = grad
    elif param.grad.is_sparse:
        param.grad = param.grad + grad
    else:
        param.grad.add_(grad)


def backward_into_grads(output: Tensor, params: Sequence[Tensor], check: SkipCheck, *, retain_graph: bool) -> None:
    """``output.backward(inputs=params)``: ``AccumulateGrad`` writes each reached parameter's
    ``.grad`` as ``backward()`` does, taking autograd's buffer without a copy where nothing else
    holds it; unless the step is skipped, when every ``.grad`` is left as it was (zeros where it
    held nothing). The written values are read once, for ``check``, before the skip is decided.

    A ``.grad`` that holds values is set aside during the backward and the new values are added
    to it after, so that a skipped step can leave it as it was; the usual ``.grad`` of None costs
    nothing beyond the backward but that read."""
    held = [param.grad for param in params]
    for param in params:
        param.grad = None
    try:
        torch.autograd.backward(output, inputs=list(params), retain_graph=retain_graph)
    except BaseException:
        for param, grad in zip(params, held, strict=True):
            param.grad = grad
        raise
    written = [param.grad for param in params]
    check.require_finite([_value_to_check(old, new) for old, new in zip(held, written, strict=True)])
    skipped = check.skipped
    zero_if_([grad for grad in written if grad is not None and not grad.is_sparse], skipped)
    for param, old, new in zip(params, held, written, strict=True):
        param.grad = old
        if new is not None:
            _add_into_grad(param, _unless(skipped, new) if new.is_sparse else new)


@torch.library.custom_op("emtl_kernels::zero_if_", mutates_args=("tensors",))
def zero_if_(tensors: list[Tensor], flag: Tensor) -> None:
    """Zero every (dense) tensor of ``tensors`` in place when ``flag``, a 0-dim bool tensor on
    their device, holds; leave them untouched otherwise. One opaque op, so that the decision
    stays out of a traced or captured program."""
    if not tensors:
        return
    if flag.device.type == "cpu":
        # The flag lies in host memory: reading it waits for nothing, and a step that is not
        # skipped, the usual one, then costs no pass over the tensors.
        if bool(flag):
            torch._foreach_zero_(tensors)
        return
    for tensor in tensors:
        tensor.masked_fill_(flag, 0)


@zero_if_.register_fake
def _(tensors: list[Tensor], flag: Tensor) -> None:
    return None


def give_empty_grads(params: Sequence[Tensor]) -> None:
    """A parameter with no elements that a loss reaches gets an empty ``.grad``, as from ``backward()``."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def summed_terms(terms: Sequence[tuple[int, Tensor]], weights: Tensor | None) -> Tensor | None:
    """Σ_i w_i t_i over the ``(i, t_i)`` terms (Σ_i t_i when ``weights`` is None); None when
    there are none. Each term is left as it is: autograd may hand out views it shares."""
    total = None
    for i, term in terms:
        if weights is not None and total is not None and not (total.is_sparse or term.is_sparse):
            total.addcmul_(term, weights[i])
            continue
        scaled = term if weights is None else term * weights[i]
        total = scaled if total is None else total + scaled
    return total


def values_to_check(params: Sequence[Tensor], additions: Sequence[Tensor | None]) -> list[Tensor | None]:
    """What the skip check reads of each addition: the addition itself, or, for a float16
    ``.grad`` that already holds values, the sum it would hold (float16 overflows at 65504
    where float32 and bfloat16 need ~3.4e38)."""
    return [_value_to_check(p.grad, a) for p, a in zip(params, additions, strict=True)]


def backups_of(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """A copy of each tensor (None where it is None): what a write adds to, put back by
    :func:`undo_if` when the write turns out not finite."""
    return [None if tensor is None else tensor.clone() for tensor in tensors]


def undo_if(skipped: Tensor, outs: Sequence[Tensor | None], backups: Sequence[Tensor | None]) -> None:
    """When ``skipped``, put back in each (dense) out what its backup holds, zeros where it has
    none (it held nothing before the write); None outs are left alone."""
    pairs = [(out, backup) for out, backup in zip(outs, backups, strict=True) if out is not None]
    zero_if_([out for out, backup in pairs if backup is None], skipped)
    for out, backup in pairs:
        if backup is not None:
            torch.where(skipped, backup, out, out=out)


def _value_to_check(existing: Tensor | None, addition: Tensor | None) -> Tensor | None:
    if addition is not None and existing is not None and _sums_can_overflow(existing, addition):
        return existing + addition
    return addition


def _sums_can_overflow(grad: Tensor, addition: Tensor) -> bool:
    return grad.dtype == torch.float16 and not (grad.is_sparse or addition.is_sparse)


def _unless(skipped: Tensor, grad: Tensor) -> Tensor:
    """``grad``, or zeros of its shape and layout when ``skipped``."""
    if not grad.is_sparse:
        return torch.where(skipped, 0.0, grad)
    return torch.sparse_coo_tensor(
        grad._indices(),
        torch.where(skipped, 0.0, grad._values()),
        grad.shape,
        is_coalesced=grad.is_coalesced(),
        check_invariants=False,
    )
