"""What the distributed step needs to know of the data-parallel wrapper: which one it is, its
process group, and whether it covers the parameters the step writes gradients to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist
from torch import Tensor, nn

Wrapper = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DataParallel:
    """A model wrapped for data parallelism: the kind of wrapper, the process group it reduces
    over, and its trainable parameters (those the wrapper reduces), in module order."""

    kind: Wrapper
    module: nn.Module
    group: dist.ProcessGroup
    params: list[Tensor]

    def check_covers(self, tensors: Sequence[Tensor], what: str) -> None:
        """Raise unless every one of ``tensors`` is a parameter the wrapper reduces."""
        known = {id(p) for p in self.params}
        missing = [tuple(t.shape) for t in tensors if id(t) not in known]
        if missing:
            name = "DistributedDataParallel" if self.kind == "ddp" else "fully_shard"
            raise ValueError(
                f"{what} include tensors of shapes {missing} that are not trainable parameters of the "
                f"model {name} wraps: their gradients would not be reduced across ranks"
            )


def data_parallel(model: nn.Module) -> DataParallel:
    """The :class:`DataParallel` view of a model wrapped by ``DistributedDataParallel`` or by
    ``torch.distributed.fsdp.fully_shard`` (FSDP2, on a one-dimensional device mesh)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed has no process group: call torch.distributed.init_process_group() "
            "on every rank before building the step (gloo on CPU, NCCL on GPUs)"
        )
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        ignored: set[str] = getattr(model, "parameters_to_ignore", set())
        params = [p for name, p in model.module.named_parameters() if p.requires_grad and name not in ignored]
        return DataParallel("ddp", model, model.process_group, params)
    if _is_fsdp2(model):
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.requires_grad and isinstance(p, DTensor)]
        meshes = {p.device_mesh for p in params}
        if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
            raise ValueError(
                "the step supports fully_shard on one one-dimensional device mesh (plain FSDP); "
                f"this model's parameters use {len(meshes)} meshes or a multi-dimensional one (HSDP)"
            )
        return DataParallel("fsdp", model, next(iter(meshes)).get_group(), params)
    raise TypeError(
        f"model must be wrapped by torch.nn.parallel.DistributedDataParallel or by "
        f"torch.distributed.fsdp.fully_shard, got {type(model).__name__}; for one process use MTLStep"
    )


def _is_fsdp2(model: nn.Module) -> bool:
    try:  # public from torch 2.6
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
