"""The collectives the distributed step issues, each one counted in a :class:`CommunicationLog`.

Every call goes straight to ``torch.distributed`` on the step's process group (gloo, NCCL or any
other backend); this module only adds the byte count, so that the cost of a step is measured
from what it really sent, not estimated.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the tensor forms of reduce-scatter and all-gather; older releases have only
# the first names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: Bytes one rank sends for a collective on a buffer of S bytes, as a fraction of S, under the
#: bandwidth-optimal (ring) algorithms: all-reduce = reduce-scatter + all-gather.
_RING_SEND_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}


@dataclass
class CommunicationLog:
    """The collectives of one step: per kind, the number of calls and the payload in bytes.

    The payload of a call is the size of its full buffer: the tensor all-reduced, the input of a
    reduce-scatter (world size × its output), the output of an all-gather. :attr:`sent_bytes`
    turns it into what each rank puts on the wire under ring algorithms, (W−1)/W of the payload
    for a reduce-scatter or an all-gather and 2(W−1)/W for an all-reduce: 0 on one rank.
    """

    world_size: int
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, buffer: Tensor) -> None:
        self.calls[kind] += 1
        self.payload[kind] += buffer.numel() * buffer.element_size()

    @property
    def payload_bytes(self) -> int:
        """Payload of all the collectives of the step, in bytes."""
        return sum(self.payload.values())

    @property
    def sent_bytes(self) -> float:
        """Bytes each rank sends, under ring algorithms."""
        share = (self.world_size - 1) / self.world_size
        return sum(_RING_SEND_FACTOR[kind] * share * size for kind, size in self.payload.items())


class Collectives:
    """Counted collectives on one process group (sums: the callers scale by 1/W where they need a
    mean, folding the factor into work they do anyway)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.log = CommunicationLog(self.world_size)

    def start_step(self) -> CommunicationLog:
        """A fresh log for the step about to run."""
        self.log = CommunicationLog(self.world_size)
        return self.log

    def all_reduce_sum(self, tensor: Tensor, *, async_op: bool = False):
        self.log.record("all_reduce", tensor)
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def reduce_scatter_sum(self, output: Tensor, input: Tensor, *, async_op: bool = False):
        """``output`` = this rank's slice of the sum over ranks of ``input`` (W × its size)."""
        self.log.record("reduce_scatter", input)
        return _reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def all_gather(self, output: Tensor, input: Tensor, *, async_op: bool = False):
        """``output`` = the ranks' ``input`` tensors, concatenated in rank order."""
        self.log.record("all_gather", output)
        return _all_gather(output, input, group=self.group, async_op=async_op)

    def all_true(self, flag: Tensor) -> Tensor:
        """0-dim bool tensor: whether the 0-dim bool ``flag`` holds on every rank (one all-reduce of
        one number; nothing waits on the host)."""
        failed = (~flag).to(torch.float32).reshape(1)
        self.all_reduce_sum(failed)
        return failed[0] == 0

    def gathered_rows(self, values: list[int], device: torch.device) -> list[list[int]]:
        """Every rank's ``values`` (small integers), one list a rank. Reads them on the host."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        table = torch.empty(self.world_size * len(values), dtype=torch.int64, device=device)
        self.all_gather(table, mine)
        return table.view(self.world_size, -1).tolist()

    def sum_losses_and_gram(self, losses: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Σ over ranks of the ``[T]`` losses and of the ``[T, T]`` symmetric Gram matrix, in one
        all-reduce of T + T(T+1)/2 numbers (the upper triangle of G only)."""
        num_tasks = losses.numel()
        rows, cols = torch.triu_indices(num_tasks, num_tasks, device=gram.device)
        dtype = torch.promote_types(losses.dtype, gram.dtype)
        packed = torch.cat([losses.to(dtype), gram[rows, cols].to(dtype)])
        self.all_reduce_sum(packed)
        upper = torch.zeros_like(gram)
        upper[rows, cols] = packed[num_tasks:].to(gram.dtype)
        return packed[:num_tasks].to(losses.dtype), upper + upper.triu(1).T
