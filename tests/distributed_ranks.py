"""Run scenarios on W gloo ranks in spawned processes, bounded in time, results back as files.

Each rank process joins a gloo group on localhost (with a short collective timeout), runs the
named scenarios in order, and saves each one's result (or its error) as ``{name}-rank{r}.pt``.
The parent joins the processes with a deadline and kills any that outlive it, so a rank that
raises or blocks can fail a test but never hang the suite.
"""

from __future__ import annotations

import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multitask_models import CountedTrunk, FeaturesToy, ToyMultiTask, toy_batch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from emtl_kernels.distributed import DistributedMTLStep
from emtl_kernels.weightings import GLS

#: How long a collective may wait for the other ranks before it raises.
COLLECTIVE_TIMEOUT_S = 30
#: The shorter timeout of the group on which one rank stalls on purpose.
STALL_TIMEOUT_S = 3
#: The weighting every scenario uses: it reads the whole Gram matrix (its total), not only norms.
WEIGHTING = dict(weighting="gradnorm_scaling", target="sum_norm")


def run_ranks(scenarios: list[str], out_dir: Path, world_size: int = 2, deadline_s: float = 150) -> dict:
    """Run ``scenarios`` on ``world_size`` ranks; ``{name: [result of rank 0, rank 1, …]}``."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=run_rank, args=(rank, world_size, port, str(out_dir), scenarios), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    end = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return {name: [_load(out_dir / f"{name}-rank{rank}.pt") for rank in range(world_size)] for name in scenarios}


def _load(path: Path):
    return torch.load(path, weights_only=False) if path.exists() else {"error": "no result: the rank died or timed out"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, out_dir: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    for name in scenarios:
        try:
            result = SCENARIOS[name](rank, world_size)
        except Exception as error:  # reported to the parent, which owns the verdict
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        torch.save(result, Path(out_dir) / f"{name}-rank{rank}.pt")
        if "error" in result and name == "rank_raises":
            return  # leave without a goodbye, as a crashing rank does
    dist.destroy_process_group()


def local_batch(rank: int, world_size: int):
    """This rank's equal slice of the global batch ``toy_batch()``."""
    inputs, targets = toy_batch()
    rows = inputs.shape[0] // world_size
    return inputs[rank * rows : (rank + 1) * rows], targets[rank * rows : (rank + 1) * rows]


def step_result(step: DistributedMTLStep, grads: list[torch.Tensor]) -> dict:
    return {
        "weights": step.last.weights,
        "gram": step.last.gram,
        "losses": step.last.losses,
        "skipped": bool(step.last.skipped),
        "grads": grads,
        "payload": dict(step.communication.payload),
        "calls": dict(step.communication.calls),
    }


def ddp_step(rank: int, world_size: int, sync: str, mode: str = "speed") -> dict:
    """One step on a DDP model, then a second training step to show DDP is left in a sane state."""
    model = ToyMultiTask()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), sync=sync, mode=mode, bucket_cap_mb=1e-4, **WEIGHTING)
    step.backward(ddp(*local_batch(rank, world_size)))
    result = step_result(step, [p.grad.clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step.optimizer_step(optimizer)
    optimizer.zero_grad()
    step.backward(ddp(*local_batch(rank, world_size)))
    result["second_step_payload"] = dict(step.communication.payload)
    sum(ddp(*local_batch(rank, world_size))).backward()  # plain DDP still works after the steps
    return result


def ddp_exact(rank, world_size):
    return ddp_step(rank, world_size, "exact")


def ddp_local(rank, world_size):
    return ddp_step(rank, world_size, "local")


def ddp_memory_exact(rank, world_size):
    return ddp_step(rank, world_size, "exact", mode="memory")


def ddp_memory_local(rank, world_size):
    return ddp_step(rank, world_size, "local", mode="memory")


def ddp_features(rank: int, world_size: int) -> dict:
    """Features mode in both syncs, and a second training step through DDP afterwards."""
    results = {}
    for sync in ("exact", "local"):
        model = FeaturesToy()
        ddp = DistributedDataParallel(model)
        step = DistributedMTLStep(ddp, model.trunk.parameters(), sync=sync, **WEIGHTING)
        features, losses = ddp(*local_batch(rank, world_size))
        step.backward(losses, features=features)
        results[sync] = step_result(step, [p.grad.clone() for p in model.parameters()])
        sum(ddp(*local_batch(rank, world_size))[1]).backward()  # plain DDP still works after the step
    return results


def features_nan_on_one_rank(rank: int, world_size: int) -> dict:
    """Features mode: rank 1's first loss is NaN; every rank skips and no .grad changes."""
    model = FeaturesToy()
    ddp = DistributedDataParallel(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), **WEIGHTING)
    features, losses = ddp(*local_batch(rank, world_size))
    if rank == 1:
        losses[0] = losses[0] * float("nan")
    step.backward(losses, features=features)
    return {
        "skipped": bool(step.last.skipped),
        "grads_unchanged": all(bool((p.grad == 7.0).all()) for p in model.parameters()),
    }


def fully_sharded(model: ToyMultiTask) -> nn.Module:
    """``model`` under FSDP2: each trunk layer with parameters, then the whole model."""
    for layer in model.trunk:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def wrapped_for(model: ToyMultiTask, wrap: str) -> nn.Module:
    """``model`` under FSDP2 (``wrap`` "fsdp") or DDP (``wrap`` "exact" or "local": the sync)."""
    return fully_sharded(model) if wrap == "fsdp" else DistributedDataParallel(model)


def full_grads(model: nn.Module, wrap: str) -> list[torch.Tensor]:
    """Every parameter's whole ``.grad`` (gathered from the shards under FSDP2)."""
    return [p.grad.full_tensor() if wrap == "fsdp" else p.grad.clone() for p in model.parameters()]


def fsdp_exact(rank: int, world_size: int) -> dict:
    model = ToyMultiTask()
    fully_sharded(model)
    step = DistributedMTLStep(model, model.trunk.parameters(), **WEIGHTING)
    step.backward(model(*local_batch(rank, world_size)))
    return step_result(step, [p.grad.full_tensor() for p in model.parameters()])


def nan_on_one_rank(rank: int, world_size: int) -> dict:
    """Rank 1's second loss is NaN: every rank skips, in both modes, and no .grad changes."""
    results = {}
    for sync in ("exact", "local"):
        model = ToyMultiTask()
        ddp = DistributedDataParallel(model)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        step = DistributedMTLStep(ddp, model.trunk.parameters(), sync=sync, **WEIGHTING)
        losses = ddp(*local_batch(rank, world_size))
        if rank == 1:
            losses[1] = losses[1] * float("nan")
        step.backward(losses)
        results[sync] = {
            "skipped": bool(step.last.skipped),
            "weights": step.last.weights,
            "grads_unchanged": all(bool((p.grad == 7.0).all()) for p in model.parameters()),
        }
    return results


class SpikedMultiTask(ToyMultiTask):
    """ToyMultiTask with one more parameter in task 0's loss, sqrt(s + offset) at s = 0: the loss
    stays finite, and the parameter's gradient is inf where ``offset`` is 0."""

    def __init__(self, offset: float):
        super().__init__()
        self.spike = nn.Parameter(torch.zeros(1))
        self.offset = offset

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        losses = super().losses(inputs, targets)
        losses[0] = losses[0] + torch.sqrt(self.spike + self.offset).sum()
        return losses


def inf_head_gradient_on_one_rank(rank: int, world_size: int) -> dict:
    """Only rank 1 computes an inf gradient on a non-shared parameter, its losses finite: every
    rank skips, under exact and local DDP and FSDP2, and no .grad changes (in local mode and under
    FSDP2 the check reads each rank's own values: the ranks must agree)."""
    results = {}
    for wrap in ("exact", "local", "fsdp"):
        model = SpikedMultiTask(offset=0.0 if rank == 1 else 1.0)
        wrapped = wrapped_for(model, wrap)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        sync = "local" if wrap == "local" else "exact"
        step = DistributedMTLStep(wrapped, model.trunk.parameters(), sync=sync, **WEIGHTING)
        step.backward(wrapped(*local_batch(rank, world_size)))
        grads = full_grads(model, wrap)
        results[wrap] = {
            "skipped": bool(step.last.skipped),
            "reasons": step.last.why_skipped(),
            "grads_unchanged": all(bool((g == 7.0).all()) for g in grads),
        }
    return results


class RecordedGLS(GLS):
    """GLS (weights from the losses only) that keeps what each ``after_backward`` was handed."""

    def __init__(self):
        super().__init__()
        self.handed: list[tuple[torch.Tensor, bool]] = []

    def after_backward(self, losses: torch.Tensor, skipped: torch.Tensor) -> None:
        self.handed.append((losses.clone(), bool(skipped)))


def loss_weighting_step(rank: int, world_size: int, nan_on_rank_1: bool) -> dict:
    """GLS under exact and local DDP and FSDP2, every .grad 7 first; rank 1's second loss NaN
    where ``nan_on_rank_1``. Adds the backward passes through the trunk and the weighting's hook
    calls to the step's result."""
    results = {}
    for wrap in ("exact", "local", "fsdp"):
        model = CountedTrunk()
        wrapped = wrapped_for(model, wrap)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        weighting = RecordedGLS()
        sync = "local" if wrap == "local" else "exact"
        step = DistributedMTLStep(wrapped, model.trunk.parameters(), weighting, sync=sync)
        losses = wrapped(*local_batch(rank, world_size))
        if nan_on_rank_1 and rank == 1:
            losses[1] = losses[1] * float("nan")
        step.backward(losses)
        results[wrap] = {
            **step_result(step, full_grads(model, wrap)),
            "backwards": model.calls[0],
            "handed": weighting.handed,
        }
    return results


def loss_weighting(rank, world_size):
    return loss_weighting_step(rank, world_size, nan_on_rank_1=False)


def loss_weighting_nan_on_one_rank(rank, world_size):
    return loss_weighting_step(rank, world_size, nan_on_rank_1=True)


def random_draws(rank: int, world_size: int) -> dict:
    """Weightings that draw, unseeded, each rank's default generator seeded apart: two DDP steps
    each, the weights and .grad of every step; and one whose ranks were given different seeds."""
    results = {}
    for name in ("rlw", "pcgrad"):
        torch.manual_seed(rank + 1)
        model = ToyMultiTask()
        ddp = DistributedDataParallel(model)
        step = DistributedMTLStep(ddp, model.trunk.parameters(), name)
        draws = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step.backward(ddp(*local_batch(rank, world_size)))
            draws.append(step_result(step, [p.grad.clone() for p in model.parameters()]))
        results[name] = draws
    model = ToyMultiTask()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), "rlw", seed=rank)
    try:
        step.backward(ddp(*local_batch(rank, world_size)))
        results["seeded_apart"] = None
    except ValueError as error:
        results["seeded_apart"] = str(error)
    return results


def ranks_disagree_on_tasks(rank: int, world_size: int) -> dict:
    model = ToyMultiTask()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), **WEIGHTING)
    losses = ddp(*local_batch(rank, world_size))
    step.backward(losses[: 3 - rank])
    return {}


def rank_stalls(rank: int, world_size: int) -> dict:
    """Rank 1 stays alive but never calls backward: rank 0 must end by the group's timeout."""
    group = dist.new_group(timeout=timedelta(seconds=STALL_TIMEOUT_S))
    model = ToyMultiTask()
    ddp = DistributedDataParallel(model, process_group=group)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), **WEIGHTING)
    losses = ddp(*local_batch(rank, world_size))
    if rank == 1:
        time.sleep(2 * STALL_TIMEOUT_S)
        return {}
    return _timed_backward(step, losses)


def rank_raises(rank: int, world_size: int) -> dict:
    """Rank 1 fails before its backward; rank 0 must not wait for it for ever."""
    model = ToyMultiTask()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), **WEIGHTING)
    losses = ddp(*local_batch(rank, world_size))
    if rank == 1:
        raise RuntimeError("rank 1 failed")
    return _timed_backward(step, losses)


def _timed_backward(step, losses) -> dict:
    started = time.monotonic()
    try:
        step.backward(losses)
    except Exception as error:
        return {"raised": f"{type(error).__name__}: {error}", "waited_s": time.monotonic() - started}
    return {"raised": None}


SCENARIOS = {
    f.__name__: f
    for f in (
        ddp_exact,
        ddp_local,
        ddp_memory_exact,
        ddp_memory_local,
        ddp_features,
        features_nan_on_one_rank,
        fsdp_exact,
        nan_on_one_rank,
        inf_head_gradient_on_one_rank,
        loss_weighting,
        loss_weighting_nan_on_one_rank,
        random_draws,
        ranks_disagree_on_tasks,
        rank_stalls,
        rank_raises,
    )
}
