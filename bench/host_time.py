"""Host time of an eager Triton call, kernel launches stubbed: ``python -m bench.host_time``.

What a call costs on the host before and around its launches (the op's checks, the backend
choice, the table lookups, the tuned configuration, the result's allocation), the part that
bounds a small or many-tensor step when the GPU is fast. Every Triton kernel's launch is replaced
by a no-op, so Triton's own launcher is not counted either.

A steady-state step as :class:`emtl_kernels.MTLStep` takes it: the same shapes as the previous
step, new tensor objects each step (autograd's gradients, the new ``.grad`` destinations) at the
addresses of the previous step's (the caching allocator hands a training loop the same blocks),
so the device tables come from the cache. Each step builds a new :class:`TaskGradients`, untimed,
and times one call of one pass's public op (``task_gram``, ``task_sq_norms``, ``weighted_combine``
into the destinations), the passes taking turns step by step: each figure is the first call on a
step's new J, the median over its steps. The construction of the :class:`TaskGradients` is
reported beside them: a step pays it once for all its passes.

On a machine without a GPU the kernels run (here: do not run) on CPU tensors under Triton's
interpreter, which this module switches on before Triton is imported; a GPU adds the CUDA-only
host work (stream-capture checks, the device guard) to the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from emtl_kernels import TaskGradients, task_gram, task_sq_norms, weighted_combine

#: The issue's target: host time of one eager call, launches stubbed, in microseconds.
TARGET_US = 15.0
NUM_TASKS = 8
TENSOR_COUNTS = (1, 100)
#: Elements of each shared tensor: the tables do not depend on it beyond the chunk count.
TENSOR_NUMEL = 4096


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every Triton kernel of the backend launches nothing while inside."""
    from triton.runtime.jit import KernelInterface

    from emtl_kernels.triton_kernels import combine, gram

    # The launched kernels and the device helpers they import (stubbing those too is harmless).
    kernels = {
        id(value): value
        for module in (gram, combine)
        for value in vars(module).values()
        if isinstance(value, KernelInterface)
    }.values()
    for kernel in kernels:
        kernel.run = _no_launch  # KernelInterface.__getitem__ launches through self.run
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def _no_launch(*args, **kwargs) -> None:
    return None


class SteadyState:
    """T task gradients on ``num_tensors`` shared tensors and the combine's destinations, handed
    out step after step as new tensor objects over the same memory."""

    def __init__(self, num_tensors: int, device: torch.device):
        self._rows = [[torch.randn(TENSOR_NUMEL, device=device) for _ in range(num_tensors)] for _ in range(NUM_TASKS)]
        self._outs = [torch.empty(TENSOR_NUMEL, device=device) for _ in range(num_tensors)]
        self.weights = torch.rand(NUM_TASKS, device=device)

    def step(self) -> tuple[TaskGradients, list[torch.Tensor], float]:
        """(this step's J, its destinations, seconds the TaskGradients took to build)."""
        rows = [[piece.view(-1) for piece in row] for row in self._rows]
        outs = [out.view(-1) for out in self._outs]
        start = time.perf_counter()
        grads = TaskGradients(rows)
        return grads, outs, time.perf_counter() - start


def _calls(weights: torch.Tensor) -> dict[str, Callable[[TaskGradients, list[torch.Tensor]], object]]:
    return {
        "task_gram": lambda grads, outs: task_gram(grads, backend="triton"),
        "task_sq_norms": lambda grads, outs: task_sq_norms(grads, backend="triton"),
        "weighted_combine": lambda grads, outs: weighted_combine(grads, weights, out=outs, backend="triton"),
    }


def measure(num_tensors: int, device: torch.device, *, steps: int, warmup: int = 20) -> dict[str, list[float]]:
    """Seconds of each pass's call on a step's new J (``steps`` samples each), and of the
    TaskGradients construction (every step's)."""
    state = SteadyState(num_tensors, device)
    calls = _calls(state.weights)
    samples: dict[str, list[float]] = {name: [] for name in (*calls, "TaskGradients(rows)")}
    names = list(calls)
    with stubbed_launches():
        for index in range(len(names) * (warmup + steps)):
            name = names[index % len(names)]
            grads, outs, build = state.step()
            start = time.perf_counter()
            calls[name](grads, outs)
            elapsed = time.perf_counter() - start
            if index >= len(names) * warmup:
                samples[name].append(elapsed)
                samples["TaskGradients(rows)"].append(build)
    return samples


def report(device: torch.device, steps: int) -> str:
    """The markdown table of every call's median host time, with its verdict."""
    lines = [
        f"Host time per eager Triton call, launches stubbed ({device.type}, T = {NUM_TASKS}, "
        f"median of {steps} steady-state steps, µs; target ≤ {TARGET_US:g} µs a call)",
        "",
        "| call | tensors | median µs | p25–p75 µs | verdict |",
        "|---|---|---|---|---|",
    ]
    for num_tensors in TENSOR_COUNTS:
        for name, values in measure(num_tensors, device, steps=steps).items():
            quartiles = statistics.quantiles([v * 1e6 for v in values], n=4)
            median = statistics.median(values) * 1e6
            verdict = "(per step)" if name.startswith("TaskGradients") else ("met" if median <= TARGET_US else "missed")
            lines.append(
                f"| {name} | {num_tensors} | {median:.1f} | {quartiles[0]:.1f}–{quartiles[2]:.1f} | {verdict} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steady-state steps measured (default 2000)")
    arguments = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(report(device, arguments.steps))


if __name__ == "__main__":
    main(sys.argv[1:])
