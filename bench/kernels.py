"""Kernel level: each backend's Gram and combine pass against the torch baselines and a copy of
the same bytes, all timed interleaved in one job per case.

The cases of a preset (:class:`bench.presets.KernelPlan`):

- ``matrix``: for every dtype, T and P = 2^k, one ``[T, P]`` matrix J;
- the multi-tensor case: for every dtype and T of ``multi_tensor_tasks``, the task gradients of a
  transformer's parameter tensors, one ``[T, n_k]`` block per tensor, many tensors of mixed
  sizes, as :class:`emtl_kernels.TaskGradients` rows; the torch baselines loop over the tensors.

What a job times is listed in :mod:`bench.kernel_cases`. Bytes follow the cost model of EMTL.md
(reads plus writes) and are those a pass must move: a Gram pass reads T·P·s bytes (s: element
size), a combine pass reads T·P·s and writes P·s, the copy reads and writes T·P·s. A torch
baseline is counted with the bytes of its pass, whatever temporaries it makes, so GB/s compares
the candidates of a pass like their times. GB/s = bytes / median time (10⁹ bytes);
``copy_ratio`` = a candidate's GB/s over the copy's, both measured in the same job. A case is
measured only where its working set (:func:`working_set_bytes`) fits in ``memory_fraction`` of
the free memory; a candidate that fails (out of memory, say) is reported so and the others
measured. On a CPU, a matrix job also times the limits of :mod:`bench.kernel_limits` (the FMA
roofline, the float32 twin of a 16-bit J) interleaved with the passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from . import kernel_limits, roofline
from .kernel_cases import DTYPES, Candidate, KernelCase
from .plan import Job
from .presets import Preset
from .timing import Clock, first_run, measure_interleaved, timed

#: The ``layout`` of the single-matrix cases (a multi-tensor case names its shapes).
MATRIX = "matrix"


def pass_bytes(kernel_pass: str, num_tasks: int, numel: int, element_size: int) -> int:
    """Bytes a pass moves over a ``[T, P]`` matrix, reads plus writes."""
    matrix = num_tasks * numel * element_size
    if kernel_pass == "gram":
        return matrix
    if kernel_pass == "combine":
        return matrix + numel * element_size
    if kernel_pass == "copy":
        return 2 * matrix
    raise ValueError(f"unknown pass {kernel_pass!r}")


def working_set_bytes(num_tasks: int, numel: int, element_size: int) -> int:
    """Bytes alive at once in a job: J, the copy's destination, the temporary of ``J * J``, the
    combine's output and the result ``w @ J`` allocates."""
    return 3 * num_tasks * numel * element_size + 2 * numel * element_size


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free memory of this machine")


def measure_case(
    case: KernelCase, layout: str, backends: Sequence[str], device: torch.device, preset: Preset
) -> list[dict]:
    """Time every candidate of ``case`` interleaved; one row per candidate."""
    clock = Clock(device, flush_cache=True)
    calls = case.calls(backends) | kernel_limits.limit_calls(case, layout == MATRIX, backends, device)
    samplers = {candidate: timed(call, clock) for candidate, call in calls.items()}
    errors = {candidate: first_run(sample)[1] for candidate, sample in samplers.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what a failed candidate left in the allocator's cache
    working = {candidate: sample for candidate, sample in samplers.items() if errors[candidate] is None}
    kernel = preset.kernels
    timings = measure_interleaved(working, warmup=max(kernel.warmup - 1, 0), repeats=kernel.repeats)
    num_tasks, numel, element_size = case.num_tasks, case.numel, case.element_size
    copy_gbps = _gbps(timings.get(Candidate("copy")), pass_bytes("copy", num_tasks, numel, element_size))
    rows = []
    for candidate, error in errors.items():
        if candidate == kernel_limits.FMA_ROOFLINE:
            rows.append(_roofline_row(case, layout, timings.get(candidate), error))
            continue
        size = DTYPES[candidate.dtype].itemsize if candidate.dtype else element_size
        moved = pass_bytes(candidate.kernel_pass, num_tasks, numel, size)
        row = {
            "pass": candidate.kernel_pass,
            "backend": candidate.backend,
            "baseline": candidate.baseline,
            "layout": layout,
            "tensors": len(case.blocks),
            "dtype": candidate.dtype or str(case.blocks[0].dtype).removeprefix("torch."),
            "tasks": num_tasks,
            "numel": numel,
            "element_size": size,
            "bytes": moved,
            "error": error,
        }
        if candidate.dtype:
            row.update(reference=kernel_limits.TWIN_REFERENCE, twin_of=str(case.blocks[0].dtype).removeprefix("torch."))
        if error is None:
            gbps = _gbps(timings[candidate], moved)
            row.update(times=timings[candidate]["time"].as_dict(), gbps=gbps, copy_ratio=gbps / copy_gbps)
        rows.append(row)
    return rows


def _roofline_row(case: KernelCase, layout: str, timing, error: str | None) -> dict:
    """The FMA probe's row: scalar FMAs per second on the run's threads."""
    threads = torch.get_num_threads()
    row = {
        "pass": "fma",
        "backend": None,
        "baseline": None,
        "reference": kernel_limits.ROOFLINE_REFERENCE,
        "layout": layout,
        "tensors": len(case.blocks),
        "dtype": str(case.blocks[0].dtype).removeprefix("torch."),
        "tasks": case.num_tasks,
        "numel": case.numel,
        "threads": threads,
        "fmas": roofline.fmas_per_sample(threads),
        "error": error,
    }
    if error is None and timing is not None:
        row.update(times=timing["time"].as_dict(), fma_per_s=row["fmas"] / timing["time"].median)
    return row


def _gbps(timing, moved: int) -> float:
    return math.nan if timing is None else moved / timing["time"].median / 1e9


def _case_name(sizes: Sequence[int], layout: str) -> str:
    return f"P=2^{sizes[0].bit_length() - 1}" if layout == MATRIX else f"{layout} ({len(sizes)} tensors)"


def _case_job(
    dtype_name: str,
    num_tasks: int,
    sizes: Sequence[int],
    layout: str,
    backends: Sequence[str],
    device: torch.device,
    preset: Preset,
) -> Job:
    def run() -> list[dict]:
        case = KernelCase.make(dtype_name, num_tasks, sizes, device)
        return measure_case(case, layout, backends, device, preset)

    return Job("kernels", f"kernels: {dtype_name}, T={num_tasks}, {_case_name(sizes, layout)}", run)


def plan(preset: Preset, device: torch.device, backends: Sequence[str]) -> tuple[list[Job], list[str]]:
    """One job per case that fits, and a note for each case left out."""
    kernel = preset.kernels
    budget = kernel.memory_fraction * free_bytes(device)
    shapes = kernel.multi_tensor
    multi_tensor_sizes = [math.prod(shape) for shape in shapes.shapes()]
    cases = [
        (dtype_name, num_tasks, [2**log2_size], MATRIX)
        for dtype_name in kernel.dtypes
        for num_tasks in kernel.tasks
        for log2_size in kernel.log2_sizes
    ] + [
        (dtype_name, num_tasks, multi_tensor_sizes, shapes.name)
        for dtype_name in kernel.dtypes
        for num_tasks in kernel.multi_tensor_tasks
    ]
    jobs, left_out = [], []
    for dtype_name, num_tasks, sizes, layout in cases:
        dtype = DTYPES[dtype_name]
        needed = working_set_bytes(num_tasks, sum(sizes), dtype.itemsize)
        if kernel_limits.measured_here(device, layout == MATRIX, backends):
            needed += kernel_limits.twin_bytes(dtype, num_tasks, sum(sizes))
        if needed > budget:
            left_out.append(f"{dtype_name}, T={num_tasks}, {_case_name(sizes, layout)}: needs {needed / 1e9:.1f} GB")
            continue
        jobs.append(_case_job(dtype_name, num_tasks, sizes, layout, backends, device, preset))
    return jobs, left_out
