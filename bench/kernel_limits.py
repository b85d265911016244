"""The limits the native CPU passes are judged against, timed in the same job as the passes.

In a CPU job on a ``[T, P]`` matrix where the native backend is measured:

- the FMA roofline (:mod:`bench.roofline`): the compute limit of the Gram pass, which does
  T(T+1)/2 FMAs per column;
- in a 16-bit job, the float32 twin of J (the same shape, in float32): the native Gram and
  combine passes and ``torch.mv(J.T, w, out=g)`` on it. Torch's GEMV is the memory limit the
  passes are held to (its read rate over J), and a 16-bit pass is held to the float32 pass's
  bytes per second.

Rows of these candidates carry a ``reference`` key: the report's kernel tables leave them out,
and :mod:`bench.targets` reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from emtl_kernels import TaskGradients, task_gram, weighted_combine

from . import roofline
from .kernel_cases import MV_INTO_OUT, Candidate, KernelCase

FMA_ROOFLINE = Candidate("fma")
TWIN_DTYPE = "float32"
#: ``reference`` of the rows: the probe, and the passes on the float32 twin.
ROOFLINE_REFERENCE = "FMA roofline"
TWIN_REFERENCE = "float32 twin"


def twin(kernel_pass: str, *, backend: str | None = None, baseline: str | None = None) -> Candidate:
    return Candidate(kernel_pass, backend, baseline, dtype=TWIN_DTYPE)


def measured_here(device: torch.device, layout_is_matrix: bool, backends: Sequence[str]) -> bool:
    return device.type == "cpu" and layout_is_matrix and "native" in backends


def needs_twin(dtype: torch.dtype) -> bool:
    return dtype != torch.float32


def twin_bytes(dtype: torch.dtype, num_tasks: int, numel: int) -> int:
    """Memory the float32 twin holds: J and the combine's output."""
    return (num_tasks + 1) * numel * 4 if needs_twin(dtype) else 0


def limit_calls(
    case: KernelCase, layout_is_matrix: bool, backends: Sequence[str], device: torch.device
) -> dict[Candidate, Callable[[], object]]:
    """The probe and the float32 twin's candidates of ``case``; none outside a native CPU matrix job."""
    if not measured_here(device, layout_is_matrix, backends):
        return {}
    calls: dict[Candidate, Callable[[], object]] = {}
    if roofline.unavailable_reason() is None:
        calls[FMA_ROOFLINE] = roofline.probe(torch.get_num_threads())
    if needs_twin(case.blocks[0].dtype):
        matrix = case.blocks[0].float()
        grads = TaskGradients.from_matrix(matrix)
        out = torch.empty(matrix.shape[1], device=device)
        calls[twin("gram", backend="native")] = functools.partial(task_gram, grads, backend="native")
        calls[twin("combine", backend="native")] = functools.partial(
            weighted_combine, grads, case.weights, out=[out], backend="native"
        )
        calls[twin("combine", baseline=MV_INTO_OUT)] = functools.partial(torch.mv, matrix.T, case.weights, out=out)
    return calls
