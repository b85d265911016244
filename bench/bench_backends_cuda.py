"""GPU benchmark: every backend that runs on CUDA side by side (the native CUDA kernels, Triton,
the reference), with plain-PyTorch passes over the same buffer, in one run.

Per (T, P, dtype), J is a contiguous [T, P] matrix on the GPU:
- Gram pass: each backend's ``task_gram``, ``J @ J.T`` and ``torch._foreach_norm`` over the rows;
- combine pass: each backend's ``weighted_combine`` into a preallocated output, ``w @ J``;
- ``copy``: a device-to-device copy of J (2·T·P·s bytes moved), the bandwidth every pass is
  measured against (the cost model of EMTL.md).

Run ``python bench/bench_backends_cuda.py`` on a machine with a GPU (writes
``bench/results/gpu-<name>/backends_cuda.json``); without one it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_common import ROOT, git_commit, interleaved_medians, pass_record, slug, write_report

from emtl_kernels import TaskGradients, available_backends, task_gram, weighted_combine

DEFAULT_CONFIGS = (
    (8, 2**24, torch.float32),
    (8, 2**26, torch.float32),
    (8, 2**26, torch.bfloat16),
    (32, 2**24, torch.float32),
)


def measure(num_tasks: int, numel: int, dtype: torch.dtype, rounds: int = 20) -> dict:
    """Median seconds and GB/s of every candidate for one (T, P, dtype)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    matrix = torch.randn(num_tasks, numel, generator=generator, device="cuda").to(dtype)
    weights = torch.randn(num_tasks, generator=generator, device="cuda")
    grads = TaskGradients.from_matrix(matrix)
    rows = [row[0] for row in grads.rows]
    out = torch.empty(numel, dtype=dtype, device="cuda")
    copy = torch.empty_like(matrix)
    weights_like = weights.to(dtype)
    backends = available_backends("cuda")
    gram = interleaved_medians(
        {name: (lambda name=name: task_gram(grads, backend=name)) for name in backends}
        | {"matmul": lambda: matrix @ matrix.T, "foreach_norm": lambda: torch._foreach_norm(rows)},
        rounds,
        torch.cuda.synchronize,
    )
    combine = interleaved_medians(
        {name: (lambda name=name: weighted_combine(grads, weights, out=[out], backend=name)) for name in backends}
        | {"matmul": lambda: weights_like @ matrix},
        rounds,
        torch.cuda.synchronize,
    )
    copy_seconds = interleaved_medians({"copy": lambda: copy.copy_(matrix)}, rounds, torch.cuda.synchronize)["copy"]
    return {
        **pass_record(num_tasks, numel, matrix.element_size(), str(dtype).removeprefix("torch."), gram, combine),
        "copy_seconds": copy_seconds,
        "copy_gbps": 2 * num_tasks * numel * matrix.element_size() / copy_seconds / 1e9,
    }


def run(configs=DEFAULT_CONFIGS, rounds: int = 20) -> dict:
    """:func:`measure` over ``configs`` with the GPU, torch version and commit."""
    results = []
    for index, (num_tasks, numel, dtype) in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] T={num_tasks} P={numel} {dtype}", file=sys.stderr, flush=True)
        results.append(measure(num_tasks, numel, dtype, rounds))
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "backends": available_backends("cuda"),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }


def format_report(report: dict) -> str:
    lines = [f"{report['gpu']}, torch {report['torch']} (CUDA {report['cuda']}), commit {report['commit']}"]
    for result in report["results"]:
        lines.append(f"T={result['num_tasks']} P={result['numel']} {result['dtype']} "
                     f"(copy {result['copy_gbps']:.0f} GB/s):")
        for phase, gbps in (("gram", "gram_read_gbps"), ("combine", "combine_gbps")):
            lines.append(f"  {phase:8}" + "  ".join(
                f"{name} {seconds * 1e3:.3f} ms ({result[gbps][name]:.0f} GB/s)"
                for name, seconds in result[f"{phase}_seconds"].items()
            ))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per pass (default 20)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no GPU here: bench_backends_cuda.py measures CUDA backends only")
    report = run(rounds=args.rounds)
    print(format_report(report))
    if not args.no_save:
        path = write_report(report, f"gpu-{slug(report['gpu'])}", "backends_cuda")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
