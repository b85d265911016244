"""The distributed step on CPU with gloo: step time and bytes communicated, 1 and 2 ranks.

Ways to run one training step (forward and backward) of the same multi-task MLP, each rank on
its own batch of the same size:
- ``ddp``: plain DDP, ``sum(losses).backward()``: the baseline every time is a ratio to;
- ``exact``: :class:`DistributedMTLStep` with ``sync="exact"``;
- ``local``: :class:`DistributedMTLStep` with ``sync="local"``;
- ``mtlstep`` (one rank only): :class:`MTLStep` on the bare model, to separate what the
  distributed step adds from what the multi-task step itself costs.

Bytes per step are counted, not estimated: the step's own collectives from its
:class:`CommunicationLog`, DDP's all-reduce from the sizes of the parameters it reduces. "Sent"
is what each rank puts on the wire under ring algorithms. Times are the median and the
fastest of the timed steps on rank 0, with a barrier before each step; the figures of 2 ranks share the machine's
cores with each other (and with whatever else runs), so read them as ratios to ``ddp`` of the
same run.

    python bench/bench_distributed.py [--steps 30] [--world-sizes 1 2] [--out results.md]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emtl_kernels import DistributedMTLStep, MTLStep

METHODS = ("ddp", "exact", "local")
SINGLE_PROCESS = "mtlstep"


class MultiTaskMLP(nn.Module):
    """A tanh MLP trunk shared by ``num_tasks`` linear regression heads."""

    def __init__(self, num_tasks: int, width: int, inputs: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 128), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(num_tasks))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(inputs)
        return [(head(features).squeeze(-1) - targets[:, i]).square().mean() for i, head in enumerate(self.heads)]


def run_distributed_benchmark(
    world_sizes=(1, 2), num_tasks: int = 4, width: int = 512, batch: int = 64, steps: int = 30, warmup: int = 3,
) -> list[dict]:
    """Measure every method on every world size; one result dict per (world size, method)."""
    results = []
    for world_size in world_sizes:
        with tempfile.TemporaryDirectory() as out_dir:
            config = dict(num_tasks=num_tasks, width=width, batch=batch, steps=steps, warmup=warmup)
            mp.spawn(_rank_main, args=(world_size, _free_port(), out_dir, config), nprocs=world_size, join=True)
            results += torch.load(Path(out_dir) / "results.pt")
    return results


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, config: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    methods = METHODS + ((SINGLE_PROCESS,) if world_size == 1 else ())
    results = [_measure(method, rank, world_size, **config) for method in methods]
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.destroy_process_group()


def _measure(method, rank, world_size, num_tasks, width, batch, steps, warmup) -> dict:
    model = MultiTaskMLP(num_tasks, width)
    ddp = model if method == SINGLE_PROCESS else DistributedDataParallel(model)
    if method == SINGLE_PROCESS:
        step = MTLStep(model.trunk.parameters(), "emtl")
    else:
        step = None if method == "ddp" else DistributedMTLStep(ddp, model.trunk.parameters(), "emtl", sync=method)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(batch, 64, generator=generator)
    targets = torch.randn(batch, num_tasks, generator=generator)
    times = []
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        losses = ddp(inputs, targets)
        if step is None:
            sum(losses).backward()
        else:
            step.backward(losses)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    shared = sum(p.numel() for p in model.trunk.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    ddp_payload = 4 * (shared + heads) if method in ("ddp", "local") else 0  # DDP's own all-reduce
    step_payload, step_sent = (step.communication.payload_bytes, step.communication.sent_bytes) if method in ("exact", "local") else (0, 0)
    ring_share = (world_size - 1) / world_size
    result = {
        "world_size": world_size, "method": method, "num_tasks": num_tasks, "shared_params": shared,
        "head_params": heads, "batch_per_rank": batch, "step_ms": 1e3 * statistics.median(times), "fastest_ms": 1e3 * min(times),
        "payload_bytes": ddp_payload + step_payload, "sent_bytes": 2 * ring_share * ddp_payload + step_sent,
    }
    if rank == 0:
        print(f"[bench_distributed] {world_size} rank(s), {method}: {result['step_ms']:.1f} ms/step (median), "
              f"{result['payload_bytes'] / 1e6:.2f} MB payload", flush=True)
    return result


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def markdown_table(results: list[dict]) -> str:
    """The results as a markdown table, times also as ratios to plain DDP on the same world size."""
    median = {r["world_size"]: r["step_ms"] for r in results if r["method"] == "ddp"}
    fastest = {r["world_size"]: r["fastest_ms"] for r in results if r["method"] == "ddp"}
    lines = [
        "| ranks | method | step, median (ms) | vs plain DDP | fastest (ms) | vs plain DDP | payload (MB) | sent per rank (MB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['world_size']} | {r['method']} | {r['step_ms']:.1f} | {r['step_ms'] / median[r['world_size']]:.2f}× "
            f"| {r['fastest_ms']:.1f} | {r['fastest_ms'] / fastest[r['world_size']]:.2f}× "
            f"| {r['payload_bytes'] / 1e6:.3f} | {r['sent_bytes'] / 1e6:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write the markdown table there too")
    args = parser.parse_args(argv)
    results = run_distributed_benchmark(tuple(args.world_sizes), args.tasks, args.width, steps=args.steps)
    first = results[0]
    table = (
        f"T = {first['num_tasks']} tasks, P = {first['shared_params']} shared and H = {first['head_params']} head "
        f"parameters (float32), {first['batch_per_rank']} samples a rank; CPU, gloo, {torch.__version__}.\n\n"
        + markdown_table(results)
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
