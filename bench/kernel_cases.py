"""The tensors of one kernel measurement and every candidate timed on them.

A case holds the task gradients as blocks ``[T, n_k]``, one per shared tensor: a single block is
the ``[T, P]`` matrix J; many blocks of mixed sizes are a model's parameters, as a batched
backward returns them. The blocks lie one after the other in one buffer of T·P elements, so that
the copy reads exactly their bytes in one contiguous pass. The candidates, keyed by
:class:`Candidate`:

- ``copy``: the buffer copied into another of its size, the device's bandwidth for these bytes,
  which every pass is measured against;
- each emtl-kernels backend's Gram pass (``task_gram``) and combine pass (``weighted_combine``
  into preallocated outputs) over the blocks, wrapped once in a :class:`TaskGradients`;
- the torch baselines, written as a torch user would, one call per block where the op has no
  multi-tensor form (summed over the blocks where the result is a sum):

  - Gram: ``J @ J.T``; ``torch._foreach_norm`` over the T·K rows, the least arithmetic a pass
    reading the same bytes can do (a read-bandwidth reference); ``(J * J).sum(1)``, the norms
    alone through a temporary of J's size;
  - combine: ``w @ J``, which allocates its result; ``torch.mv(J.T, w, out=g)`` into the same
    preallocated outputs as the backends.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from emtl_kernels import TaskGradients, task_gram, weighted_combine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The torch baselines of each pass, by the expression a row names them with.
MATMUL_GRAM = "J @ J.T"
FOREACH_NORM = "torch._foreach_norm(rows)"
SQUARE_SUM = "(J * J).sum(1)"
MATMUL_COMBINE = "w @ J"
MV_INTO_OUT = "torch.mv(J.T, w, out=g)"
BASELINES = {"gram": (MATMUL_GRAM, FOREACH_NORM, SQUARE_SUM), "combine": (MATMUL_COMBINE, MV_INTO_OUT)}


@dataclass(frozen=True)
class Candidate:
    """What is timed: the ``copy``, or a ``gram`` or ``combine`` pass of an emtl-kernels
    ``backend`` or of a torch ``baseline``; ``dtype`` where it runs on a copy of J in another
    dtype than the case's (the limits of :mod:`bench.kernel_limits`)."""

    kernel_pass: str
    backend: str | None = None
    baseline: str | None = None
    dtype: str | None = None

    @property
    def label(self) -> str:
        return self.backend or self.baseline or "copy"


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the per-block results; a single block's result as it is (no extra add)."""
    return functools.reduce(operator.add, terms)


@dataclass(frozen=True)
class KernelCase:
    """T task gradients of one dtype in ``blocks`` (``[T, n_k]`` each, views of ``storage``),
    weights ``[T]`` (float32 for the backends, in the gradients' dtype for torch), the combine's
    outputs and the copy's destination."""

    storage: Tensor
    blocks: list[Tensor]
    weights: Tensor
    weights_like: Tensor
    outs: list[Tensor]
    destination: Tensor

    @classmethod
    def make(cls, dtype_name: str, num_tasks: int, sizes: Sequence[int], device: torch.device) -> KernelCase:
        """Random gradients over shared tensors of ``sizes`` elements (one size: the matrix case)."""
        generator = torch.Generator(device=device).manual_seed(sum(sizes) + num_tasks)
        dtype = DTYPES[dtype_name]
        storage = torch.randn(num_tasks * sum(sizes), generator=generator, device=device).to(dtype)
        pieces = storage.split([num_tasks * size for size in sizes])
        blocks = [piece.view(num_tasks, size) for piece, size in zip(pieces, sizes, strict=True)]
        weights = torch.rand(num_tasks, generator=generator, device=device)
        outs = [torch.empty(size, dtype=dtype, device=device) for size in sizes]
        return cls(storage, blocks, weights, weights.to(dtype), outs, torch.empty_like(storage))

    @functools.cached_property
    def grads(self) -> TaskGradients:
        return TaskGradients.from_blocks(self.blocks)

    @property
    def num_tasks(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def numel(self) -> int:
        return sum(block.shape[1] for block in self.blocks)

    @property
    def element_size(self) -> int:
        return self.blocks[0].element_size()

    def calls(self, backends: Sequence[str]) -> dict[Candidate, Callable[[], object]]:
        """The copy, each backend's two passes and the torch baselines."""
        grads, blocks, outs, weights_like = self.grads, self.blocks, self.outs, self.weights_like
        rows = grads.flat_pieces()
        calls: dict[Candidate, Callable[[], object]] = {
            Candidate("copy"): functools.partial(self.destination.copy_, self.storage)
        }
        for backend in backends:
            calls[Candidate("gram", backend)] = functools.partial(task_gram, grads, backend=backend)
            calls[Candidate("combine", backend)] = functools.partial(
                weighted_combine, grads, self.weights, out=outs, backend=backend
            )
        calls[Candidate("gram", baseline=MATMUL_GRAM)] = lambda: _sum(block @ block.T for block in blocks)
        calls[Candidate("gram", baseline=FOREACH_NORM)] = functools.partial(torch._foreach_norm, rows)
        calls[Candidate("gram", baseline=SQUARE_SUM)] = lambda: _sum((block * block).sum(1) for block in blocks)
        calls[Candidate("combine", baseline=MATMUL_COMBINE)] = lambda: [weights_like @ block for block in blocks]
        calls[Candidate("combine", baseline=MV_INTO_OUT)] = lambda: [
            torch.mv(block.T, weights_like, out=out) for block, out in zip(blocks, outs, strict=True)
        ]
        return calls
