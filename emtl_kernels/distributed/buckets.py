"""Flat buckets of task gradients: the contiguous buffers that reduce-scatter and all-gather need.

A collective takes one contiguous tensor, while J lives in T×K pieces where autograd put them. So
exact mode copies J once into buckets, ``[T, padded]`` buffers holding the task gradients of a run
of consecutive shared tensors, each padded with zeros to a multiple of the world size W. This copy
(T·P read and written) is the one place the step copies J, because the collective API demands
it; everything after works on the reduced shards in place. Each rank owns the slice ``[r·n,
(r+1)·n)`` of every bucket (n = padded / W): the zero padding adds nothing to a dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..task_gradients import TaskGradients


@dataclass(frozen=True)
class Bucket:
    """A run of consecutive shared tensors laid end to end, padded to a multiple of W."""

    #: Indices of the shared tensors (columns of J) in the bucket.
    indices: tuple[int, ...]
    #: Where each one starts in the bucket.
    offsets: tuple[int, ...]
    #: Their sizes.
    sizes: tuple[int, ...]
    #: Elements with the padding: a multiple of the world size.
    padded: int

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def pieces(self, flat: Tensor) -> list[Tensor]:
        """The views of ``flat`` (its last dimension laid out like the bucket) on each tensor."""
        return [flat[..., start : start + size] for start, size in zip(self.offsets, self.sizes, strict=True)]


def plan_buckets(sizes: tuple[int, ...], world_size: int, cap_elements: int) -> list[Bucket]:
    """Consecutive tensors grouped into buckets of at most ``cap_elements`` (a tensor larger than
    the cap gets a bucket of its own), each padded to a multiple of ``world_size``."""
    groups: list[list[int]] = [[]]
    filled = 0
    for k, size in enumerate(sizes):
        if groups[-1] and filled + size > cap_elements:
            groups.append([])
            filled = 0
        groups[-1].append(k)
        filled += size
    buckets = []
    for group in groups:
        group_sizes = tuple(sizes[k] for k in group)
        offsets = tuple(sum(group_sizes[:j]) for j in range(len(group)))
        total = sum(group_sizes)
        buckets.append(Bucket(tuple(group), offsets, group_sizes, -(-total // world_size) * world_size))
    return buckets


def fill_bucket(bucket: Bucket, jacobian: TaskGradients) -> Tensor:
    """The ``[T, padded]`` buffer of the bucket's task gradients (the copy collectives need)."""
    buffer = torch.empty(jacobian.num_tasks, bucket.padded, dtype=jacobian.dtype, device=jacobian.device)
    buffer[:, bucket.numel :].zero_()
    for k, piece in zip(bucket.indices, bucket.pieces(buffer), strict=True):
        for task, gradient in enumerate(jacobian.column(k)):
            piece[task].copy_(gradient)
    return buffer
