"""The usual multi-task step of the libraries, re-implemented faithfully as the baseline.

It follows LibMTL's ``AbsWeighting`` (``_get_grads`` with ``mode="autograd"``, then
``_backward_new_grads``), the pattern most multi-task libraries share:

1. a T×P float32 buffer of zeros;
2. per task, ``torch.autograd.grad`` of its loss on the shared parameters (graph retained), the
   per-parameter gradients flattened and ``torch.cat``-ed into that task's row of the buffer;
3. the norms of the rows (the whole T×T product ``J Jᵀ`` for a weighting that reads all of G);
4. the weights, then the weighted sum ``einsum("i,ij->j", w, J)``;
5. the sum split per parameter, reshaped and cloned into each shared parameter's ``.grad``;
6. the weights copied to the host as a NumPy array, as LibMTL's ``backward`` returns them.

The weights come from the same :mod:`emtl_kernels.weightings` as the fused step, so both paths
compute the same update and differ only in how they move the bytes. LibMTL's ``autograd`` mode
leaves the task heads to the training loop; here each head gets w_i ∇φ_i L_i, from the same
per-task ``autograd.grad`` call, so that every parameter's ``.grad`` matches ``MTLStep``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from emtl_kernels import Weighting, make_weighting

from .timing import Clock


class LibraryStyleStep:
    """``backward(losses)`` the way LibMTL's ``AbsWeighting`` does it (see the module's notes).

    Args:
        shared_params: the trunk's parameters.
        task_params: per task, the parameters of its head.
        weighting: a name from :data:`emtl_kernels.WEIGHTINGS` or a :class:`Weighting`.
    """

    def __init__(self, shared_params, task_params: Sequence, weighting: str | Weighting, **weighting_options):
        self.shared = [p for p in shared_params if p.requires_grad]
        self.task_params = [list(params) for params in task_params]
        self.weighting = make_weighting(weighting, **weighting_options)
        self.grad_index = [p.numel() for p in self.shared]
        self.grad_dim = sum(self.grad_index)
        self.last_weights = None

    def backward(self, losses: Sequence[Tensor], clock: Clock | None = None) -> list[tuple]:
        """Write the update into ``.grad``; returns the (start, end) timestamps of each task's
        ``autograd.grad`` call when given a clock (the rest of the step is the post-backward part)."""
        num_tasks = len(losses)
        device = losses[0].device
        intervals = []
        grads = torch.zeros(num_tasks, self.grad_dim, device=device)
        head_grads = []
        for task, loss in enumerate(losses):
            start = clock.now() if clock else None
            task_grads = torch.autograd.grad(loss, self.shared + self.task_params[task], retain_graph=True)
            if clock:
                intervals.append((start, clock.now()))
            shared_grads, own_head = task_grads[: len(self.shared)], task_grads[len(self.shared) :]
            grads[task] = torch.cat([g.reshape(-1) for g in shared_grads])
            head_grads.append(own_head)
        gram = grads @ grads.T if self.weighting.gram_use == "full" else torch.diag(grads.norm(p=2, dim=-1).square())
        loss_vector = torch.stack([loss.detach() for loss in losses])
        weights = self.weighting(loss_vector, gram)
        new_grads = torch.einsum("i,ij->j", weights.to(grads.dtype), grads)
        self._reset_grad(new_grads)
        for task, own_head in enumerate(head_grads):
            for param, grad in zip(self.task_params[task], own_head, strict=True):
                _add_to_grad(param, weights[task] * grad)
        self.last_weights = weights.detach().cpu().numpy()
        return intervals

    def _reset_grad(self, new_grads: Tensor) -> None:
        begin = 0
        for param, size in zip(self.shared, self.grad_index, strict=True):
            param.grad = new_grads[begin : begin + size].contiguous().view(param.size()).clone()
            begin += size


def _add_to_grad(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)
