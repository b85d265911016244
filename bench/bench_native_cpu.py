"""CPU benchmark of the native backend against plain PyTorch on the same buffer, in one run.

What is compared (J: a contiguous [T, P] matrix; the native ops read its rows in place):
- Gram pass: native ``task_gram`` against ``J @ J.T``, and its read bandwidth (T·P·s bytes over
  the time) against that of ``torch._foreach_norm`` over the T rows, a pass that reads the same
  bytes and does the least arithmetic a reduction can.
- Combine pass: native ``weighted_combine`` into a preallocated output (as the step writes into
  ``.grad``) against ``w @ J`` (which allocates its result) and against ``torch.mv`` into the
  same preallocated output.

Timing: the implementations of a pass run in interleaved rounds, so that load from other
processes falls on all of them alike; each figure is the median over the rounds, and the ratios
are taken between figures of the same run.

Run ``python bench/bench_native_cpu.py`` (writes ``bench/results/cpu-<model>/native_cpu.json``,
see ``--help``), or ``python -m pytest bench/bench_native_cpu.py`` for pytest-benchmark.
Reuse :func:`measure` (one configuration) and :func:`run` (the default set) from a report runner.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch
from bench_common import (
    ROOT,
    cpu_details,
    cpu_model,
    git_commit,
    interleaved_medians,
    pass_record,
    slug,
    write_report,
)

from emtl_kernels import TaskGradients, _extension, available_backends, task_gram, weighted_combine

#: (T, P, dtype) of the default run: past the caches (L3 is 32 MiB on the reference machine).
DEFAULT_CONFIGS = (
    (8, 2**22, torch.float32),
    (8, 2**24, torch.float32),
    (8, 2**22, torch.bfloat16),
)


def gram_candidates(matrix: torch.Tensor) -> dict[str, Callable[[], object]]:
    grads = TaskGradients.from_matrix(matrix)
    rows = [row[0] for row in grads.rows]
    return {
        "native": lambda: task_gram(grads, backend="native"),
        "matmul": lambda: matrix @ matrix.T,
        "foreach_norm": lambda: torch._foreach_norm(rows),
    }


def combine_candidates(matrix: torch.Tensor, weights: torch.Tensor) -> dict[str, Callable[[], object]]:
    grads = TaskGradients.from_matrix(matrix)
    out = torch.empty(matrix.shape[1], dtype=matrix.dtype)
    weights_like = weights.to(matrix.dtype)
    return {
        "native_into_out": lambda: weighted_combine(grads, weights, out=[out], backend="native"),
        "matmul": lambda: weights_like @ matrix,
        "mv_into_out": lambda: torch.mv(matrix.T, weights_like, out=out),
    }


def measure(num_tasks: int = 8, numel: int = 2**22, dtype: torch.dtype = torch.float32, rounds: int = 15) -> dict:
    """Times of both passes for one (T, P, dtype), with their ratios and bandwidths."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(num_tasks, numel, generator=generator).to(dtype)
    weights = torch.randn(num_tasks, generator=generator)
    gram = interleaved_medians(gram_candidates(matrix), rounds)
    combine = interleaved_medians(combine_candidates(matrix, weights), rounds)
    return {
        **pass_record(num_tasks, numel, matrix.element_size(), str(dtype).removeprefix("torch."), gram, combine),
        "rounds": rounds,
        "ratios": {
            "gram_speedup_vs_matmul": gram["matmul"] / gram["native"],
            "gram_bandwidth_vs_foreach_norm": gram["foreach_norm"] / gram["native"],
            "combine_speedup_vs_matmul": combine["matmul"] / combine["native_into_out"],
            "combine_speedup_vs_mv_into_out": combine["mv_into_out"] / combine["native_into_out"],
        },
    }


def run(configs=DEFAULT_CONFIGS, rounds: int = 15, repeats: int = 1, progress: bool = True) -> dict:
    """:func:`measure` over ``configs``, ``repeats`` times, with the machine, torch version and
    commit; ``summary`` gives each ratio's median, min and max over the repeats."""
    if "native" not in available_backends("cpu"):
        raise RuntimeError("the native backend is not available: pip install --no-build-isolation -e .")
    results = []
    for repeat in range(repeats):
        for index, (num_tasks, numel, dtype) in enumerate(configs, 1):
            if progress:
                print(f"[repeat {repeat + 1}/{repeats}, {index}/{len(configs)}] T={num_tasks} P={numel} {dtype}",
                      file=sys.stderr, flush=True)
            results.append(measure(num_tasks, numel, dtype, rounds) | {"repeat": repeat})
    return {
        "cpu_model": cpu_model(),
        "cpu": cpu_details(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_kernel_isa": _extension.CPU_ISA,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
        "summary": summarise(results),
    }


def config_name(result: dict) -> str:
    return f"T={result['num_tasks']} P={result['numel']} {result['dtype']}"


def summarise(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per configuration and ratio: median, min and max over the repeats."""
    by_config: dict[str, list[dict]] = {}
    for result in results:
        by_config.setdefault(config_name(result), []).append(result["ratios"])
    return {
        name: {
            ratio: {
                "median": statistics.median(r[ratio] for r in runs),
                "min": min(r[ratio] for r in runs),
                "max": max(r[ratio] for r in runs),
            }
            for ratio in runs[0]
        }
        for name, runs in by_config.items()
    }


def format_report(report: dict) -> str:
    lines = [
        f"{report['cpu_model']} ({report['threads']} threads, {report['cpu_kernel_isa']} kernels), "
        f"torch {report['torch']}, commit {report['commit']}, load average {report['load_average']}"
    ]
    for result in report["results"]:
        gram, combine = result["gram_seconds"], result["combine_seconds"]
        lines += [
            f"{config_name(result)} (repeat {result['repeat'] + 1}):",
            "  gram    " + "  ".join(f"{k} {v * 1e3:.2f} ms ({result['gram_read_gbps'][k]:.1f} GB/s)" for k, v in gram.items()),
            "  combine " + "  ".join(f"{k} {v * 1e3:.2f} ms ({result['combine_gbps'][k]:.1f} GB/s)" for k, v in combine.items()),
        ]
    lines.append("ratios, median [min, max] over the repeats:")
    for name, ratios in report["summary"].items():
        lines.append(f"  {name}")
        lines += [f"    {ratio}: {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" for ratio, r in ratios.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per pass (default 15)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the whole set (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(rounds=args.rounds, repeats=args.repeats)
    print(format_report(report))
    if not args.no_save:
        path = write_report(report, f"cpu-{slug(report['cpu_model'])}", "native_cpu")
        print(f"wrote {path.relative_to(ROOT)}")


# ---- pytest-benchmark: one test per implementation and pass, T = 8, P = 2**22, float32

needs_native = pytest.mark.skipif("native" not in available_backends("cpu"), reason="native extension not built")


@pytest.fixture(scope="module")
def task_matrix() -> torch.Tensor:
    return torch.randn(8, 2**22, generator=torch.Generator().manual_seed(0))


@needs_native
@pytest.mark.parametrize("impl", ["native", "matmul", "foreach_norm"])
def test_gram_pass(benchmark, task_matrix, impl):
    benchmark.group = "gram T=8 P=2^22 float32"
    benchmark(gram_candidates(task_matrix)[impl])


@needs_native
@pytest.mark.parametrize("impl", ["native_into_out", "matmul", "mv_into_out"])
def test_combine_pass(benchmark, task_matrix, impl):
    benchmark.group = "combine T=8 P=2^22 float32"
    benchmark(combine_candidates(task_matrix, torch.randn(8))[impl])


if __name__ == "__main__":
    main()
