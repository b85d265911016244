"""The pure-PyTorch backend: the correctness oracle of every other backend, and the fallback.

Each shared tensor's column block of J is stacked into a ``[T, n_k]`` float32 temporary (a copy:
clarity before speed here; the kernels of the other backends read J in place), then reduced with
plain tensor ops. Accumulation is float32 whatever the storage dtype. On CUDA the matrix products
follow torch's float32 matmul precision setting (TF32 when a script enables it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..task_gradients import TaskGradients


def _column_fp32(grads: TaskGradients, k: int) -> Tensor:
    return torch.stack(grads.column(k)).float()


class Reference:
    """Plain tensor ops over each shared tensor's stacked column block."""

    name = "reference"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (None: it can, on every device)."""
        return None

    def gram(self, grads: TaskGradients) -> Tensor:
        """G = J Jᵀ in float32, ``[T, T]``."""
        result = torch.zeros(grads.num_tasks, grads.num_tasks, dtype=torch.float32, device=grads.device)
        for k in range(len(grads.sizes)):
            block = _column_fp32(grads, k)
            result += block @ block.T
        # A BLAS product need not round (i, j) and (j, i) alike; G must be exactly symmetric.
        return result.triu() + result.triu(1).T

    def sq_norms(self, grads: TaskGradients) -> Tensor:
        """The squared row norms of J in float32, ``[T]``."""
        result = torch.zeros(grads.num_tasks, dtype=torch.float32, device=grads.device)
        for k in range(len(grads.sizes)):
            result += _column_fp32(grads, k).square().sum(dim=1)
        return result

    def combine(self, grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
        """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation; rows whose weight is
        exactly zero contribute nothing, even where they hold non-finite values."""
        dropped = (weights == 0).unsqueeze(1)
        for k, out in enumerate(outs):
            # The stacked column is this function's own copy: zeroing dropped rows in place is safe.
            block = _column_fp32(grads, k).masked_fill_(dropped, 0.0)
            combined = torch.mv(block.T, weights)
            if accumulate:
                combined += out.view(-1)
            out.copy_(combined.view_as(out))


BACKEND = Reference()
