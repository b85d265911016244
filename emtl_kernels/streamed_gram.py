"""The exact Gram matrix of the task gradients without the T×P task-gradient matrix: one vectorised
backward whose per-parameter task gradients are reduced into G as soon as autograd produces them.

``torch.func.vmap`` runs one backward of the T losses over the T cotangents e_1 … e_T, so every
gradient in it is a ``[T, …]`` block: task i's gradient is its row i. A hook on each parameter
takes the parameter's block once autograd has summed every use of it (a tied weight's block is
the gradient of all its uses: G is formed from the sum, not summed over the uses), hands it to
the fused Gram pass, and gives autograd a stride-0 zero in its place. So no T×P matrix is ever
held: beyond one plain backward, the extra memory is the T-fold gradients of the activations that
the vectorised backward keeps in flight, and the pending blocks, at most ``T·n_max`` elements
(n_max the largest parameter on this path) plus the block that reaches the bound.

A weight whose one use is a linear layer (``nn.Linear``, attention's packed input and output
projections; under autocast as well, through the cast of the weight) or a dense embedding
(``nn.Embedding``, ``F.embedding``; see :mod:`.sole_use_layers`) is left out of the backward
instead, so autograd never forms its ``[T, out, in]`` or ``[T, V, d]`` block: the layer's share of G
comes from the T output gradients D reaching its node and what the node saved, the input X of a
linear layer (:mod:`.linear_gram`, tile by tile) or the indices of an embedding
(:mod:`.embedding_gram`, on the at most N rows the batch looks up). Where the backward runs the
layer's node (something below it needs a gradient), a hook on the node takes D; where it would not
(an embedding of the input tokens), the node's input is one of the backward's inputs (a gradient
edge) and D is taken when the backward returns: until then it is held, ``T·N·d`` elements for an
embedding. Under autocast the share is the exact Gram matrix of the products D_iᵀ X of the
low-precision D and X, where the per-parameter path reads each rounded to that precision. A tied or
reused weight keeps the per-parameter path: its share of G is that of its summed gradient, with the
cross terms between its uses. So does every weight under a gathering, whose summed blocks the
per-layer share, quadratic in D, cannot give.

Every op on the backward path must run under ``torch.vmap`` (PyTorch's batching rules, or its
slow per-task fallback): an op that cannot fails with PyTorch's error naming it, wrapped in a
:class:`StreamedGramError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd.graph import GradientEdge

from .ops import task_gram
from .sole_use_layers import SoleUseLayer, sole_use_layers
from .task_gradients import TaskGradients


class StreamedGramError(RuntimeError):
    """The vectorised backward of the streamed Gram matrix failed on an op of the model."""


#: What the Gram pass reads of the pending ``[T, *shape]`` blocks: by default the blocks
#: themselves; a data-parallel step's summed shard of them (see :mod:`.distributed.step`).
Gathering = Callable[[list[Tensor]], TaskGradients]


class GramAccumulator:
    """Sum of the Gram partials of ``[T, *shape]`` blocks, reduced by the fused Gram pass once
    the pending blocks hold ``capacity`` elements, so that small parameters share one pass."""

    def __init__(
        self,
        num_tasks: int,
        capacity: int,
        device: torch.device,
        backend: str,
        gathering: Gathering = TaskGradients.from_blocks,
    ):
        self.gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=device)
        self.capacity = capacity
        self.backend = backend
        self.gathering = gathering
        self._pending: list[Tensor] = []
        self._pending_numel = 0

    def add(self, block: Tensor) -> None:
        """Take one parameter's ``[T, *shape]`` task gradients (kept until the next pass)."""
        self._pending.append(block)
        self._pending_numel += block.numel()
        if self._pending_numel >= self.capacity:
            self.flush()

    def flush(self) -> Tensor:
        """Reduce the pending blocks into :attr:`gram` and free them; returns :attr:`gram`."""
        if self._pending:
            self.gram += task_gram(self.gathering(self._pending), backend=self.backend)
            self._pending, self._pending_numel = [], 0
        return self.gram


def streamed_gram(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    backend: str,
    gathering: Gathering | None = None,
) -> tuple[Tensor, list[bool]]:
    """G = J Jᵀ over ``params`` (``[T, T]`` float32, J the task gradients of ``losses``), and for
    each parameter whether any loss reaches it. The graph is kept for a later backward.

    ``params`` are leaf tensors of one dtype and device; nothing is written into their ``.grad``.
    ``gathering``: what the Gram pass reads of a group of pending blocks; G is then the Gram
    matrix of what it returns. By default (None) the blocks themselves, and a weight whose one use
    is a linear layer or an embedding takes its share of G from that layer's saved input and
    output gradient instead.
    """
    num_tasks = len(losses)
    stacked = torch.stack(list(losses))
    # The per-layer form is not linear in the gradients: a gathering's sum of them cannot take it.
    layers = sole_use_layers([stacked], params) if gathering is None else {}
    blocks = [k for k in range(len(params)) if k not in layers]
    captured = [k for k, layer in layers.items() if not layer.runs]
    largest = max((params[k].numel() for k in blocks), default=0)
    accumulator = GramAccumulator(
        num_tasks, num_tasks * largest, params[0].device, backend, gathering or TaskGradients.from_blocks
    )
    reached = [False] * len(params)
    level: list[int] = []

    def take(k: int, grad: Tensor | None) -> Tensor | None:
        if grad is None:  # an op on the way passed no gradient on: the parameter is not reached
            return None
        reached[k] = True
        if grad.numel() > 0:
            accumulator.add(_task_rows(grad, level[0], num_tasks))
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

    def take_layer(k: int, layer: SoleUseLayer, output_grad: Tensor | None) -> None:
        if output_grad is None:
            return
        reached[k] = True
        accumulator.gram += layer.gram(_task_rows(output_grad, level[0], num_tasks), backend)

    def backward_of_one_cotangent(cotangent: Tensor) -> Tensor:
        level.append(_functorch.current_level())
        # Parameters and edges mixed: torch's annotation allows one sort or the other, the engine both.
        inputs: list[Any] = [params[k] for k in blocks] + [GradientEdge(layers[k].node, 0) for k in captured]
        grads = torch.autograd.grad(stacked, inputs, cotangent, retain_graph=True, allow_unused=True)
        for k, output_grad in zip(captured, grads[len(blocks) :], strict=True):
            take_layer(k, layers[k], output_grad)
        return cotangent

    cotangents = torch.eye(num_tasks, dtype=stacked.dtype, device=stacked.device)
    handles = [params[k].register_hook(lambda grad, k=k: take(k, grad)) for k in blocks]
    handles += [
        layer.node.register_prehook(lambda grads, k=k, layer=layer: take_layer(k, layer, grads[0]))
        for k, layer in layers.items()
        if layer.runs
    ]
    try:
        torch.func.vmap(backward_of_one_cotangent)(cotangents)
    except (RuntimeError, NotImplementedError) as error:
        raise StreamedGramError(
            "the exact Gram matrix in mode='memory' comes from one vectorised backward (torch.vmap over the "
            "T task cotangents), and an op of this model has no batched form there (a weighting that reads "
            f"only the norms runs without it: mode='memory', batched_backward=False): {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return accumulator.flush(), reached


def _task_rows(grad: Tensor, level: int, num_tasks: int) -> Tensor:
    """The ``[T, *shape]`` tensor behind ``grad``, the per-task view vmap gives a hook at ``level``.
    A gradient that does not depend on the cotangent (no batch dimension) is the same for every task."""
    if _functorch.is_batchedtensor(grad) and _functorch.maybe_get_level(grad) == level:
        return _functorch.get_unwrapped(grad).movedim(_functorch.maybe_get_bdim(grad), 0)
    return grad.expand(num_tasks, *grad.shape)
