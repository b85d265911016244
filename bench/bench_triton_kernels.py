"""Bandwidth of the Triton Gram, norm and combine passes, against a device copy and torch.

Every pass is timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run,
median) and reported as GB/s of the bytes it must move (EMTL.md's cost model: a Gram or norm
pass reads T·P elements; a combine pass reads T·P and writes P) and as a ratio to the copy
bandwidth of the same device measured in the same run (``dst.copy_(src)`` of 1 GiB, read plus
write). Torch baselines run on the same data: ``J @ J.T``, ``torch._foreach_norm`` over the rows,
``(J * J).sum(1)`` and ``w @ J`` (per parameter for the multi-tensor cases, as a torch user
would write them).

On a GPU:
    python -m pytest bench/bench_triton_kernels.py --benchmark-json=bench/results/<device>.json
    python -m bench.bench_triton_kernels --json bench/results/<device>.json   # table + JSON
Without a GPU the pytest entries skip and the script exits: the interpreter's speed means nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from emtl_kernels import TaskGradients, task_gram, task_sq_norms, weighted_combine

NUM_TASKS = (2, 4, 8, 16)
NUMELS = (2**20, 2**24, 2**27)
DTYPES = (torch.float32, torch.bfloat16)
COPY_BYTES = 2**30
#: The passes of :func:`passes`, each Triton pass followed by its torch baselines.
PASS_NAMES = ("triton_gram", "torch_matmul_gram", "triton_sq_norms", "torch_foreach_norm", "torch_square_sum",
              "triton_combine", "torch_w_matmul")


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The trunk of GPT-2 small (124 M parameters in 148 tensors): embeddings, 12 blocks, final
    layer norm, as a model's ``named_parameters()`` lists them."""
    width, layers, vocab, context = 768, 12, 50257, 1024
    block = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
             (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return [(vocab, width), (context, width)] + block * layers + [(width,), (width,)]


@dataclass(frozen=True)
class Case:
    """T task gradients of one dtype over ``numel`` elements in one ``[T, P]`` matrix, or over
    parameters of ``shapes`` (one ``[T, n_k]`` block per parameter, as a batched backward
    returns them)."""

    num_tasks: int
    dtype: torch.dtype
    numel: int = 0
    shapes: tuple[tuple[int, ...], ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        where = self.label or f"P=2^{int(math.log2(self.numel))}"
        return f"T={self.num_tasks}-{where}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def elements(self) -> int:
        return self.numel or sum(math.prod(shape) for shape in self.shapes)


CASES = [Case(t, dtype, numel=p) for dtype in DTYPES for p in NUMELS for t in NUM_TASKS] + [
    Case(t, dtype, shapes=tuple(gpt2_small_shapes()), label="gpt2-small") for dtype in DTYPES for t in NUM_TASKS
]


@dataclass
class Inputs:
    grads: TaskGradients
    #: Per parameter, the ``[T, n_k]`` matrix the torch baselines multiply (one for a matrix case).
    blocks: list[torch.Tensor]
    weights: torch.Tensor
    outs: list[torch.Tensor]


@functools.lru_cache(maxsize=1)  # one case's buffers alive at a time: P = 2^27 × 16 tasks is 8 GiB
def make_inputs(case: Case) -> Inputs:
    device = torch.device("cuda")
    if case.numel:
        matrix = torch.randn(case.num_tasks, case.numel, device=device, dtype=case.dtype)
        grads, blocks = TaskGradients.from_matrix(matrix), [matrix]
    else:
        blocks = [torch.randn(case.num_tasks, math.prod(s), device=device, dtype=case.dtype) for s in case.shapes]
        grads = TaskGradients.from_blocks(blocks)
    weights = torch.rand(case.num_tasks, device=device)
    outs = [torch.empty(size, device=device, dtype=case.dtype) for size in grads.sizes]
    return Inputs(grads, blocks, weights, outs)


def passes(case: Case, inputs: Inputs) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (a call running the pass, bytes it must move)."""
    grads, blocks, weights, outs = inputs.grads, inputs.blocks, inputs.weights, inputs.outs
    element = torch.finfo(case.dtype).bits // 8
    read = case.num_tasks * case.elements * element
    rows = [piece for row in grads.rows for piece in row]
    weights_in_dtype = weights.to(case.dtype)
    return {
        "triton_gram": (lambda: task_gram(grads, backend="triton"), read),
        "torch_matmul_gram": (lambda: sum(block @ block.T for block in blocks), read),
        "triton_sq_norms": (lambda: task_sq_norms(grads, backend="triton"), read),
        "torch_foreach_norm": (lambda: torch._foreach_norm(rows), read),
        "torch_square_sum": (lambda: sum((block * block).sum(1) for block in blocks), read),
        "triton_combine": (lambda: weighted_combine(grads, weights, out=outs, backend="triton"), read + case.elements * element),
        "torch_w_matmul": (lambda: [torch.matmul(weights_in_dtype, b, out=o) for b, o in zip(blocks, outs)],
                           read + case.elements * element),
    }


def milliseconds(run: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


@functools.cache
def copy_bandwidth() -> float:
    """GB/s of ``dst.copy_(src)`` on the current device, counting the read and the write."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * COPY_BYTES / milliseconds(lambda: target.copy_(source)) / 1e6


def measure(case: Case, pass_name: str) -> dict:
    """One pass of one case, as a result row."""
    run, moved = passes(case, make_inputs(case))[pass_name]
    run()  # compile and tune outside the timing
    elapsed = milliseconds(run)
    bandwidth = moved / elapsed / 1e6
    return {
        "device": torch.cuda.get_device_name(),
        "case": case.name,
        "pass": pass_name,
        "num_tasks": case.num_tasks,
        "numel": case.elements,
        "tensors": len(case.shapes) or 1,
        "dtype": str(case.dtype).removeprefix("torch."),
        "bytes": moved,
        "ms": elapsed,
        "gb_per_s": bandwidth,
        "copy_gb_per_s": copy_bandwidth(),
        "ratio_to_copy": bandwidth / copy_bandwidth(),
    }


def run_matrix(cases: list[Case] = CASES, pass_names: tuple[str, ...] = PASS_NAMES) -> list[dict]:
    """Every pass of every case on the current GPU, with progress on stderr."""
    results = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        results += [measure(case, name) for name in pass_names]
    make_inputs.cache_clear()
    return results


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bandwidth is measured on a GPU only")


@needs_gpu
@pytest.mark.parametrize("pass_name", PASS_NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_pass_bandwidth(benchmark, case, pass_name):
    result = measure(case, pass_name)
    benchmark.extra_info.update(result)
    run, _ = passes(case, make_inputs(case))[pass_name]
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: the Triton passes are benchmarked on a GPU only")
    results = run_matrix()
    for row in results:
        print(f"{row['case']:<28} {row['pass']:<20} {row['gb_per_s']:8.0f} GB/s  {row['ratio_to_copy']:5.2f} x copy")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
