"""Kernel level: each backend's Gram pass and combine pass against a copy of the same bytes.

For every dtype, T and P = 2^k of the preset, one ``[T, P]`` matrix J is timed, interleaved:

- ``gram``: ``task_gram(J)``, reads T·P·s bytes (s: element size);
- ``combine``: ``weighted_combine(J, w, out=g)``, reads T·P·s and writes P·s;
- ``copy``: ``dst.copy_(J)``, reads T·P·s and writes T·P·s: the bandwidth a pass can hope for.

Bytes counted as in the cost model of EMTL.md (reads plus writes); GB/s = bytes / median time
(10⁹ bytes). ``copy_ratio`` = a pass's GB/s over the copy's, both measured in the same job.
A size is measured only where J and the copy's destination fit in ``memory_fraction`` of the free
memory; a backend that runs out of memory at a size is reported so, and the others measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from emtl_kernels import task_gram, weighted_combine

from .plan import Job
from .presets import Preset
from .timing import Clock, first_run, measure_interleaved, timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free memory of this machine")


@dataclass(frozen=True)
class KernelCase:
    """The tensors of one size: J ``[T, P]``, weights ``[T]``, the combine's output and the copy's
    destination."""

    matrix: torch.Tensor
    weights: torch.Tensor
    combined: torch.Tensor
    destination: torch.Tensor

    @classmethod
    def make(cls, dtype_name: str, num_tasks: int, numel: int, device: torch.device) -> KernelCase:
        generator = torch.Generator(device=device).manual_seed(numel + num_tasks)
        matrix = torch.randn(num_tasks, numel, generator=generator, device=device).to(DTYPES[dtype_name])
        weights = torch.rand(num_tasks, generator=generator, device=device)
        return cls(matrix, weights, torch.empty(numel, dtype=matrix.dtype, device=device), torch.empty_like(matrix))

    def calls(self, backends: Sequence[str]) -> dict[tuple[str, str | None], Callable[[], object]]:
        """The copy and each backend's two passes, keyed by (pass, backend)."""
        calls = {("copy", None): lambda: self.destination.copy_(self.matrix)}
        for backend in backends:
            calls[("gram", backend)] = partial(task_gram, self.matrix, backend=backend)
            calls[("combine", backend)] = partial(
                weighted_combine, self.matrix, self.weights, out=self.combined, backend=backend
            )
        return calls


def _case_job(dtype_name: str, num_tasks: int, numel: int, backends: Sequence[str], device: torch.device, preset: Preset) -> Job:
    def run() -> list[dict]:
        case = KernelCase.make(dtype_name, num_tasks, numel, device)
        clock = Clock(device)
        samplers = {key: timed(call, clock) for key, call in case.calls(backends).items()}
        errors = {key: first_run(sample)[1] for key, sample in samplers.items()}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        working = {key: sample for key, sample in samplers.items() if errors[key] is None}
        kernel = preset.kernels
        timings = measure_interleaved(working, warmup=max(kernel.warmup - 1, 0), repeats=kernel.repeats)
        element_size = case.matrix.element_size()
        copy_gbps = _gbps(timings.get(("copy", None)), pass_bytes("copy", num_tasks, numel, element_size))
        rows = []
        for (kernel_pass, backend), error in errors.items():
            moved = pass_bytes(kernel_pass, num_tasks, numel, element_size)
            row = {
                "pass": kernel_pass, "backend": backend, "dtype": dtype_name, "tasks": num_tasks, "numel": numel,
                "element_size": element_size, "bytes": moved, "error": error,
            }
            if error is None:
                gbps = _gbps(timings[(kernel_pass, backend)], moved)
                row.update(times=timings[(kernel_pass, backend)]["time"].as_dict(), gbps=gbps, copy_ratio=gbps / copy_gbps)
            rows.append(row)
        return rows

    return Job("kernels", f"kernels: {dtype_name}, T={num_tasks}, P=2^{numel.bit_length() - 1}", run)


def _gbps(timing, moved: int) -> float:
    return float("nan") if timing is None else moved / timing["time"].median / 1e9


def plan(preset: Preset, device: torch.device, backends: Sequence[str]) -> tuple[list[Job], list[str]]:
    """One job per (dtype, T, P) that fits, and a note for each size left out."""
    kernel = preset.kernels
    budget = kernel.memory_fraction * free_bytes(device)
    jobs, left_out = [], []
    for dtype_name in kernel.dtypes:
        element_size = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        for num_tasks in kernel.tasks:
            for log2_size in kernel.log2_sizes:
                numel = 2**log2_size
                needed = pass_bytes("copy", num_tasks, numel, element_size) + numel * element_size
                if needed > budget:
                    left_out.append(f"{dtype_name}, T={num_tasks}, P=2^{log2_size}: needs {needed / 1e9:.1f} GB")
                    continue
                jobs.append(_case_job(dtype_name, num_tasks, numel, backends, device, preset))
    return jobs, left_out
