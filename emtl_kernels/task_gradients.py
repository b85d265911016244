"""The task-gradient matrix J (T×P), kept in pieces so that nothing is ever concatenated.

J = [g_1; …; g_T] holds one row per task: task i's gradient on the P elements of the shared
parameters. A training step gets these gradients from autograd as T lists of K tensors (one per
shared parameter); copying them into one T×P buffer would cost a read and a write of T·P
elements before any useful work. So J stays where autograd put it: ``rows[i][k]`` is task i's
gradient on shared tensor k, and the kernels walk the T×K pieces directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

#: Storage dtypes every backend accepts; all of them accumulate in float32.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Derived = TypeVar("Derived")


class TaskGradients:
    """The logical T×P matrix J of per-task gradients on the shared parameters.

    ``rows[i][k]`` is task i's gradient on shared tensor k, a contiguous 1-D tensor of
    ``sizes[k]`` elements; row i of J is the concatenation of ``rows[i][0..K-1]``. Every piece has
    the same dtype (one of :data:`SUPPORTED_DTYPES`) and device.

    Build it with :meth:`from_matrix` (a ``[T, P]`` tensor), :meth:`from_blocks` (per-parameter
    ``[T, *shape]`` blocks) or directly from per-task gradient lists, as ``torch.autograd.grad``
    returns them. The pieces are views of the given tensors; only a piece that is not contiguous
    is copied. Gradients are detached: the ops on J are not differentiable.
    """

    def __init__(self, rows: Sequence[Sequence[Tensor]]):
        rows = [list(row) for row in rows]
        if not rows:
            raise ValueError("TaskGradients needs at least one task (T >= 1), got none")
        num_pieces = len(rows[0])
        if num_pieces == 0:
            raise ValueError("TaskGradients needs at least one shared tensor per task, got none")
        for i, row in enumerate(rows):
            if len(row) != num_pieces:
                raise ValueError(
                    f"every task needs one gradient per shared tensor: task 0 has {num_pieces}, task {i} has {len(row)}"
                )
        for k, piece in enumerate(rows[0]):
            _check_piece(piece, f"task 0, tensor {k}")
        self.dtype: torch.dtype = rows[0][0].dtype
        self.device: torch.device = rows[0][0].device
        self.sizes: tuple[int, ...] = tuple(piece.numel() for piece in rows[0])
        self._set_pieces([self._flat_piece(piece, i, k) for i, row in enumerate(rows) for k, piece in enumerate(row)])

    def _set_pieces(self, pieces: Sequence[Tensor]) -> None:
        """Hold the checked, flat pieces (task-major) and the rows they make."""
        self._pieces: tuple[Tensor, ...] = tuple(pieces)
        per_task = len(self.sizes)
        self.rows: tuple[tuple[Tensor, ...], ...] = tuple(
            self._pieces[start : start + per_task] for start in range(0, len(self._pieces), per_task)
        )
        self._numel = sum(self.sizes)
        self._derived: dict[str, Any] = {}

    def _flat_piece(self, piece: Tensor, task: int, index: int) -> Tensor:
        # A step builds T·K pieces: the checks stay cheap and the messages are made only on failure.
        if not (
            isinstance(piece, Tensor)
            and piece.dtype == self.dtype
            and piece.device == self.device
            and piece.numel() == self.sizes[index]
        ):
            self._refuse(piece, task, index)
        if piece.requires_grad:
            piece = piece.detach()
        if not piece.is_contiguous():
            piece = piece.contiguous()
        return piece if piece.dim() == 1 else piece.view(-1)

    def _refuse(self, piece: Tensor, task: int, index: int) -> None:
        where = f"task {task}, tensor {index}"
        _check_piece(piece, where)  # a piece that is no tensor at all is refused here
        if piece.dtype != self.dtype:
            raise TypeError(f"{where} has dtype {piece.dtype}, task 0 has {self.dtype}: one dtype for all")
        if piece.device != self.device:
            raise ValueError(f"{where} is on {piece.device}, task 0 on {self.device}: one device for all")
        raise ValueError(
            f"{where} has {piece.numel()} elements, task 0 has {self.sizes[index]}: "
            "every task's gradient on a shared tensor has that tensor's size"
        )

    @classmethod
    def from_checked_pieces(cls, pieces: Sequence[Tensor], num_tasks: int) -> TaskGradients:
        """Regroup the task-major pieces of an existing TaskGradients (its :meth:`flat_pieces`,
        as a custom op's ``Tensor[]`` argument carries them) without checking them again: a
        kernel call then costs no per-piece Python work."""
        grads = cls.__new__(cls)
        grads.dtype, grads.device = pieces[0].dtype, pieces[0].device
        grads.sizes = tuple(piece.numel() for piece in pieces[: len(pieces) // num_tasks])
        grads._set_pieces(pieces)
        return grads

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> TaskGradients:
        """Wrap a ``[T, P]`` tensor. Rows with unit element stride are used in place (a column
        slice of a wider buffer too); any other layout is copied once into contiguous rows."""
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"task gradients must be a [T, P] tensor, got {shape}")
        return cls([[row] for row in matrix.unbind(0)])

    @classmethod
    def from_blocks(cls, blocks: Sequence[Tensor]) -> TaskGradients:
        """Wrap per-parameter blocks ``[T, *param.shape]`` (one per shared tensor, same T)."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError("TaskGradients.from_blocks needs at least one block, got none")
        num_tasks = blocks[0].shape[0] if blocks[0].dim() > 0 else 0
        for k, block in enumerate(blocks):
            if block.dim() == 0 or block.shape[0] != num_tasks:
                raise ValueError(
                    f"block {k} has shape {tuple(block.shape)}: every block is [T, *shape] with "
                    f"the same T ({num_tasks})"
                )
        return cls([[block[i] for block in blocks] for i in range(num_tasks)])

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks (rows of J)."""
        return len(self.rows)

    @property
    def numel(self) -> int:
        """P, the number of shared-parameter elements (columns of J)."""
        return self._numel

    def flat_pieces(self) -> list[Tensor]:
        """The T×K pieces in one task-major list, ``pieces[i * K + k] = rows[i][k]``: the form of
        the ops' ``Tensor[] pieces`` argument."""
        return list(self._pieces)

    def derived(self, key: str, make: Callable[[], Derived]) -> Derived:
        """``make()``, computed on first use and kept with this object under ``key``: what a
        backend derives from the pieces once for all its passes over them (the Triton backend's
        device tables, say)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def column(self, k: int) -> list[Tensor]:
        """The T task gradients on shared tensor k."""
        return [row[k] for row in self.rows]

    def __repr__(self) -> str:
        return (
            f"TaskGradients(T={self.num_tasks}, P={self.numel}, tensors={len(self.sizes)}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _check_piece(piece: Tensor, where: str) -> None:
    if not isinstance(piece, Tensor):
        raise TypeError(f"{where} is a {type(piece).__name__}, not a tensor")
    if piece.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{where} has dtype {piece.dtype}; supported storage dtypes: {names}")
    if piece.numel() == 0:
        raise ValueError(f"{where} has no elements")
