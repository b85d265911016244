"""Task-gradient inputs in every layout the ops accept, with their float64 twin.

The float64 matrix holds exactly the stored values (bfloat16 and float16 convert to float64
without rounding), so a backend's only error against it is its float32 accumulation.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from emtl_kernels import TaskGradients

LAYOUTS = ("matrix", "strided_rows", "transposed", "blocks", "rows")


def split_sizes(numel: int, pieces: int) -> list[int]:
    """``numel`` split into up to ``pieces`` uneven positive sizes."""
    pieces = max(1, min(pieces, numel))
    cuts = sorted({(numel * (k * k)) // (pieces * pieces) for k in range(1, pieces)} - {0, numel})
    bounds = [0, *cuts, numel]
    return [b - a for a, b in itertools.pairwise(bounds)]


def make_task_gradients(
    num_tasks: int, numel: int, dtype: torch.dtype, layout: str, *, device="cpu", seed: int = 0
) -> tuple[Tensor | TaskGradients, Tensor]:
    """(input for the ops, the same J as a float64 [T, P] matrix). Rows get scales spread over
    four orders of magnitude, as task gradients do."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, num_tasks, dtype=torch.float64)[torch.randperm(num_tasks, generator=generator)]
    values = (torch.randn(num_tasks, numel, generator=generator, dtype=torch.float64) * scales[:, None]).to(dtype)
    exact = values.to(torch.float64)
    values = values.to(device)
    if layout == "matrix":
        return values, exact
    if layout == "strided_rows":
        wide = torch.full((num_tasks, numel + 5), float("nan"), dtype=dtype, device=device)
        wide[:, 2 : numel + 2] = values
        return wide[:, 2 : numel + 2], exact
    if layout == "transposed":
        return values.T.contiguous().T, exact
    sizes = split_sizes(numel, 5)
    pieces = values.split(sizes, dim=1)
    if layout == "blocks":
        shapes = [(size,) if size % 3 else (3, size // 3) for size in sizes]
        return TaskGradients.from_blocks(
            [p.contiguous().view(num_tasks, *s) for p, s in zip(pieces, shapes, strict=True)]
        ), exact
    if layout == "rows":
        return TaskGradients([[p[i].clone() for p in pieces] for i in range(num_tasks)]), exact
    raise ValueError(layout)
