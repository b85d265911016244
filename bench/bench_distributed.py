"""The distributed step on CPU ranks over gloo: step time and bytes communicated, 1 and 2 ranks.

Suite of :mod:`bench.extras`: :func:`results` measures, at the sizes of the preset's
:class:`~bench.presets.DistributedPlan`, one training step (forward and backward) of the same
multi-task MLP, each rank on its own batch of the same size, taken every way:

- ``ddp``: plain DDP, ``sum(losses).backward()``: the baseline the report divides by;
- ``exact``: :class:`emtl_kernels.DistributedMTLStep` with ``sync="exact"``;
- ``local``: :class:`emtl_kernels.DistributedMTLStep` with ``sync="local"``;
- ``mtlstep`` (one rank only): :class:`emtl_kernels.MTLStep` on the bare model, to separate what
  the distributed step adds from what the multi-task step itself costs.

Bytes per step are counted, not estimated: the step's own collectives from its
:class:`~emtl_kernels.CommunicationLog`, DDP's all-reduce from the sizes of the parameters it
reduces. "Sent" is what each rank puts on the wire under ring algorithms. Times are the median
and the fastest of the timed steps on rank 0, with a barrier before each step.

One spawn of as many processes as the largest world size serves every world size (spawning and
importing torch is most of a small run's time): a smaller world is a process group of the first
ranks, while the others wait at a barrier. Each rank runs one torch thread; the ranks of one
world share the machine's cores with each other (and with whatever else runs), so read the
figures as ratios to ``ddp`` of the same world size. gloo runs on CPU tensors: on another device
the suite returns a note and measures nothing.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emtl_kernels import DistributedMTLStep, MTLStep

from .presets import PRESETS, DistributedPlan

METHODS = ("ddp", "exact", "local")
SINGLE_PROCESS = "mtlstep"
INPUTS = 64
#: How long a rank waits in a collective for the others, the smaller worlds' runs included.
COLLECTIVE_TIMEOUT_S = 600


class MultiTaskMLP(nn.Module):
    """A tanh MLP trunk shared by ``num_tasks`` linear regression heads."""

    def __init__(self, num_tasks: int, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Linear(INPUTS, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 128), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(num_tasks))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(inputs)
        return [(head(features).squeeze(-1) - targets[:, i]).square().mean() for i, head in enumerate(self.heads)]


def results(preset: str, device: torch.device) -> list[dict]:
    """One row per (world size, method) at the sizes of ``preset``, measured on CPU ranks."""
    if device.type != "cpu":
        return [{"note": f"gloo ranks run on the CPU, not {device.type}: `python -m bench --device cpu` measures them"}]
    return measure_ranks(PRESETS[preset].distributed)


def measure_ranks(plan: DistributedPlan) -> list[dict]:
    """Every method on every world size of ``plan``, in one spawn of ranks."""
    processes = max(plan.world_sizes)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(processes, _free_port(), out_dir, plan), nprocs=processes, join=True)
        return torch.load(Path(out_dir) / "results.pt")


def _rank_main(rank: int, processes: int, port: int, out_dir: str, plan: DistributedPlan) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=processes,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    rows = []
    for world_size in plan.world_sizes:
        group = dist.new_group(list(range(world_size)))  # every process takes part in making it
        if rank < world_size:
            methods = METHODS + ((SINGLE_PROCESS,) if world_size == 1 else ())
            rows += [_measure(method, group, plan) for method in methods]
        dist.barrier()
    if rank == 0:
        torch.save(rows, Path(out_dir) / "results.pt")
    dist.destroy_process_group()


def _measure(method: str, group: dist.ProcessGroup, plan: DistributedPlan) -> dict:
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    model = MultiTaskMLP(plan.tasks, plan.width)
    if method == SINGLE_PROCESS:
        with warnings.catch_warnings():  # that the ranks are not reduced is the point of this method
            warnings.filterwarnings("ignore", "MTLStep computes this rank's gradients only")
            wrapped, step = model, MTLStep(model.trunk.parameters(), "emtl")
    else:
        wrapped = DistributedDataParallel(model, process_group=group)
        step = None if method == "ddp" else DistributedMTLStep(wrapped, model.trunk.parameters(), "emtl", sync=method)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(plan.batch, INPUTS, generator=generator)
    targets = torch.randn(plan.batch, plan.tasks, generator=generator)
    times = []
    for index in range(plan.warmup + plan.steps):
        model.zero_grad(set_to_none=True)
        dist.barrier(group=group)
        start = time.perf_counter()
        losses = wrapped(inputs, targets)
        if step is None:
            sum(losses).backward()
        else:
            step.backward(losses)
        if index >= plan.warmup:
            times.append(time.perf_counter() - start)
    shared_bytes = sum(p.numel() * p.element_size() for p in model.trunk.parameters())
    head_bytes = sum(p.numel() * p.element_size() for p in model.heads.parameters())
    ddp_payload = shared_bytes + head_bytes if method in ("ddp", "local") else 0  # DDP's own all-reduce
    counted = method in ("exact", "local")
    step_payload = step.communication.payload_bytes if counted else 0
    step_sent = step.communication.sent_bytes if counted else 0
    return {
        "world_size": world_size,
        "method": method,
        "tasks": plan.tasks,
        "shared_numel": sum(p.numel() for p in model.trunk.parameters()),
        "head_numel": sum(p.numel() for p in model.heads.parameters()),
        "batch_per_rank": plan.batch,
        "steps": plan.steps,
        "step_ms": 1e3 * statistics.median(times),
        "fastest_ms": 1e3 * min(times),
        "payload_bytes": ddp_payload + step_payload,
        "sent_bytes": 2 * (world_size - 1) / world_size * ddp_payload + step_sent,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
