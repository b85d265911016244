"""What a backend is: the :class:`Backend` protocol the ops call, and the custom ops' contract.

Every backend (``reference``, ``native``, ``triton``, and ``auto``, which picks one of them per
pass) implements :class:`Backend` over a :class:`~emtl_kernels.task_gradients.TaskGradients`.

The backends whose kernels read tensor addresses (native, Triton) also expose their passes as
``torch.library`` custom ops, the form ``torch.compile`` traces as one opaque node and
``torch.library.opcheck`` checks. Both register the same three ops, :data:`OPS` (names, schemas,
fake kernels), each in its own namespace: ``torch.ops.emtl_kernels`` (schemas in
csrc/registration.cpp, which a test holds to :data:`OPS`) and ``torch.ops.emtl_triton``. The
pieces of J travel as one task-major list (:meth:`TaskGradients.flat_pieces`) with ``num_tasks``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..task_gradients import TaskGradients


class Backend(Protocol):
    """The kernels of one backend: reductions accumulate in float32 whatever the storage dtype."""

    @property
    def name(self) -> str:
        """The name the ops' ``backend=`` argument takes."""
        ...

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here (None: it can)."""
        ...

    def gram(self, grads: TaskGradients) -> Tensor:
        """G = J Jᵀ, ``[T, T]`` float32, exactly symmetric."""
        ...

    def sq_norms(self, grads: TaskGradients) -> Tensor:
        """The squared row norms of J, ``[T]`` float32."""
        ...

    def combine(self, grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
        """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding. ``outs``:
        K contiguous tensors of any shape, tensor k with ``grads.sizes[k]`` elements; ``weights``:
        float32 ``[T]``. A row whose weight is exactly zero contributes nothing, even where it
        holds non-finite values."""
        ...


@dataclass(frozen=True)
class OpContract:
    """One custom op: its schema (after the name), the arguments it writes, its fake kernel (the
    result's shape and dtype, for torch.compile and opcheck)."""

    schema: str
    fake: Callable[..., Tensor | None]
    mutates_args: tuple[str, ...] = ()


def num_tensors(pieces: list[Tensor], num_tasks: int) -> int:
    """K, the shared tensors of ``num_tasks * K`` task-major pieces; raises if they do not divide."""
    if num_tasks < 1 or not pieces or len(pieces) % num_tasks:
        raise RuntimeError(f"got {len(pieces)} pieces for {num_tasks} tasks; expected num_tasks * K of them")
    return len(pieces) // num_tasks


def _fake_gram(pieces: list[Tensor], num_tasks: int) -> Tensor:
    num_tensors(pieces, num_tasks)
    return pieces[0].new_empty((num_tasks, num_tasks), dtype=torch.float32)


def _fake_sq_norms(pieces: list[Tensor], num_tasks: int) -> Tensor:
    num_tensors(pieces, num_tasks)
    return pieces[0].new_empty((num_tasks,), dtype=torch.float32)


def _fake_combine(pieces: list[Tensor], num_tasks: int, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    if len(outs) != num_tensors(pieces, num_tasks):
        raise RuntimeError(f"got {len(outs)} outputs for {len(pieces) // num_tasks} shared tensors")


#: The custom ops of every backend that registers them, by name.
OPS = {
    "task_gram": OpContract("(Tensor[] pieces, int num_tasks) -> Tensor", _fake_gram),
    "task_sq_norms": OpContract("(Tensor[] pieces, int num_tasks) -> Tensor", _fake_sq_norms),
    "weighted_combine_": OpContract(
        "(Tensor[] pieces, int num_tasks, Tensor weights, Tensor(a!)[] outs, bool accumulate) -> ()",
        _fake_combine,
        mutates_args=("outs",),
    ),
}


def define_ops(namespace: str, kernels: Mapping[str, Callable[..., Tensor | None]]) -> None:
    """Define :data:`OPS` in ``namespace`` (``torch.ops.<namespace>.<name>``) with Python
    ``kernels`` for every device, and their fake kernels."""
    for name, op in OPS.items():
        torch.library.custom_op(
            f"{namespace}::{name}", kernels[name], mutates_args=op.mutates_args, schema=op.schema
        ).register_fake(op.fake)


def register_fakes(namespace: str) -> None:
    """The fake kernels of :data:`OPS` for ops whose schemas and kernels are registered elsewhere
    (the compiled extension's)."""
    for name, op in OPS.items():
        torch.library.register_fake(f"{namespace}::{name}", op.fake)
